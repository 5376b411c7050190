"""The fused `route` op: router scores, (group-limited) top-k selection and weight post-processing.

`route` is a `jax.custom_vjp`: the forward runs the chosen implementation, the backward is the
VJP of the pure-jnp reference (`reference.route_reference`), which defines the op. Expert ids are
integer outputs and carry no gradient; gradients flow to logits and expert_scale, and to the
selection bias only where the reference's weights depend on it (weights_from='selection').

Example, the Ling-2.6 router::

    import jax, jax.numpy as jnp
    from moefuse.kernels.route import RouteParams, route

    p = RouteParams(num_experts=256, k=8, score="sigmoid", selection_bias=True,
                    n_group=8, topk_group=4, group_score="top2_sum", group_fill=0.0,
                    weights_from="scores", post=(("renorm", 1e-20), ("scale", 2.5)))
    logits = jax.random.normal(jax.random.key(0), (16, 256))
    weights, ids = route(logits, p, bias=jnp.zeros(256))   # [16, 8] float32, [16, 8] int32
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .params import RouteParams
from .reference import route_reference, validate_inputs
from .xla import route_xla

__all__ = ["IMPLS", "RouteParams", "route", "route_reference", "route_xla"]

IMPLS = {"reference": route_reference, "xla": route_xla}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _route(params: RouteParams, impl: str, logits, bias, expert_scale):
    return IMPLS[impl](logits, params, bias, expert_scale)


def _route_fwd(params: RouteParams, impl: str, logits, bias, expert_scale):
    return IMPLS[impl](logits, params, bias, expert_scale), (logits, bias, expert_scale)


def _route_bwd(params: RouteParams, impl: str, residuals, cotangents):
    _, pullback = jax.vjp(lambda x, b, s: route_reference(x, params, b, s), *residuals)
    return pullback(cotangents)


_route.defvjp(_route_fwd, _route_bwd)


def route(
    logits: jax.Array,
    params: RouteParams,
    *,
    bias: jax.Array | None = None,
    expert_scale: jax.Array | None = None,
    impl: str = "xla",
) -> tuple[jax.Array, ...]:
    """Route logits [..., E] to params.k experts.

    Returns (weights [..., k], ids int32 [..., k]), plus scores [..., E] when params.expose_scores.
    `bias` [E] is the selection bias (needed iff params.selection_bias), `expert_scale` [E] the
    per-expert weight scale (needed iff params has an ("expert_scale",) post step). `impl` is one
    of IMPLS ("reference", "xla"). Raises TypeError / ValueError for inputs that do not fit params.
    """
    if impl not in IMPLS:
        raise ValueError(f"route: unknown impl {impl!r}; valid: {sorted(IMPLS)}")
    if not isinstance(params, RouteParams):
        raise TypeError(f"route: params must be a RouteParams, got {type(params).__name__}")
    logits = jnp.asarray(logits)
    bias = None if bias is None else jnp.asarray(bias)
    expert_scale = None if expert_scale is None else jnp.asarray(expert_scale)
    validate_inputs(logits, params, bias, expert_scale)
    return _route(params, impl, logits, bias, expert_scale)
