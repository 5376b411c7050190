"""Shared experts: an always-on FFN of the same tokens, added to the routed output (DeepSeek, Ling,
Qwen2-MoE with a sigmoid gate). A recognised one joins the `moe` op, so the whole block is one op::

    routed = ...                                                      # the routed experts' combine
    shared = (jax.nn.silu(x @ s_gate) * (x @ s_up)) @ s_down          # [T, D], weights [D, F], [F, D]
    y = routed + jax.nn.sigmoid(x @ w_sg) * shared                     # the gate is optional
    # -> moe(x, weights, ids, ..., shared=(s_gate, s_up, s_down, w_sg))

`with_shared_expert(view, proposal, x)` widens a routed-block proposal when its output's only use
is such an add; anything not recognised leaves the proposal as it was (the shared expert then
stays as the program wrote it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from moefuse import idioms
from moefuse.match import Proposal, escaping, region_of
from moefuse.patterns.activations import activation_of, kernel_activation
from moefuse.patterns.dots import Cols, column_slice
from moefuse.view import View

SUPPORTED = (
    (
        "moe",
        "shared expert (part of the block)",
        "`routed + ffn(x)` or `routed + sigmoid(x @ w_sg) * ffn(x)` after any routed spelling but capacity; "
        "ffn: `act(x @ Wg) * (x @ Wu) @ Wd` or a plain MLP, `[in, out]` or torch `.T` weights, split gate/up",
        "shared_expert (its activation), shared_gate",
    ),
)


@dataclasses.dataclass(frozen=True)
class SharedFfn:
    """act(x . W_gate) [* (x . W_up)] . W_down [* sigmoid(x . W_sg)], each W 2-D in the program's layout."""

    projections: tuple[tuple[Any, int, Cols | None], ...]  # (W, its contracted dim, columns) gate, up, down
    activation: str
    act_params: tuple[tuple[str, float], ...]
    sigmoid_gate: tuple[Any, int] | None  # (W_sg, its contracted dim)
    dtype: Any  # the dtype the program adds the shared output in


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(a.aval.shape)


def _matmul(view: View, atom: Any, lhs: Any | None) -> tuple[Any, Any, int, Cols | None] | None:
    """(lhs, W, W's contracted dim, columns) for atom = lhs[..T, n] . W (W 2-D), maybe cut to columns."""
    cut = column_slice(view, atom)
    if cut is not None:
        got = _matmul(view, cut[0], lhs)
        if got is None or got[3] is not None or cut[1] != len(_shape(atom)) - 1:
            return None
        return (*got[:3], cut[2])
    eqn = view.producer(view.canon(atom))
    if eqn is None or eqn.primitive.name != "dot_general":
        return None
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    a, w = (view.canon(v) for v in eqn.invars)
    if lb or rb or len(_shape(w)) != 2 or len(lc) != 1 or tuple(lc) != (len(_shape(a)) - 1,):
        return None
    if lhs is not None and not view.same(a, lhs):
        return None
    return a, w, int(rc[0]), None


def shared_ffn(view: View, atom: Any, x: Any) -> SharedFfn | None:
    """The shared expert computing `atom` from the tokens x, or None."""
    dtype = view.canon(atom).aval.dtype
    atom = view.uncast(atom)
    sig = None
    if view.op(atom) == "mul":
        for s, other in (view.args(atom), view.args(atom)[::-1]):
            gate, dims = idioms.unexpand(view, s)
            z = idioms.sigmoid(view, gate)
            # the [..T, 1] gate must scale each token's row: its token dims stay where they are
            if any(dims.get(i) != i for i in range(len(_shape(gate)) - 1)):
                continue
            got = None if z is None else _matmul(view, z, x)
            if got is not None and _shape(got[1])[1 - got[2]] == 1 and got[3] is None:
                sig, atom = (got[1], got[2]), view.canon(other)
                break
    down = _matmul(view, atom, None)
    if down is None or down[3] is not None:
        return None
    inner = activation_of(view, down[0])
    if inner is None:
        return None
    act, gate, up, act_params = inner
    g = _matmul(view, gate, x)
    u = None if up is None else _matmul(view, up, x)
    if g is None or (up is not None and u is None):
        return None
    projs = [(g[1], g[2], g[3])] + ([] if u is None else [(u[1], u[2], u[3])]) + [(down[1], down[2], None)]
    return SharedFfn(tuple(projs), act, act_params, sig, dtype)


def with_shared_expert(view: View, prop: Proposal, x: Any) -> Proposal:
    """`prop` widened to `routed + shared(x)` when the routed output's only use is that add."""
    (y,) = prop.outputs
    users = view.users(y)
    if len(users) != 1 or users[0].primitive.name != "add":
        return prop
    add = users[0]
    y_first = view.canon(add.invars[0]) is y
    other = view.canon(add.invars[1 if y_first else 0])
    ffn = None if other is y else shared_ffn(view, other, x)
    if ffn is None:
        return prop
    weights = [w for w, _, _ in ffn.projections] + ([ffn.sigmoid_gate[0]] if ffn.sigmoid_gate else [])
    n_routed, routed_emit = len(prop.inputs), prop.emit

    def emit(kernel: str, *vals: Any) -> list[Any]:
        (routed,) = routed_emit(kernel, *vals[:n_routed])
        shared = _shared_value(ffn, vals[0], list(vals[n_routed:]))
        return [routed + shared if y_first else shared + routed]

    params = dict(prop.params, shared_expert=ffn.activation, shared_gate=ffn.sigmoid_gate is not None)
    wider = dataclasses.replace(
        prop, inputs=prop.inputs + weights, outputs=[add.outvars[0]], params=params, emit=emit, expose=None
    )
    routed_region = region_of(view, prop.inputs, prop.outputs)
    if escaping(view, region_of(view, wider.inputs, wider.outputs) - routed_region, wider.outputs):
        return prop  # the shared expert's values are used elsewhere too: it stays as written
    return wider


def _shared_value(ffn: SharedFfn, x: Any, ws: list[Any]) -> jax.Array:
    """The shared expert's output from the weight values `ws` (in `ffn.projections` order, then W_sg)."""
    from moefuse.kernels.moe import MoeParams
    from moefuse.kernels.moe.reference import activation

    def proj(v: Any, w: Any, c: int, cols: Cols | None) -> Any:
        out = jnp.tensordot(v, w, axes=(v.ndim - 1, c))
        return out if cols is None else jax.lax.slice_in_dim(out, cols[0], cols[1], cols[2], axis=-1)

    p = MoeParams(1, 1, **kernel_activation(ffn.activation), **dict(ffn.act_params))
    ins = [proj(x, w, c, cols) for w, (_, c, cols) in zip(ws, ffn.projections[:-1], strict=False)]
    _, c_down, _ = ffn.projections[-1]
    out = proj(activation(p, *ins), ws[len(ins)], c_down, None)
    if ffn.sigmoid_gate is not None:
        out = jax.nn.sigmoid(proj(x, ws[len(ins) + 1], ffn.sigmoid_gate[1], None)) * out
    return out.astype(ffn.dtype)
