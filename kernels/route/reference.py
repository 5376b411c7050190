"""Pure-jnp reference of the fused `route` op: the definition every backend is tested against.

Written for clarity, one step per line of the `RouteParams` semantics. All arithmetic happens in
the dtypes the inputs bring (jnp promotion of the formulas, no upcast): with bias and expert_scale
in the logits' dtype, weights and scores have the logits' dtype.

Example (Mixtral: softmax, top-2, renormalised)::

    import jax.numpy as jnp
    from moefuse.kernels.route.params import RouteParams
    from moefuse.kernels.route.reference import route_reference

    p = RouteParams(num_experts=8, k=2, score="softmax", post=(("renorm", 0.0),))
    weights, ids = route_reference(jnp.zeros((4, 8)), p)   # weights [4, 2], ids int32 [4, 2]
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from .params import RouteParams

GroupLimit = Callable[[jax.Array, RouteParams], jax.Array]


def validate_inputs(
    logits: jax.Array, params: RouteParams, bias: jax.Array | None, expert_scale: jax.Array | None
) -> None:
    """Raise TypeError / ValueError when the inputs do not fit `params`."""
    e = params.num_experts
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"route: logits must be floating point, got {logits.dtype}")
    if logits.ndim < 1 or logits.shape[-1] != e:
        raise ValueError(f"route: logits last dim must be num_experts={e}, got shape {logits.shape}")
    if params.n_group > 1 and params.group_score == "top2_sum" and e // params.n_group < 2:
        raise ValueError(
            f"route: group_score='top2_sum' needs at least 2 experts per group, got "
            f"num_experts={e}, n_group={params.n_group}"
        )
    for name, arr, wanted in (
        ("bias", bias, params.selection_bias),
        ("expert_scale", expert_scale, params.uses_expert_scale),
    ):
        if arr is None:
            if wanted:
                raise ValueError(f"route: params need {name} (shape [{e}]) but none was given")
            continue
        if not wanted:
            raise ValueError(f"route: {name} was given but params do not use it")
        if arr.shape != (e,):
            raise ValueError(f"route: {name} must have shape ({e},), got {arr.shape}")
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise TypeError(f"route: {name} must be floating point, got {arr.dtype}")


def score(logits: jax.Array, kind: str) -> jax.Array:
    """The score function `kind` ("softmax", "sigmoid", "none") over the last axis."""
    if kind == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    if kind == "sigmoid":
        return jax.nn.sigmoid(logits)
    return logits


def apply_post(w: jax.Array, params: RouteParams, scale_at_ids: jax.Array | None) -> jax.Array:
    """The `post` steps of params, in order, on weights w [..., k]; `scale_at_ids` [..., k] is
    expert_scale gathered at the chosen ids (needed iff params use the expert_scale step)."""
    for step in params.post:
        if step[0] == "renorm":
            eps = step[1]
            total = jnp.sum(w, axis=-1, keepdims=True)
            w = w / total if eps == 0.0 else w / (total + eps)
        elif step[0] == "renorm_max":
            w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), step[1])
        elif step[0] == "scale":
            w = w * step[1]
        else:  # "expert_scale"
            w = w * scale_at_ids
    return w


def _group_limit(sel: jax.Array, params: RouteParams) -> jax.Array:
    """Replace sel of experts outside the topk_group best groups by group_fill."""
    e, g = params.num_experts, params.n_group
    grouped = sel.reshape(*sel.shape[:-1], g, e // g)
    if params.group_score == "top2_sum":
        group_scores = jnp.sum(lax.top_k(grouped, 2)[0], axis=-1)
    else:
        group_scores = jnp.max(grouped, axis=-1)
    _, group_ids = lax.top_k(group_scores, params.topk_group)
    group_mask = jnp.sum(jax.nn.one_hot(group_ids, g, dtype=jnp.int32), axis=-2) > 0  # [..., g]
    expert_mask = jnp.repeat(group_mask, e // g, axis=-1)  # [..., e]
    return jnp.where(expert_mask, sel, jnp.asarray(params.group_fill, sel.dtype))


def route_reference(
    logits: jax.Array,
    params: RouteParams,
    bias: jax.Array | None = None,
    expert_scale: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """Route logits [..., E] to k experts: returns (weights [..., k], ids int32 [..., k]),
    plus scores [..., E] when params.expose_scores. Semantics: see `RouteParams`.

    For order='topk_then_score' the exposed scores are score(logits) over all E experts.
    """
    return route_steps(logits, params, bias, expert_scale, group_limit=_group_limit)


def route_steps(
    logits: jax.Array,
    params: RouteParams,
    bias: jax.Array | None,
    expert_scale: jax.Array | None,
    *,
    group_limit: GroupLimit,
) -> tuple[jax.Array, ...]:
    """The route computation with a pluggable group mask (the one place implementations differ)."""
    logits = jnp.asarray(logits)
    validate_inputs(logits, params, bias, expert_scale)
    s = None
    if params.order == "topk_then_score":
        top_logits, ids = lax.top_k(logits, params.k)
        w = score(top_logits, params.score)
        if params.expose_scores:
            s = score(logits, params.score)
    else:
        s = score(logits, params.score)
        sel = s + bias if params.selection_bias else s
        if params.n_group > 1:
            sel = group_limit(sel, params)
        top_sel, ids = lax.top_k(sel, params.k)
        w = top_sel if params.weights_from == "selection" else jnp.take_along_axis(s, ids, axis=-1)
    w = apply_post(w, params, jnp.asarray(expert_scale)[ids] if params.uses_expert_scale else None)
    return (w, ids, s) if params.expose_scores else (w, ids)
