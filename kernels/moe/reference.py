"""Pure-jnp reference of the fused `moe_ffn` op: the definition every backend is tested against.

Written for clarity, not speed: every expert runs on every token (dense, E times the routed work),
then each assignment picks its expert's output with a gather (never a multiply by a one-hot mask, so
an inf or NaN in an expert a token was not routed to cannot leak into its output). Its VJP is the
dense one as well; the XLA implementation has its own routed backward.

Example (Mixtral-style SwiGLU experts, top-2 of 8)::

    import jax.numpy as jnp
    from moefuse.kernels.moe.params import MoeParams
    from moefuse.kernels.moe.reference import moe_ffn_reference

    p = MoeParams(num_experts=8, k=2, activation="swiglu")
    x, w = jnp.ones((4, 16)), jnp.full((4, 2), 0.5)
    ids = jnp.array([[0, 1], [2, 3], [4, 5], [6, 7]], jnp.int32)
    w_gate = w_up = jnp.ones((8, 16, 32)) * 0.01
    out = moe_ffn_reference(x, w, ids, (w_gate, w_up), jnp.ones((8, 32, 16)) * 0.01, p)  # [4, 16]
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from .params import MoeParams


@functools.partial(jax.tree_util.register_dataclass, data_fields=["arrays"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class PerExpert:
    """One expert matrix or bias kept as E separate arrays, expert e's in `arrays[e]`, each shaped like
    one expert's slice of the stacked array it stands for (no expert axis): `PerExpert((w_0, ..., w_7))`
    with every w_e [D, F] reads as a stacked [8, D, F]. `moe_ffn` accepts one wherever it takes a stacked
    expert array (all arrays of one PerExpert must agree in shape and dtype; `expert_weights` checks).

    Models that keep each expert as its own module (Grok-1, PhiMoE ports) hold their weights this way.
    The XLA schedules read expert e's array where they need it and never stack them (stacking would copy
    every expert's weights on every call).
    Its gradient is a PerExpert too, one array per expert.
    """

    arrays: tuple[jax.Array, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the stacked array it stands for: (E, *one expert's shape)."""
        return (len(self.arrays), *jnp.shape(self.arrays[0]))

    @property
    def dtype(self) -> Any:
        return jnp.result_type(self.arrays[0])


ExpertArray = jax.Array | PerExpert  # an expert matrix or bias: stacked on an expert axis, or per expert
ExpertWeights = dict[str, ExpertArray]  # keys: w_in, w_up (unfused GLU only), w_down, b_in, b_up, b_down


def has_per_expert(ew: ExpertWeights) -> bool:
    """Whether any expert matrix or bias is given as E separate arrays (`PerExpert`)."""
    return any(isinstance(a, PerExpert) for a in ew.values())


def _err(msg: str) -> str:
    return f"moe_ffn: {msg}"


def _shape(a: Any) -> tuple[int, ...]:
    return a.shape if isinstance(a, PerExpert) else tuple(jnp.shape(a))


def _check_float(name: str, a: Any) -> None:
    dtype = a.dtype if isinstance(a, PerExpert) else jnp.result_type(a)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(_err(f"{name} must be floating point, got {dtype}"))


def _check_per_expert(name: str, a: Any, num_experts: int) -> None:
    """A PerExpert `a` must hold num_experts arrays of one shape and dtype."""
    if not isinstance(a, PerExpert):
        return
    if not isinstance(a.arrays, tuple) or len(a.arrays) != num_experts:
        got = len(a.arrays) if isinstance(a.arrays, tuple | list) else type(a.arrays).__name__
        raise ValueError(_err(f"{name} as PerExpert must hold a tuple of E={num_experts} arrays, got {got}"))
    kinds = {(tuple(jnp.shape(v)), jnp.result_type(v)) for v in a.arrays}
    if len(kinds) != 1:
        found = ", ".join(f"{s} {d}" for s, d in sorted(kinds, key=str))
        raise ValueError(_err(f"{name}: the per-expert arrays differ in shape or dtype ({found})"))


