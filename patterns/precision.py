"""In which dtypes a recognised expert FFN computes, read from the program's own matmuls.

The matcher looks through float casts to recognise an FFN; this module reads them back, so the
fused op rounds where the program rounds (the dtype fields of `MoeParams`), or the site is
declined with the reason::

    prec = ffn_precision(view, FfnValues(x, [[w_gate], [w_up], [w_down]], inputs, [weights], y, wdt))
    if isinstance(prec, str):
        return NoMatch(anchor, prec, OP)
    MoeParams(..., compute_dtype=prec.compute_dtype, projection_dtype=prec.projection_dtype, ...)

The projections are the matmuls (`dot_general`, `ragged_dot_general`) of a value computed from
the tokens by one computed from the expert weights alone; the down projections are those whose
token side comes from another projection. Read in the op's terms (as in `MoeParams`): the up
projections multiply in one cdt (operands of two dtypes convert to the preferred_element_type, as
JAX lowers them), every projection returns one pdt, its results are carried in one adt (a cast
of them, else pdt) where biases and the activation run, the hidden rows are cast at most once
(to hdt) before the down projection, which multiplies in result_type(hdt, cdt); the tokens and
weights reach the matmuls cast only to those dtypes; the expert outputs are combined in pdt, adt,
the combine dtype or the result's dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from moefuse import _compat as C
from moefuse.match import canonical_set, reads_input, region_of
from moefuse.view import View

_MATMULS = frozenset({"dot_general", "ragged_dot_general", "ragged_dot"})
# Equations that move or select values without computing on them (no rounding of their own).
_MOVES = frozenset({
    "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "gather", "slice",
    "dynamic_slice", "concatenate", "pad", "sharding_constraint", "copy", "copy_p", "rev",
})


@dataclasses.dataclass(frozen=True)
class FfnValues:
    """The values of a recognised block the precision is read between."""

    x: Any  # the tokens the fused op takes
    # W_gate, W_up, W_down: each the arrays the fused op takes for it (one stacked array, or the E arrays
    # of a matrix kept per expert, all of one dtype)
    expert_weights: Sequence[Sequence[Any]]
    inputs: Sequence[Any]  # every input of the fused op (router weights, ids, biases ...)
    router_weights: Sequence[Any]  # the weights the expert outputs are combined by
    y: Any  # the block's output
    combine_dtype: Any  # the dtype the combine runs in (MoeParams.weights_dtype)
    has_bias: bool = False
    scale_dtype: Any = None  # the dtype router weights scale the tokens in before the experts, or None


@dataclasses.dataclass(frozen=True)
class FfnPrecision:
    """The fused op's dtypes: None where the op's default (x's dtype, then cdt) is the program's."""

    compute_dtype: str | None
    projection_dtype: str | None
    activation_dtype: str | None
    hidden_dtype: str | None
    out_dtype: str | None  # the block's result dtype, where it is not the tokens'


@dataclasses.dataclass(frozen=True)
class _Projection:
    eqn: C.JaxprEqn
    x_side: Any  # the operand computed from the tokens
    down: bool  # its token side comes from another projection


@dataclasses.dataclass
class _Flow:
    """What each value in the region is computed from (forward, in equation order)."""

    from_x: set[Any] = dataclasses.field(default_factory=set)
    from_w: dict[Any, frozenset[int]] = dataclasses.field(default_factory=dict)  # which expert weights
    from_weights: set[Any] = dataclasses.field(default_factory=set)  # computed from the router weights
    after_proj: set[Any] = dataclasses.field(default_factory=set)
    after_down: set[Any] = dataclasses.field(default_factory=set)
    hidden: set[Any] = dataclasses.field(default_factory=set)  # h after its cast for the down projection
    results: set[Any] = dataclasses.field(default_factory=set)  # what the up projections return
    result_casts: dict[Any, Any] = dataclasses.field(default_factory=dict)  # a result cast: its dtype


def ffn_precision(view: View, vals: FfnValues) -> FfnPrecision | str:
    """The fused op's compute and projection dtypes for the block `vals`, or why they do not fit.

    >>> prec = ffn_precision(view, FfnValues(ffn.x, [[wg], [wu], [wd]], inputs, [weights], y, jnp.float32))
    >>> prec.projection_dtype  # ragged_dots of f32 rows with preferred_element_type=bf16
    'bfloat16'
    """
    region = sorted(region_of(view, vals.inputs, [vals.y]))
    xs = canonical_set(view, [vals.x])
    ws = [canonical_set(view, w) for w in vals.expert_weights]
    routing = canonical_set(view, vals.router_weights)
    flow = _Flow()
    projections: list[_Projection] = []
    for i in region:
        eqn = view.jaxpr.eqns[i]
        ins = [v for v in eqn.invars if not C.is_literal(v)]
        on_x = any(reads_input(view, v, xs) or v in flow.from_x for v in ins)
        on_w = frozenset().union(*(_weights_of(view, v, ws, flow) for v in ins))
        on_routing = any(reads_input(view, v, routing) or v in flow.from_weights for v in ins)
        proj = _projection(view, eqn, ws, flow, xs)
        outs = [v for v in eqn.outvars if not C.is_dropvar(v)]
        if proj is not None:
            down = proj in flow.after_proj
            projections.append(_Projection(eqn, proj, down))
            flow.after_proj.update(outs)
            if down:  # what the down projections return is read as combined (`_combine`)
                flow.after_down.update(outs)
            else:
                flow.results.update(outs)
        elif any(v in flow.after_proj for v in ins):
            flow.after_proj.update(outs)
            if any(v in flow.after_down for v in ins):
                flow.after_down.update(outs)
            _note_result_alias_or_cast(view, eqn, outs, flow)
        for v in outs:
            if on_x:
                flow.from_x.add(v)
            if on_w:
                flow.from_w[v] = on_w
            if on_routing:
                flow.from_weights.add(v)
    if not projections:
        return "no matmul of the tokens by the expert weights found to read the block's dtypes from"
    return _read(view, vals, region, flow, projections)


def _note_result_alias_or_cast(view: View, eqn: C.JaxprEqn, outs: list[Any], flow: _Flow) -> None:
    """A no-op of an up projection's result (`name`, a sharding constraint) is that result; a cast
    of it is the dtype the op carries results in (MoeParams.activation_dtype)."""
    if len(outs) != 1:
        return
    src = view.canon(outs[0])
    if src is not outs[0] and src in flow.results:
        flow.results.add(outs[0])
    elif eqn.primitive.name == "convert_element_type" and view.canon(eqn.invars[0]) in flow.results:
        flow.result_casts[outs[0]] = jnp.dtype(outs[0].aval.dtype)


def _weights_of(view: View, v: Any, ws: list[set[Any]], flow: _Flow) -> frozenset[int]:
    if C.is_literal(v):
        return frozenset()
    direct = frozenset(j for j, w in enumerate(ws) if reads_input(view, v, w))
    return direct | flow.from_w.get(v, frozenset())


def _projection(view: View, eqn: C.JaxprEqn, ws: list[set[Any]], flow: _Flow, xs: set[Any]) -> Any:
    """The token side when `eqn` multiplies a token value by an expert-weight-only value, else None."""
    if eqn.primitive.name not in _MATMULS or len(eqn.invars) < 2:
        return None
    a, b = eqn.invars[:2]

    def tokens(v: Any) -> bool:
        return not C.is_literal(v) and (reads_input(view, v, xs) or v in flow.from_x)

    for x_side, w_side in ((a, b), (b, a)):
        if tokens(x_side) and not tokens(w_side) and _weights_of(view, w_side, ws, flow):
            return x_side  # the weights may be gathered by the ids
    return None


def _read(
    view: View, vals: FfnValues, region: list[int], flow: _Flow, projections: list[_Projection]
) -> FfnPrecision | str:
    ups = [p.eqn for p in projections if not p.down]
    downs = [p.eqn for p in projections if p.down]
    if not ups or not downs:
        return "the expert projections were not found as matmuls before and after the activation"
    cdts = {_common(e) for e in ups}
    pdts = {jnp.dtype(p.eqn.outvars[0].aval.dtype) for p in projections}
    if len(cdts) > 1 or len(pdts) > 1:
        return (f"the expert projections compute in several dtypes (operands {_names(cdts)}, results "
                f"{_names(pdts)}), which the fused op does not reproduce")
    (cdt,), (pdt,) = cdts, pdts
    adts = set(flow.result_casts.values()) or {pdt}
    if len(adts) > 1:
        return f"the projections' results are cast to several dtypes ({_names(adts)})"
    (adt,) = adts
    hdts = {jnp.dtype(p.x_side.aval.dtype) for p in projections if p.down}
    if len(hdts) > 1:
        return f"the down projections read the hidden activations in several dtypes ({_names(hdts)})"
    (hdt,) = hdts
    ddt = jnp.result_type(hdt, cdt)  # the down projection reads h in hdt with cdt weights, as jnp does
    for e in downs:
        if _common(e) != ddt:
            return (f"the down projection computes in {_common(e).name}, not in {ddt.name} (its "
                    f"{hdt.name} input with {cdt.name} weights), which the fused op does not reproduce")
    rounded = pdt != cdt or adt != pdt or hdt != adt  # (biases are then added in adt: checked below)
    problem = _pre_projection(view, vals, region, flow, cdt, ddt)
    problem = problem or _activation(view, region, flow, projections, cdt, adt, hdt)
    problem = problem or _combine(view, vals, region, flow, {pdt, adt})
    if problem:
        return problem
    x_dtype = jnp.dtype(view.canon(vals.x).aval.dtype)
    y_dtype = jnp.dtype(vals.y.aval.dtype)
    return FfnPrecision(
        compute_dtype=None if cdt == x_dtype else cdt.name,
        projection_dtype=pdt.name if rounded else None,
        activation_dtype=adt.name if rounded and (adt != pdt or vals.has_bias) else None,
        hidden_dtype=None if hdt == adt else hdt.name,
        out_dtype=None if y_dtype == x_dtype else y_dtype.name,
    )


def _common(eqn: C.JaxprEqn) -> jnp.dtype:
    """The dtype a matmul multiplies in: operands of two dtypes are both converted to its
    preferred_element_type when that is set (as JAX lowers dot_general and ragged_dot), else
    promoted."""
    dtypes = {jnp.dtype(v.aval.dtype) for v in eqn.invars[:2]}
    pet = eqn.params.get("preferred_element_type")
    return jnp.dtype(pet) if len(dtypes) > 1 and pet is not None else jnp.result_type(*dtypes)


def _names(dtypes: set[Any]) -> str:
    return "/".join(sorted(jnp.dtype(d).name for d in dtypes))


def _floats(eqn: C.JaxprEqn) -> list[Any]:
    return [v for v in eqn.outvars if not C.is_dropvar(v) and jnp.issubdtype(v.aval.dtype, jnp.floating)]


def _pre_projection(view, vals: FfnValues, region, flow: _Flow, cdt, ddt) -> str | None:
    """Tokens and expert weights reach the projections cast only to the dtypes the fused op uses."""
    x_dtype = jnp.dtype(view.canon(vals.x).aval.dtype)
    w_dtypes = [jnp.dtype(view.canon(w[0]).aval.dtype) for w in vals.expert_weights]
    down_w = len(vals.expert_weights) - 1
    for i in region:
        eqn = view.jaxpr.eqns[i]
        for v in _floats(eqn):
            if v in flow.after_proj:
                continue
            allowed = {x_dtype, cdt} if v in flow.from_x else set()
            if v in flow.from_x and vals.scale_dtype is not None:  # the op scales the rows in that dtype
                allowed.add(jnp.dtype(vals.scale_dtype))
            for j in flow.from_w.get(v, ()):  # the op casts W_down to ddt, the others to cdt
                allowed |= {w_dtypes[j], ddt if j == down_w else cdt}
            if v in flow.from_x or v in flow.from_w:
                if jnp.dtype(v.aval.dtype) not in allowed:
                    return (f"the tokens or expert weights pass through {jnp.dtype(v.aval.dtype).name} "
                            f"(`{eqn.primitive.name}`) before a projection computing in {cdt.name}: "
                            "a rounding the fused op does not reproduce")
    return None


def _activation(view, region, flow: _Flow, projections, cdt, adt, hdt) -> str | None:
    """Between the projections everything is in adt, at most cast to hdt for the down projection."""
    proj_eqns = {id(p.eqn) for p in projections}
    for i in region:
        eqn = view.jaxpr.eqns[i]
        outs = [v for v in eqn.outvars if not C.is_dropvar(v)]
        if id(eqn) in proj_eqns or (outs and (outs[0] in flow.result_casts or outs[0] in flow.results)):
            continue
        ins = [v for v in eqn.invars if not C.is_literal(v)]
        if not any(v in flow.after_proj for v in ins) or any(v in flow.after_down for v in ins):
            continue
        name = eqn.primitive.name
        reads_cast = any(v in flow.hidden for v in ins)
        if adt != cdt and any(v in flow.from_weights for v in ins):
            return (f"the router weights scale the hidden activations in {adt.name} before the down "
                    "projection: the fused op combines after it")
        for v in _floats(eqn):
            dt = jnp.dtype(v.aval.dtype)
            cast = (name == "convert_element_type" and dt == hdt != adt
                    and jnp.dtype(eqn.invars[0].aval.dtype) == adt)
            if cast or (reads_cast and name in _MOVES and dt == hdt):
                flow.hidden.add(v)
            elif reads_cast:
                return (f"the hidden activations are computed on (`{name}`) after their cast to "
                        f"{hdt.name}: a rounding the fused op does not reproduce")
            elif dt != adt:
                return (f"the activation computes in {dt.name} (`{name}`) between projections that "
                        f"return {adt.name}: a rounding the fused op does not reproduce")
    return None


def _combine(view, vals: FfnValues, region, flow: _Flow, results: set[Any]) -> str | None:
    """The expert outputs are combined in their own dtypes, the combine dtype or the output dtype."""
    allowed = results | {jnp.dtype(vals.combine_dtype), jnp.dtype(vals.y.aval.dtype)}
    for i in region:
        eqn = view.jaxpr.eqns[i]
        for v in _floats(eqn):
            if v in flow.after_down and jnp.dtype(v.aval.dtype) not in allowed:
                return (f"the expert outputs are combined in {jnp.dtype(v.aval.dtype).name} "
                        f"(`{eqn.primitive.name}`), not in {_names(allowed)}")
    return None
