"""moefuse: find Mixture-of-Experts subgraphs in JAX programs and run them as fused ops.

import moefuse

@moefuse.jit
def forward(params, x): ...          # unmodified model code

print(moefuse.plan(forward, params, x))
"""

from moefuse.api import fuse, jit, plan, rewritten_jaxpr
from moefuse.plan import Decline, Plan, Site
from moefuse.verify import VerificationError

__all__ = ["Decline", "Plan", "Site", "VerificationError", "fuse", "jit", "plan", "rewritten_jaxpr"]
__version__ = "0.1.0"