def expert_weights(
    w_in: Any, w_down: Any, b_in: Any, b_down: Any, params: MoeParams
) -> ExpertWeights:
    """Validate the expert weights against params and return them as a flat dict.

    w_in: [E, D, F] for plain MLPs; for GLU activations a pair (w_gate, w_up) of [E, D, F], or one
    [E, D, 2F] array when params.fused_gate_up. b_in follows w_in ([E, F], pair, or [E, 2F]); b_down
    is [E, D]. Biases are required iff params.has_expert_bias. Each of these arrays may instead be a
    `PerExpert` of E arrays without the expert axis (w_gate as E arrays [D, F], b_down as E arrays
    [D], ...), independently of the others.
    """
    e = params.num_experts
    unfused_glu = params.is_glu and not params.fused_gate_up
    if unfused_glu:
        if not (isinstance(w_in, tuple | list) and len(w_in) == 2):
            raise TypeError(_err(f"activation {params.activation!r} without fused_gate_up needs w_in = "
                                 "(w_gate, w_up), two [E, D, F] arrays"))
        w = {"w_in": w_in[0], "w_up": w_in[1]}
    else:
        if isinstance(w_in, tuple | list):
            raise TypeError(_err("w_in must be one array here (a (w_gate, w_up) pair is only for GLU "
                                 "activations with fused_gate_up=False)"))
        w = {"w_in": w_in}
    w["w_down"] = w_down
    for name, a in w.items():
        _check_per_expert(name, a, e)
        _check_float(name, a)
    s_in, s_down = _shape(w["w_in"]), _shape(w_down)
    if len(s_in) != 3 or s_in[0] != e:
        f_name = "2F" if params.fused_gate_up else "F"
        raise ValueError(_err(f"w_in must be [E={e}, D, {f_name}], got {s_in}"))
    if len(s_down) != 3 or s_down[0] != e:
        raise ValueError(_err(f"w_down must be [E={e}, F, D], got {s_down}"))
    d, f = s_down[2], s_down[1]
    want_in = (e, d, 2 * f) if params.fused_gate_up else (e, d, f)
    if s_in != want_in:
        raise ValueError(_err(f"w_in must have shape {want_in} to match w_down {s_down}, got {s_in}"))
    if unfused_glu and _shape(w["w_up"]) != want_in:
        raise ValueError(_err(f"w_up must have shape {want_in}, got {_shape(w['w_up'])}"))
    if not params.has_expert_bias:
        if b_in is not None or b_down is not None:
            raise ValueError(_err("biases were given but params.has_expert_bias is False"))
        return w
    if b_in is None or b_down is None:
        raise ValueError(_err("params.has_expert_bias needs both b_in and b_down"))
    if unfused_glu:
        if not (isinstance(b_in, tuple | list) and len(b_in) == 2):
            raise TypeError(_err("b_in must be a pair (b_gate, b_up) like w_in"))
        b = {"b_in": b_in[0], "b_up": b_in[1]}
    else:
        if isinstance(b_in, tuple | list):
            raise TypeError(_err("b_in must be one array, like w_in"))
        b = {"b_in": b_in}
    b["b_down"] = b_down
    for name, a in b.items():
        _check_per_expert(name, a, e)
        _check_float(name, a)
        want = (e, d) if name == "b_down" else (e, want_in[2])
        if _shape(a) != want:
            raise ValueError(_err(f"{name} must have shape {want}, got {_shape(a)}"))
    return {**w, **b}


def validate_inputs(x: Any, weights: Any, ids: Any, ew: ExpertWeights, params: MoeParams) -> None:
    """Raise TypeError / ValueError when x, weights, ids do not fit params and the expert weights."""
    _check_float("x", x)
    _check_float("weights", weights)
    if jnp.result_type(ids) != jnp.int32:
        raise TypeError(_err(f"ids must be int32, got {jnp.result_type(ids)}"))
    sx, sw, si = _shape(x), _shape(weights), _shape(ids)
    if len(sx) != 2:
        raise ValueError(_err(f"x must be [T, D], got shape {sx}"))
    t, d = sx
    if si != (t, params.k):
        raise ValueError(_err(f"ids must be [T={t}, k={params.k}], got {si}"))
    if sw != (t, params.k):
        raise ValueError(_err(f"weights must be [T={t}, k={params.k}], got {sw}"))
    if _shape(ew["w_down"])[2] != d:
        raise ValueError(_err(f"expert weights are for D={_shape(ew['w_down'])[2]}, x has D={d}"))
    if params.capacity is not None and t % params.capacity_groups:
        raise ValueError(_err(f"T={t} is not divisible by capacity_groups={params.capacity_groups}"))


