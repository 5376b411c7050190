"""The dense XLA schedule of `moe_ffn`: every expert on every token, combined by a [T, E] matrix.

At small shapes on CPU this beats sorting rows by expert (a few dots instead of a sort, a gather
and a loop over experts), and it is how a model that spells its MoE densely computes it (the same
one contraction `tef,efd,te->td`, which XLA:CPU compiles as it compiles the original),
which is the only place selection uses it (the `moe` CPU row `dispatch == "dense"`): the fused op
then does what the original did, down to an unselected expert's non-finite output reaching the
result through its zero combine weight (0 * inf = nan), which the op's reference leaves out.
Capacity dispatch and weights_on_input are not supported (selection never chooses it there).

Example::

    out = dense_ffn(x, weights, ids, ew, params)   # what moe_ffn(..., impl="dense") runs
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .params import MoeParams
from .reference import (
    ExpertWeights,
    cast_expert_weights,
    combine_dtype,
    compute_dtype,
    expert_hidden,
    live_mask_reference,
    result_dtype,
)


def dense_ffn(
    x: jax.Array, weights: jax.Array, ids: jax.Array, ew: ExpertWeights, params: MoeParams
) -> jax.Array:
    """out[t] = sum_e combine[t, e] * FFN_e(x[t]), combine[t, e] = sum_j weights[t, j] [ids[t, j] == e]
    over the live assignments."""
    if params.capacity is not None:
        raise ValueError("moe_ffn impl='dense' does not drop tokens: use impl='xla' with a capacity")
    if params.weights_on_input:
        raise ValueError("moe_ffn impl='dense' runs every expert on the tokens as they are, not on rows "
                         "scaled by their weights (weights_on_input): use impl='xla'")
    if params.projection_dtype is not None:
        raise ValueError("moe_ffn impl='dense' folds the combine into the down projection, so it "
                         f"cannot round that projection to projection_dtype={params.projection_dtype}: "
                         "use impl='xla'")
    cdt = compute_dtype(params, x)
    wdt = combine_dtype(params, cdt, weights)
    ew = cast_expert_weights(ew, params, cdt)
    hidden = jax.vmap(lambda w: expert_hidden(x.astype(cdt), w, params), out_axes=1)(ew)  # [T, E, F]
    live = live_mask_reference(ids, params)
    tokens = lax.broadcasted_iota(jnp.int32, ids.shape, 0)
    combine = jnp.zeros((x.shape[0], params.num_experts), wdt).at[tokens, jnp.where(live, ids, 0)].add(
        jnp.where(live, weights.astype(wdt), jnp.zeros((), wdt)))
    # one contraction, as dense originals write it (einsum picks the order)
    out = jnp.einsum("tef,efd,te->td", hidden.astype(wdt), ew["w_down"].astype(wdt), combine)
    if "b_down" in ew:
        out = out + combine @ ew["b_down"].astype(wdt)
    return out.astype(result_dtype(params, x))

