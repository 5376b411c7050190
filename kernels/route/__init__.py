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

from moefuse import select

from . import pallas_gpu, pallas_tpu
from .params import RouteParams
from .reference import route_reference, validate_inputs
from .xla import route_xla

__all__ = ["IMPLS", "RouteParams", "route", "route_reference", "route_xla"]


def _pallas(kernel_fn):
    """An IMPLS entry running a Pallas kernel with the selection's block_tokens and interpret flag."""
    return lambda logits, params, bias, scale, kernel: kernel_fn(
        logits, params, bias, scale, block_tokens=kernel.tile("block_tokens", 0) or None,
        interpret=kernel.interpret,
    )


IMPLS = {
    "reference": lambda logits, params, bias, scale, kernel: route_reference(logits, params, bias, scale),
    "xla": lambda logits, params, bias, scale, kernel: route_xla(logits, params, bias, scale),
    "pallas_tpu": _pallas(pallas_tpu.route_pallas_tpu),
    "pallas_gpu": _pallas(pallas_gpu.route_pallas_gpu),
}


def _declines(module):
    """The row's `fits`: the kernel module's own reason for params it does not take."""

    def fits(req: select.Request, target: select.Target) -> str | None:
        if not req.inputs or req.inputs[0].shape[:-1] == () or 0 in req.inputs[0].shape:
            return "no tokens to route"
        return module.unsupported(RouteParams.from_plan(req.params))  # the row checks the dtype

    return fits


def _tiles(module):
    def tiles(req: select.Request, target: select.Target) -> dict[str, int]:
        return {"block_tokens": module.default_block_tokens(req.inputs[0].shape[-1])}

    tiles.__doc__ = f"block_tokens: {module.default_block_tokens.__doc__.split(':', 1)[1].strip()}"
    return tiles


def _examples(impl: str):
    """Configurations of the kernel `impl` the deviceless compile check builds (tests/compile)."""

    def examples() -> list[tuple[str, object, tuple]]:
        post = (("renorm", 1e-20), ("scale", 2.5))
        ling = RouteParams(num_experts=256, k=8, score="sigmoid", selection_bias=True, n_group=8,
                           topk_group=4, weights_from="scores", post=post)  # fmt: skip
        mixtral = RouteParams(num_experts=8, k=2, post=(("renorm", 0.0),))
        out = []
        for name, p, t, dt in (
            ("ling_bf16_T4096", ling, 4096, jnp.bfloat16),
            ("mixtral_f32_T37", mixtral, 37, jnp.float32),
        ):
            kernel = select.Kernel(
                impl, (("block_tokens", _MODULES[impl].default_block_tokens(p.num_experts)),)
            )
            args = (jax.ShapeDtypeStruct((t, p.num_experts), dt),)
            args += (jax.ShapeDtypeStruct((p.num_experts,), dt),) if p.selection_bias else ()
            out.append((name, lambda x, b=None, p=p, kernel=kernel: route(x, p, bias=b, impl=kernel), args))
        return out

    return examples


_MODULES = {"pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu}
select.register_impls("route", tuple(IMPLS))
select.register(
    select.KernelRow(
        "route", "tpu", "pallas_tpu", dtypes=("float32", "bfloat16"), fits=_declines(pallas_tpu),
        tiles=_tiles(pallas_tpu), note="Pallas TPU (Mosaic): one kernel per token block",
        examples=_examples("pallas_tpu"),
    ),
    select.KernelRow("route", "tpu", "xla", note="XLA composite"),
    select.KernelRow(
        "route", "gpu", "pallas_gpu", dtypes=("float32", "bfloat16"), fits=_declines(pallas_gpu),
        tiles=_tiles(pallas_gpu), note="Pallas GPU (Triton): one program per token block",
        examples=_examples("pallas_gpu"),
    ),
    select.KernelRow("route", "gpu", "xla", note="XLA composite"),
    select.KernelRow("route", "cpu", "xla", note="XLA composite"),
)  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _route(params: RouteParams, kernel: select.Kernel, logits, bias, expert_scale):
    return IMPLS[kernel.impl](logits, params, bias, expert_scale, kernel)


def _route_fwd(params: RouteParams, kernel: select.Kernel, logits, bias, expert_scale):
    return _route(params, kernel, logits, bias, expert_scale), (logits, bias, expert_scale)


def _route_bwd(params: RouteParams, kernel: select.Kernel, residuals, cotangents):
    _, pullback = jax.vjp(lambda x, b, s: route_reference(x, params, b, s), *residuals)
    return pullback(cotangents)


_route.defvjp(_route_fwd, _route_bwd)


def route(
    logits: jax.Array,
    params: RouteParams,
    *,
    bias: jax.Array | None = None,
    expert_scale: jax.Array | None = None,
    impl: str | select.Kernel = "xla",
) -> tuple[jax.Array, ...]:
    """Route logits [..., E] to params.k experts.

    Returns (weights [..., k], ids int32 [..., k]), plus scores [..., E] when params.expose_scores.
    `bias` [E] is the selection bias (needed iff params.selection_bias), `expert_scale` [E] the
    per-expert weight scale (needed iff params has an ("expert_scale",) post step). `impl` names one
    of IMPLS, or is the `select.Kernel` the selection chose (with its tiles and interpret flag).
    Raises TypeError / ValueError for inputs that do not fit params.
    """
    kernel = impl if isinstance(impl, select.Kernel) else select.Kernel(impl)
    if kernel.impl not in IMPLS:
        raise ValueError(f"route: unknown impl {kernel.impl!r}; valid: {sorted(IMPLS)}")
    if not isinstance(params, RouteParams):
        raise TypeError(f"route: params must be a RouteParams, got {type(params).__name__}")
    logits = jnp.asarray(logits)
    bias = None if bias is None else jnp.asarray(bias)
    expert_scale = None if expert_scale is None else jnp.asarray(expert_scale)
    validate_inputs(logits, params, bias, expert_scale)
    return _route(params, kernel, logits, bias, expert_scale)