def compute_dtype(params: MoeParams, x: jax.Array) -> jnp.dtype:
    return jnp.dtype(params.compute_dtype) if params.compute_dtype else jnp.dtype(x.dtype)


def cast_expert_weights(ew: ExpertWeights, params: MoeParams, cdt: jnp.dtype) -> ExpertWeights:
    """The expert matrices as the op multiplies them: w_in / w_up in cdt, w_down in the dtype the down
    projection multiplies in (its hidden rows' dtype promoted with cdt, see MoeParams); biases in
    params.activation_dtype when set (they are added there), else in cdt."""
    hdt = params.hidden_dtype or params.activation_dtype or params.projection_dtype or cdt
    dtypes = {"w_down": jnp.result_type(hdt, cdt), "b_in": params.activation_dtype or cdt}
    dtypes["b_up"] = dtypes["b_down"] = dtypes["b_in"]
    return {name: jax.tree.map(lambda v, n=name: v.astype(dtypes.get(n, cdt)), a) for name, a in ew.items()}


def result_dtype(params: MoeParams, x: jax.Array) -> jnp.dtype:
    """The op's result dtype: params.out_dtype, else the tokens'."""
    return jnp.dtype(params.out_dtype) if params.out_dtype else jnp.dtype(x.dtype)


def output_dtype(params: MoeParams, cdt: jnp.dtype) -> jnp.dtype:
    """The dtype of each expert's output rows: the projections' dtype (see MoeParams)."""
    if not params.projection_dtype:
        return cdt
    return jnp.dtype(params.activation_dtype or params.projection_dtype)


def combine_dtype(params: MoeParams, cdt: jnp.dtype, weights: jax.Array) -> jnp.dtype:
    return jnp.dtype(params.weights_dtype) if params.weights_dtype else jnp.result_type(cdt, weights.dtype)


def split_gate_up(a: jax.Array, params: MoeParams) -> tuple[jax.Array, jax.Array]:
    """Split a fused [..., 2F] gate/up projection into (gate, up) per params.gate_up_layout."""
    if params.gate_up_layout == "interleaved":
        return a[..., 0::2], a[..., 1::2]
    f = a.shape[-1] // 2
    return a[..., :f], a[..., f:]


def activation(params: MoeParams, gate: jax.Array, up: jax.Array | None = None) -> jax.Array:
    """The expert activation: act(gate, up) for GLU activations, act(gate) for plain MLPs."""
    act = params.activation
    if act == "swiglu":
        return jax.nn.silu(gate) * up
    if act == "geglu":
        return jax.nn.gelu(gate, approximate=params.gelu_approximate) * up
    if act == "swiglu_oai":
        limit = params.swiglu_limit
        gate = jnp.minimum(gate, limit)
        up = jnp.clip(up, -limit, limit)
        return (up + 1) * (gate * jax.nn.sigmoid(gate * params.swiglu_alpha))
    if act == "gelu":
        return jax.nn.gelu(gate, approximate=params.gelu_approximate)
    if act == "relu":
        return jax.nn.relu(gate)
    return jax.nn.silu(gate)


def project(spec: str, a: jax.Array, w: jax.Array, params: MoeParams) -> jax.Array:
    """One projection `einsum(spec, a, w)`; with params.projection_dtype set, its result rounded to it
    and then cast to params.activation_dtype (when that is set)."""
    if not params.projection_dtype:
        return jnp.einsum(spec, a, w)
    common = jnp.result_type(a, w)  # promoted first: a mixed-dtype dot is left to the backend
    pdt = jnp.dtype(params.projection_dtype)
    out = jnp.einsum(spec, a.astype(common), w.astype(common), preferred_element_type=pdt)
    return out.astype(params.activation_dtype) if params.activation_dtype else out


