"""The dense-gather XLA schedule of `moe_ffn`: every expert on every token, each assignment's output
gathered, no sort; the backward is the routed one of `xla`.

For small sites on CPU whose original routes tokens (sorts them, gathers expert weights, loops over
experts): at T*E*D*F < 2**21 running all E experts on all T tokens is a few dots, cheaper than the
sorted schedule's sort, gathers and loop (2 cores, jax 0.10.2, SwiGLU k=2, 2026-12-07: 0.07 ms
against 0.12 ms for the sorted schedule and 0.14 ms for a sort + `ragged_dot` original at T=32 D=32
F=64 E=8; 0.16 / 0.20 / 0.28 ms at 2**20; from 2**21 the sorted schedule wins, 0.22 / 0.25 ms).

The forward starts with an `optimization_barrier` on (x, weights, ids), so the experts' dots wait for
the router's outputs instead of running beside the router's own work: XLA:CPU runs independent ops
on its thread pool, and at these sizes handing them to the second core costs more than they do
(2 shared cores, jax 0.12.0.1, 2026-12-08, EasyDeL Qwen3-MoE / Mixtral STANDARD at T=32 D=32 E=8:
0.48-0.93x of the original without the barrier, 0.97-1.31x with it, measured in alternation by
`benchmarks/real_models.py`; on one core the fused program was 1.4x faster either way).

Unlike `dense` (which combines by a [T, E] matrix, as dense originals do, so an unselected expert's
non-finite output reaches the result through its zero weight), each assignment's row is gathered
from the all-experts output (`reference.assignment_outputs`), so an expert a token was not routed to
cannot reach that token's result. The backward is `xla.backward` on the routed rows (a sort, only
in the backward), so it cannot reach the gradients either. It takes every MoeParams the reference
takes, per-expert arrays included (each expert runs on its own arrays: they are never stacked).

Example::

    out, residuals = forward(x, weights, ids, ew, params)   # what moe_ffn(..., impl="dense_gather") runs
"""

from __future__ import annotations

import jax
from jax import lax

from . import xla
from .params import MoeParams
from .reference import ExpertWeights, assignment_outputs, combine_assignments


def forward(
    x: jax.Array, weights: jax.Array, ids: jax.Array, ew: ExpertWeights, params: MoeParams
) -> tuple[jax.Array, xla.Residuals]:
    """out [T, D] and the residuals `xla.backward` reads (its layout is built only for them: a forward
    whose residuals are unused, as under inference, drops it)."""
    # the experts' work waits for the router's outputs (see the module docstring)
    x, weights, ids = lax.optimization_barrier((x, weights, ids))
    y, live = assignment_outputs(x, weights, ids, ew, params)
    out = combine_assignments(x, weights, y, live, params)
    lay = xla.layout(ids, params, xla.expert_schedule(x.shape[0], params, ew))
    return out, xla.Residuals(x, weights, ew, lay, None if params.weights_on_input else y)
