"""What Mixture-of-Experts code looks like: one module per stage, each a `moefuse.match.Pattern`.

    from moefuse.patterns import PATTERNS, supported_table
    print(supported_table())

Patterns run in order; a later pattern may take an earlier one's outputs as its inputs (the MoE
block takes the router's weights and ids).
"""

from moefuse.patterns.capacity import CAPACITY
from moefuse.patterns.capacity import SUPPORTED as _CAPACITY_SUPPORTED
from moefuse.patterns.moe_block import MOE
from moefuse.patterns.moe_block import SUPPORTED as _MOE_SUPPORTED
from moefuse.patterns.router import ROUTER
from moefuse.patterns.router import SUPPORTED as _ROUTER_SUPPORTED
from moefuse.patterns.shared import SUPPORTED as _SHARED_SUPPORTED

PATTERNS = (ROUTER, MOE, CAPACITY)


def supported_table() -> str:
    """The supported-patterns table (Markdown), as shown in the README."""
    rows = ["| op | family | recognised spellings | bound parameters |", "|---|---|---|---|"]
    supported = _ROUTER_SUPPORTED + _MOE_SUPPORTED + _CAPACITY_SUPPORTED + _SHARED_SUPPORTED
    for op, family, spellings, params in supported:
        rows.append(f"| `{op}` | {family} | {spellings} | {params} |")
    return "\n".join(rows)