def hidden_rows(h: jax.Array, params: MoeParams) -> jax.Array:
    """The activation's output as the down projection reads it (cast to params.hidden_dtype if set)."""
    return h.astype(params.hidden_dtype) if params.hidden_dtype else h


def expert_ffn(v: jax.Array, w: ExpertWeights, params: MoeParams) -> jax.Array:
    """One expert's FFN on rows v [..., D]; w holds that expert's weights (no expert axis)."""
    y = project("...f,fd->...d", expert_hidden(v, w, params), w["w_down"], params)
    return y + w["b_down"] if "b_down" in w else y


def expert_hidden(v: jax.Array, w: ExpertWeights, params: MoeParams) -> jax.Array:
    """One expert's hidden activations [..., F] on rows v [..., D] (the down projection's input)."""
    a = project("...d,df->...f", v, w["w_in"], params)
    if "b_in" in w:
        a = a + w["b_in"]
    if params.is_glu:
        if params.fused_gate_up:
            gate, up = split_gate_up(a, params)
        else:
            gate, up = a, project("...d,df->...f", v, w["w_up"], params)
            if "b_up" in w:
                up = up + w["b_up"]
        return hidden_rows(activation(params, gate, up), params)
    return hidden_rows(activation(params, a), params)


def live_mask_reference(ids: jax.Array, params: MoeParams) -> jax.Array:
    """live[t, j]: the assignment has an expert in range and, with a capacity, was not dropped."""
    in_range = (ids >= 0) & (ids < params.num_experts)
    if params.capacity is None:
        return in_range
    return in_range & (capacity_positions(ids, params) < params.capacity)


def capacity_positions(ids: jax.Array, params: MoeParams) -> jax.Array:
    """pos[t, j]: how many in-range assignments to the same expert come before (t, j) in its token
    group, in params.capacity_order (see MoeParams); 0 for an out-of-range assignment."""
    e = params.num_experts
    t, k = ids.shape
    g = params.capacity_groups
    onehot = jax.nn.one_hot(ids, e, dtype=jnp.int32)  # [T, k, E]; out-of-range ids are all-zero rows
    grouped = onehot.reshape(g, t // g, k, e)
    if params.capacity_order == "slot_major":  # priority (j, t): cumsum over slots-then-tokens
        prio = jnp.swapaxes(grouped, 1, 2).reshape(g, k * (t // g), e)
        pos = (jnp.cumsum(prio, axis=1) - prio).reshape(g, k, t // g, e)
        pos = jnp.swapaxes(pos, 1, 2)
    else:  # priority (t, j)
        prio = grouped.reshape(g, (t // g) * k, e)
        pos = (jnp.cumsum(prio, axis=1) - prio).reshape(g, t // g, k, e)
    return jnp.sum(pos.reshape(t, k, e) * onehot, axis=-1)


def moe_ffn_reference(
    x: jax.Array,
    weights: jax.Array,
    ids: jax.Array,
    w_in: Any,
    w_down: ExpertArray,
    params: MoeParams,
    b_in: Any = None,
    b_down: ExpertArray | None = None,
) -> jax.Array:
    """out [T, D] in params.out_dtype or x's dtype; semantics: see `MoeParams`. Argument layouts: see
    `expert_weights`."""
    ew = expert_weights(w_in, w_down, b_in, b_down, params)
    validate_inputs(x, weights, ids, ew, params)
    return routed_ffn_reference(x, weights, ids, ew, params)


def routed_ffn_reference(
    x: jax.Array, weights: jax.Array, ids: jax.Array, ew: ExpertWeights, params: MoeParams
) -> jax.Array:
    """`moe_ffn_reference` on validated inputs, with the expert weights as `expert_weights` returns."""
    y, live = assignment_outputs(x, weights, ids, ew, params)
    return combine_assignments(x, weights, y, live, params)


def assignment_outputs(
    x: jax.Array, weights: jax.Array, ids: jax.Array, ew: ExpertWeights, params: MoeParams
) -> tuple[jax.Array, jax.Array]:
    """(y [T, k, D], live [T, k]): each assignment's expert output, computed by running every expert on
    every token (or, with params.weights_on_input, on every scaled row) and picking the assignment's
    own (a gather: an expert a token was not routed to never reaches its row), and whether the
    assignment is live (`live_mask_reference`). Per-expert arrays are read where they are, one expert
    at a time (their outputs are stacked, not their weights)."""
    cdt = compute_dtype(params, x)
    ew = cast_expert_weights(ew, params, cdt)
    live = live_mask_reference(ids, params)
    safe_ids = jnp.where(live, ids, 0)
    tokens = lax.broadcasted_iota(jnp.int32, ids.shape, 0)
    # y_all[e, t] = FFN_e(x[t]), or with weights on the input y_all[e, t, j] = FFN_e(v[t, j])
    v = scaled_tokens(x, weights, cdt) if params.weights_on_input else x.astype(cdt)
    if has_per_expert(ew):
        y_all = jnp.stack([expert_ffn(v, _one_expert(ew, e), params) for e in range(params.num_experts)])
    else:
        y_all = jax.vmap(lambda w: expert_ffn(v, w, params))(ew)
    if params.weights_on_input:
        return y_all[safe_ids, tokens, lax.broadcasted_iota(jnp.int32, ids.shape, 1)], live
    return y_all[safe_ids, tokens], live


def _one_expert(ew: ExpertWeights, e: int) -> dict[str, jax.Array]:
    """Expert e's arrays (no expert axis): a PerExpert's e-th array, a stacked array's e-th slice."""
    return {name: a.arrays[e] if isinstance(a, PerExpert) else a[e] for name, a in ew.items()}


def combine_assignments(
    x: jax.Array, weights: jax.Array, y: jax.Array, live: jax.Array, params: MoeParams
) -> jax.Array:
    """out [T, D]: the live assignments' outputs y [T, k, D] weighted by their router weights (summed
    as they are with params.weights_on_input, whose rows were scaled before the experts), in the
    combine dtype, then cast to the op's result dtype."""
    wdt = combine_dtype(params, compute_dtype(params, x), weights)
    contrib = y.astype(wdt) if params.weights_on_input else weights.astype(wdt)[..., None] * y.astype(wdt)
    contrib = jnp.where(live[..., None], contrib, jnp.zeros((), wdt))
    return jnp.sum(contrib, axis=1).astype(result_dtype(params, x))


def scaled_tokens(x: jax.Array, weights: jax.Array, cdt: jnp.dtype) -> jax.Array:
    """The rows [T, k, D] the experts run on with params.weights_on_input: each token times each of its
    weights, in result_type(x, weights) as jnp multiplies them, then cast to cdt (see `MoeParams`)."""
    sdt = jnp.result_type(x, weights)
    v = x.astype(sdt)[:, None, :] * weights.astype(sdt)[..., None]
    if sdt != cdt and jnp.promote_types(sdt, cdt) == cdt:
        # the product rounded to sdt is kept when cast up: XLA may drop a cast down and back up (it
        # allows excess precision), but not an explicit reduce_precision
        info = jnp.finfo(sdt)
        return lax.reduce_precision(v.astype(cdt), exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return v.astype(cdt)


def scaled_tokens_vjp(x: jax.Array, weights: jax.Array, drows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(dx [T, D], dweights [T, k]) for the cotangent drows [T, k, D] of `scaled_tokens`: the product's
    gradients in its dtype, summed over the k slots for x, over D for the weights."""
    sdt = jnp.result_type(x, weights)
    drows = drows.astype(sdt)
    dx = jnp.sum(drows * weights.astype(sdt)[..., None], axis=1).astype(x.dtype)
    dweights = jnp.sum(drows * x.astype(sdt)[:, None, :], axis=-1).astype(weights.dtype)
    return dx, dweights
