"""Expert-FFN recognition: which values are `act(x @ W_gate[e]) * (x @ W_up[e]) @ W_down[e]`.

Works on labelled dimensions: every recognised value carries a tuple of labels ("T0", "T1" ... for
x's token dims in order, "E" experts, "F" the expert hidden dim, "D" the model dim), tracked through
`dot_general` and `transpose`, so any einsum spelling and dim order is understood::

    ffn = dense_expert_outputs(view, o, num_experts)   # o holds FFN_e(x[t]) for every (t, e)
    ffn.x, ffn.w_gate, ffn.w_up, ffn.w_down, ffn.activation, ffn.labels   # labels e.g. ("T0","E","D")
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from moefuse import _compat as C
from moefuse import idioms
from moefuse.rewrite import inline_jits
from moefuse.view import View

SQRT_2_OVER_PI = 0.7978845834732056
GELU_TANH_C = 0.044714998453855515
INV_SQRT2 = 0.7071067690849304


Cols = tuple[int, int, int]
"""(start, limit, stride) of the columns a projection keeps along F (a slice of a fused gate/up)."""


class Bias(NamedTuple):
    """A per-expert bias added after a projection: `array` has dims `labels` (("E", "F") or ("E", "D"))."""

    array: Any
    labels: tuple[str, ...]
    cols: Cols | None  # the bias was added before the projection was cut to these columns


@dataclasses.dataclass(frozen=True)
class ExpertFfn:
    x: Any  # tokens [T, D]
    w_gate: Any  # [E, D, F]-like stacked weight (its own dim order, see w_*_dims)
    w_up: Any | None  # None for a plain (non-gated) MLP
    w_down: Any
    activation: str  # "swiglu", "geglu", "geglu_tanh", "gelu", "gelu_tanh", "relu", "silu"
    labels: tuple[str, ...]  # labels of the expert-output value
    w_gate_dims: tuple[str, ...]
    w_up_dims: tuple[str, ...] | None
    w_down_dims: tuple[str, ...]
    gate_cols: Cols | None = None  # columns of w_gate's F dim it uses (halves of a fused gate_up weight)
    up_cols: Cols | None = None
    biases: tuple[Bias | None, ...] = (None, None, None)
    """Biases added after the gate, up and down projections, or None each."""
    act_params: tuple[tuple[str, float], ...] = ()  # e.g. (("swiglu_alpha", 1.702), ("swiglu_limit", 7.0))


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(a.aval.shape)


def kernel_activation(name: str) -> dict[str, Any]:
    """MoeParams fields for a recognised activation name ("gelu_tanh" -> gelu, approximate=True)."""
    base = {"geglu_tanh": "geglu", "gelu_tanh": "gelu"}.get(name, name)
    return {"activation": base, "gelu_approximate": name.endswith("_tanh")}


def token_labels(n: int) -> tuple[str, ...]:
    """Labels of n token dims, in the order of x's dims: ("T0", "T1", ...)."""
    return tuple(f"T{i}" for i in range(n))


def _through_transpose(view: View, atom: Any) -> tuple[Any, tuple[int, ...]]:
    """(base, perm) with atom == transpose(base, perm) (identity perm when not transposed)."""
    atom = view.canon(atom)
    eqn = view.producer(atom)
    if eqn is not None and eqn.primitive.name == "transpose":
        return view.canon(eqn.invars[0]), tuple(eqn.params["permutation"])
    return atom, tuple(range(len(_shape(atom))))


def _down_labels(labels: tuple[str, ...]) -> tuple[str, ...]:
    """Labels of a down projection's weight: it contracts F and keeps D (a projection's own labels
    call the contracted dim "D" and the output dim "F")."""
    return tuple({"D": "F", "F": "D"}.get(c, c) for c in labels)


def _dot(view: View, atom: Any) -> tuple[Any, Any, tuple, tuple, tuple, tuple] | None:
    eqn = view.producer(atom)
    if eqn is None or eqn.primitive.name != "dot_general":
        return None
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = (view.canon(v) for v in eqn.invars)
    return lhs, rhs, tuple(lc), tuple(rc), tuple(lb), tuple(rb)


def _dot_labels(lhs_l, rhs_l, lc, rc, lb, rb) -> tuple[str, ...]:
    free_l = [lab for i, lab in enumerate(lhs_l) if i not in lc and i not in lb]
    free_r = [lab for i, lab in enumerate(rhs_l) if i not in rc and i not in rb]
    return tuple([lhs_l[i] for i in lb] + free_l + free_r)


def _strip_bias(view: View, atom: Any) -> tuple[Any, Any, dict[int, int] | None]:
    """(inner, bias, bias dim -> atom dim) for atom = inner + broadcast(bias [a, b]).

    (atom, None, None) when there is no such bias.
    """
    atom = view.canon(atom)
    if view.op(atom) != "add":
        return atom, None, None
    for inner, b in (view.args(atom), view.args(atom)[::-1]):
        base, dims = idioms.unexpand(view, b)
        if len(_shape(base)) == 2 and len(dims) == 2 and len(_shape(inner)) == len(_shape(atom)):
            if view.op(inner) in ("dot_general", "transpose", "slice", "split"):
                return view.canon(inner), base, dims
    return atom, None, None


def _bias_labels(bias: Any, dims: dict[int, int] | None, labels: tuple[str, ...], want: set[str]):
    """Bias(bias, its labels) when the bias runs along exactly the `want` dims, None without bias."""
    if bias is None:
        return None
    got = tuple(labels[dims[i]] for i in range(2))
    return Bias(bias, got, None) if set(got) == want else False


def column_slice(view: View, atom: Any) -> tuple[Any, int, Cols] | None:
    """(inner, axis, cols) if atom keeps the columns start:limit:stride of inner along one axis.

    Spelled as a `slice` (`a[..., :F]`, `a[..., ::2]`) or one part of a `split`.
    """
    atom = view.canon(atom)
    eqn = view.producer(atom)
    if eqn is None or eqn.primitive.name not in ("slice", "split"):
        return None
    inner = view.canon(eqn.invars[0])
    if eqn.primitive.name == "split":
        axis, sizes, part = eqn.params["axis"], eqn.params["sizes"], view.out_index(atom)
        return inner, axis, (int(sum(sizes[:part])), int(sum(sizes[: part + 1])), 1)
    shape = _shape(inner)
    starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params.get("strides") or (1,) * len(shape)
    cut = [d for d in range(len(shape)) if (starts[d], limits[d], strides[d]) != (0, shape[d], 1)]
    if len(cut) != 1:
        return None
    d = cut[0]
    return inner, d, (int(starts[d]), int(limits[d]), int(strides[d]))


def _cut_bias(bias: Bias | None | bool, cols: Cols) -> Bias | None | bool:
    """A bias of the whole fused projection, seen from the columns `cols` of it."""
    return bias._replace(cols=cols) if isinstance(bias, Bias) else bias


def dense_expert_outputs(view: View, out: Any, num_experts: int) -> ExpertFfn | None:
    """Recognise `out` as the down projection of every expert on every token (+ biases)."""
    base, perm = _through_transpose(view, out)
    if view.op(base) == "convert_element_type":  # outputs upcast before the combine
        base, perm2 = _through_transpose(view, view.args(base)[0])
        perm = tuple(perm2[p] for p in perm)
    base, b_down, b_down_map = _strip_bias(view, base)
    if b_down is not None:
        base, perm3 = _through_transpose(view, base)
        b_down_map = {i: perm3[d] for i, d in b_down_map.items()}
        perm = tuple(perm3[p] for p in perm)
    got = _dot(view, base)
    if got is None:
        return None
    lhs, rhs, lc, rc, lb, rb = got
    for act_side, w_side, ac, wc, ab, wb in ((lhs, rhs, lc, rc, lb, rb), (rhs, lhs, rc, lc, rb, lb)):
        if len(_shape(w_side)) != 3 or len(wb) != 1 or len(wc) != 1 or _shape(w_side)[wb[0]] != num_experts:
            continue
        inner = activation_of(view, act_side)
        if inner is None:
            continue
        act, gate, up, act_params = inner
        g = _up_projection(view, gate, num_experts)
        if g is None:
            continue
        x, w_gate, g_labels, wg_dims, g_cols, g_bias = g
        u = None if up is None else _up_projection(view, up, num_experts)
        if up is not None and (u is None or u[0] is not x or u[2] != g_labels):
            continue
        if g_bias is False or (u is not None and u[5] is False):
            continue
        if (g_cols is None) != (u is None or u[4] is None):
            continue  # both halves of one fused weight, or two separate weights
        # the activation's E and F dims must be the ones the down projection batches / contracts
        if len(ab) != 1 or len(ac) != 1 or g_labels[ab[0]] != "E" or g_labels[ac[0]] != "F":
            continue
        wd_dims = ["?"] * 3
        wd_dims[wb[0]], wd_dims[wc[0]] = "E", "F"
        wd_dims[next(i for i in range(3) if i not in (wb[0], wc[0]))] = "D"
        if w_side is lhs:
            labels = _dot_labels(tuple(wd_dims), g_labels, wc, ac, wb, ab)
        else:
            labels = _dot_labels(g_labels, tuple(wd_dims), ac, wc, ab, wb)
        down_bias = _bias_labels(b_down, b_down_map, labels, {"E", "D"})
        if down_bias is False:
            continue
        labels = tuple(labels[p] for p in perm)
        return ExpertFfn(
            x=x,
            w_gate=w_gate,
            w_up=None if u is None else u[1],
            w_down=w_side,
            activation=act,
            labels=labels,
            w_gate_dims=wg_dims,
            w_up_dims=None if u is None else u[3],
            w_down_dims=tuple(wd_dims),
            gate_cols=g_cols,
            up_cols=None if u is None else u[4],
            biases=(g_bias, None if u is None else u[5], down_bias),
            act_params=act_params,
        )
    return None


def _up_projection(view: View, atom: Any, num_experts: int) -> tuple | None:
    """(x, W, labels of atom, labels of W, F column range or None, bias) for atom = x . W[E, D, F].

    A slice along F of such a product (gate and up halves of a fused [E, D, 2F] weight) is
    returned with the column range it keeps. bias is None, (bias, its labels) for `+ b[E, F]`,
    or False for an addend that is not a per-expert bias.
    """
    inner, bias, bias_map = _strip_bias(view, atom)
    if bias is not None:
        got = _up_projection(view, inner, num_experts)
        if got is None or got[5] is not None:
            return None
        return (*got[:5], _bias_labels(bias, bias_map, got[2], {"E", "F"}))
    cut = column_slice(view, atom)
    if cut is not None:
        inner_atom, axis, cols = cut
        inner = _up_projection(view, inner_atom, num_experts)
        if inner is None or inner[4] is not None or inner[2][axis] != "F":
            return None
        return (*inner[:4], cols, _cut_bias(inner[5], cols))
    base, perm = _through_transpose(view, atom)
    got = _dot(view, base)
    if got is None:
        return None
    lhs, rhs, lc, rc, lb, rb = got
    if lb or rb or len(lc) != 1:
        return None
    for x_side, w_side, xc, wc in ((lhs, rhs, lc, rc), (rhs, lhs, rc, lc)):
        if len(_shape(x_side)) < 2 or len(_shape(w_side)) != 3:
            continue
        free = [i for i in range(3) if i != wc[0]]
        e_dims = [i for i in free if _shape(w_side)[i] == num_experts]
        if not e_dims:
            continue
        e_dim = e_dims[0]
        f_dim = next(i for i in free if i != e_dim)
        w_labels = ["?"] * 3
        w_labels[e_dim], w_labels[f_dim], w_labels[wc[0]] = "E", "F", "D"
        if xc[0] != len(_shape(x_side)) - 1:
            continue  # tokens must be [..T, D]
        x_labels = [*token_labels(len(_shape(x_side)) - 1), "D"]
        if x_side is lhs:
            labels = _dot_labels(tuple(x_labels), tuple(w_labels), xc, wc, (), ())
        else:
            labels = _dot_labels(tuple(w_labels), tuple(x_labels), wc, xc, (), ())
        labels = tuple(labels[p] for p in perm)
        return x_side, w_side, labels, tuple(w_labels), None, None
    return None


def activation_of(view: View, atom: Any) -> tuple[str, Any, Any | None, tuple] | None:
    """(name, gate, up, params) for a gated activation act(gate) * up, or (name, h, None, ()) for act(h).

    A cast of the result (the program rounds the hidden activations) is looked through.
    """
    atom = view.canon(atom)
    if view.op(atom) == "convert_element_type":
        atom = view.args(atom)[0]
    if view.op(atom) == "mul":
        oai = _swiglu_oai(view, atom)
        if oai is not None:
            return oai
        a, b = view.args(atom)
        for g_side, u_side in ((a, b), (b, a)):
            inner = _plain_activation(view, g_side)
            if inner is not None and inner[0] in ("silu", "gelu", "gelu_tanh"):
                name = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}[inner[0]]
                return name, inner[1], u_side, ()
    inner = _plain_activation(view, atom)
    return None if inner is None else (inner[0], inner[1], None, ())


def _swiglu_oai(view: View, atom: Any) -> tuple[str, Any, Any, tuple] | None:
    """GPT-OSS's clamped SwiGLU: (clip(u, -L, L) + 1) * (g' * sigmoid(alpha * g')), g' = min(g, L)."""
    a, b = view.args(atom)
    for lin, glu in ((a, b), (b, a)):
        u_clip = _with_const(view, lin, "add", 1.0)
        clipped = None if u_clip is None else _clip(view, u_clip)
        if clipped is None or view.op(glu) != "mul":
            continue
        up, lo, hi = clipped
        for g, sig in (view.args(glu), view.args(glu)[::-1]):
            z = idioms.sigmoid(view, sig)
            scaled = None if z is None or view.op(z) != "mul" else _scalar_operand(view, z)
            capped = _scalar_operand(view, g) if view.op(g) == "min" else None
            if scaled is None or capped is None or not view.same(scaled[0], g):
                continue
            (gate, limit), alpha = capped, scaled[1]
            if (lo, hi) == (-limit, limit):
                return "swiglu_oai", gate, up, (("swiglu_alpha", alpha), ("swiglu_limit", limit))
    return None


def _scalar_operand(view: View, atom: Any) -> tuple[Any, float] | None:
    """(x, c) for a binary op of an array x and a scalar constant c (either order)."""
    a, b = view.args(atom)
    for x, c in ((a, b), (b, a)):
        if view.scalar(c) is not None and view.scalar(x) is None:
            return view.canon(x), float(view.scalar(c))
    return None


def _clip(view: View, atom: Any) -> tuple[Any, float, float] | None:
    """(x, lo, hi) for min(max(x, lo), hi) or max(min(x, hi), lo), as jnp.clip spells it."""
    outer = view.op(atom)
    if outer not in ("min", "max"):
        return None
    got = _scalar_operand(view, atom)
    inner = None if got is None or view.op(got[0]) != {"min": "max", "max": "min"}[outer] else got[0]
    got2 = None if inner is None else _scalar_operand(view, inner)
    if got2 is None:
        return None
    return (got2[0], got2[1], got[1]) if outer == "min" else (got2[0], got[1], got2[1])


def _plain_activation(view: View, atom: Any) -> tuple[str, Any] | None:
    atom = view.canon(atom)
    name = view.op(atom)
    args = view.args(atom)
    if name == "mul":
        a, b = args
        for h, s in ((a, b), (b, a)):
            if idioms.sigmoid(view, s) is not None and view.same(idioms.sigmoid(view, s), h):
                return "silu", h
        got = _gelu_tanh(view, atom)
        if got is not None:
            return "gelu_tanh", got
        got = _gelu_erf(view, atom)
        if got is not None:
            return "gelu", got
    if name == "max":
        a, b = args
        for h, z in ((a, b), (b, a)):
            if view.scalar(z) == 0.0:
                return "relu", h
    if name in C.CUSTOM_JVP_NAMES:  # jax.nn.relu and friends: look inside the primal body
        eqn = view.producer(atom)
        body = inline_jits(C.as_closed(eqn.params["call_jaxpr"]))
        got = _plain_activation(View(body), body.jaxpr.outvars[0])
        if got is not None and got[1] in body.jaxpr.invars and not eqn.params.get("num_consts", 0):
            return got[0], view.canon(eqn.invars[body.jaxpr.invars.index(got[1])])
    return None


def _with_const(view: View, atom: Any, op: str, const: float) -> Any | None:
    """y if atom is `op(y, const)` or `op(const, y)` (const matched to float32 rounding)."""
    if view.op(atom) != op:
        return None
    a, b = view.args(atom)
    for y, c in ((a, b), (b, a)):
        val = view.value(c)
        if val is not None and val.size and _close(view.scalar(c), float(np.asarray(const, val.dtype))):
            return y  # the constant as the program's dtype rounds it (bf16 1/sqrt(2) is 0.70703125)
    return None


def _gelu_tanh(view: View, atom: Any) -> Any | None:
    """x for x * (0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))) as jax.nn.gelu spells it."""
    a, b = view.args(atom)
    for x, h in ((a, b), (b, a)):
        one_plus = _with_const(view, h, "mul", 0.5)
        t = None if one_plus is None else _with_const(view, one_plus, "add", 1.0)
        if t is None or view.op(t) != "tanh":
            continue
        poly = _with_const(view, view.args(t)[0], "mul", SQRT_2_OVER_PI)
        if poly is None or view.op(poly) != "add":
            continue
        for xx, cube in (view.args(poly), view.args(poly)[::-1]):
            pw = _with_const(view, cube, "mul", GELU_TANH_C)
            if view.same(xx, x) and pw is not None and view.op(pw) == "integer_pow":
                if view.params(pw)["y"] == 3 and view.same(view.args(pw)[0], x):
                    return x
    return None


def _gelu_erf(view: View, atom: Any) -> Any | None:
    """x for (0.5 * x) * erfc(-x / sqrt(2)) as jax.nn.gelu(approximate=False) spells it."""
    a, b = view.args(atom)
    for half_x, e in ((a, b), (b, a)):
        x = _with_const(view, half_x, "mul", 0.5)
        if x is None or view.op(e) != "erfc":
            continue
        neg = _with_const(view, view.args(e)[0], "mul", INV_SQRT2)
        if neg is not None and view.op(neg) == "neg" and view.same(view.args(neg)[0], x):
            return x
    return None


def _close(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= 1e-6 * max(abs(b), 1e-30)


def gathered_expert_outputs(view: View, out: Any) -> tuple[ExpertFfn, Any] | None:
    """(ffn, ids) if out[..t, j] = FFN_{ids[..t, j]}(x[..t]) with weights gathered by ids (`w[ids]`).

    Token dims may be several ([B, S, D] tokens with [B, S, K] ids): labelled "T0", "T1", ...
    Biases gathered the same way (`b[ids]`) and gate/up halves of one fused weight are understood.
    """
    base, perm = _through_transpose(view, out)
    down = _gathered(view, base, up=False)
    if down is None or down.cols is not None:
        return None
    inner = activation_of(view, down.act)
    if inner is None:
        return None
    act, gate, up, act_params = inner
    g = _gathered(view, gate, up=True)
    u = None if up is None else _gathered(view, up, up=True)
    if g is None or (up is not None and (u is None or not view.same(u.act, g.act))):
        return None
    parts = [g, down] if u is None else [g, u, down]
    for p in parts:  # every weight and bias gathered with the same ids
        if not view.same(p.ids, down.ids) or (p.bias is not None and not view.same(p.bias_rows, down.ids)):
            return None
    if u is not None and (g.cols is None) != (u.cols is None):
        return None
    o_labels = (*token_labels(len(_shape(down.ids)) - 1), "K", "D")
    labels = tuple(o_labels[p] for p in perm)
    return _ffn_of_parts(g.act, g, u, down, act, act_params, labels), down.ids


def _ffn_of_parts(
    x: Any, g: Any, u: Any, down: Any, act: str, act_params: tuple, labels: tuple
) -> ExpertFfn:
    """The ExpertFfn of recognised gate / up (or None) / down projections (`_Gathered` or `_Ragged`:
    each with w, dims, cols and bias, labelled as an up projection)."""
    d_bias = down.bias and down.bias._replace(labels=_down_labels(down.bias.labels))
    return ExpertFfn(
        x=x,
        w_gate=g.w,
        w_up=None if u is None else u.w,
        w_down=down.w,
        activation=act,
        labels=labels,
        w_gate_dims=g.dims,
        w_up_dims=None if u is None else u.dims,
        w_down_dims=_down_labels(down.dims),
        gate_cols=g.cols,
        up_cols=None if u is None else u.cols,
        biases=(g.bias, None if u is None else u.bias, d_bias),
        act_params=act_params,
    )


class _Gathered(NamedTuple):
    act: Any  # x [..T, D] (up projections) or the hidden h [..T, K, F] (down)
    w: Any
    ids: Any
    dims: tuple[str, ...]  # W's labels; the contracted dim is "D", the output dim "F" (relabelled for down)
    cols: Cols | None
    bias: Bias | None
    bias_rows: Any  # the ids the bias was gathered with, or None


def _gathered(view: View, atom: Any, up: bool) -> _Gathered | None:
    """atom = act . W[ids] per token and slot, maybe cut to some columns, maybe + b[ids].

    `einsum('td,tkdf->tkf')` for up projections, `einsum('tkf,tkfd->tkd')` for the down projection,
    either operand order: both give [..T, K, out] (batch dims first, then the one free dim).
    """
    atom = view.canon(atom)
    if view.op(atom) == "add":
        for inner, b in (view.args(atom), view.args(atom)[::-1]):
            taken = idioms.take(view, b)
            if taken is None or len(_shape(taken[0])) != 2:
                continue
            got = _gathered(view, inner, up)
            if got is None or got.bias is not None:
                return None
            return got._replace(bias=Bias(taken[0], ("E", "F"), None), bias_rows=taken[1])
        return None
    cut = column_slice(view, atom)
    if cut is not None:
        inner_atom, axis, cols = cut
        inner = _gathered(view, inner_atom, up)
        if inner is None or inner.cols is not None or axis != len(_shape(atom)) - 1:
            return None
        return inner._replace(cols=cols, bias=_cut_bias(inner.bias, cols))
    got = _dot(view, atom)
    if got is None:
        return None
    lhs, rhs, lc, rc, lb, rb = got
    for a_side, g_side, ac, gc, ab, gb in ((lhs, rhs, lc, rc, lb, rb), (rhs, lhs, rc, lc, rb, lb)):
        taken = idioms.take(view, g_side)
        if taken is None or len(_shape(taken[0])) != 3:
            continue
        w, ids = taken
        nt = len(_shape(ids)) - 1  # token dims; then the k dim
        batch = tuple(range(nt if up else nt + 1))
        if nt < 1 or tuple(gb) != batch or tuple(ab) != batch or len(gc) != 1 or gc[0] - nt not in (1, 2):
            continue
        if len(_shape(a_side)) != len(batch) + 1 or tuple(ac) != (len(batch),):
            continue
        dims = ("E", "D", "F") if gc[0] - nt == 1 else ("E", "F", "D")
        return _Gathered(a_side, w, ids, dims, None, None, None)
    return None


def sorted_expert_outputs(view: View, out: Any) -> tuple[ExpertFfn, Any] | None:
    """(ffn, ids) for out [T, K, D] computed on rows sorted by expert with `lax.ragged_dot`.

    The chain: flat = ids.reshape(-1); perm = argsort(flat); rows = x[perm // K];
    sizes = bincount(flat, E); h = ragged_dot(rows, W, sizes) for gate/up/down; then unpermuted
    by the inverse permutation (gather at argsort(perm), or scatter to perm) and reshaped.
    """
    out = view.canon(out)
    eqn = view.producer(out)
    if eqn is None or eqn.primitive.name != "reshape" or len(_shape(out)) != 3:
        return None
    o_sorted, perm = _unpermuted(view, view.canon(eqn.invars[0]))
    got = None if o_sorted is None else sorted_rows_ffn(view, o_sorted)
    if got is None or not view.same(got[2], perm) or _shape(got[1]) != _shape(out)[:2]:
        return None
    return got[0], got[1]


def sorted_scatter_combine(view: View, y: Any) -> tuple[ExpertFfn, Any, Any] | None:
    """(ffn, ids, weights) for y = zeros[T, D].at[perm // K].add(O_sorted * w.reshape(-1)[perm])."""
    eqn = view.producer(y)
    if eqn is None or eqn.primitive.name not in ("scatter-add", "scatter_add"):
        return None
    operand, indices, updates = (view.canon(v) for v in eqn.invars[:3])
    dn = eqn.params["dimension_numbers"]
    if (
        view.scalar(operand) != 0
        or tuple(dn.inserted_window_dims) != (0,)
        or tuple(dn.update_window_dims) != (1,)
    ):
        return None
    if tuple(dn.scatter_dims_to_operand_dims) != (0,) or view.op(updates) != "mul":
        return None
    src = idioms.index_array(view, indices)
    if src is None or view.op(src) != "div":
        return None
    for o_side, w_side in (view.args(updates), view.args(updates)[::-1]):
        got = sorted_rows_ffn(view, o_side)
        if got is None or not view.same(view.args(src)[0], got[2]):
            continue
        ffn, ids, perm = got
        if view.scalar(view.args(src)[1]) != _shape(ids)[1]:
            continue
        w_sorted, _ = idioms.unexpand(view, w_side)
        taken = idioms.take(view, w_sorted)
        if taken is None or not view.same(taken[1], perm):
            continue
        wf = view.producer(taken[0])
        if wf is None or wf.primitive.name != "reshape" or _shape(wf.invars[0]) != _shape(ids):
            continue
        return ffn, ids, view.canon(wf.invars[0])
    return None


def sorted_rows_ffn(view: View, o_sorted: Any) -> tuple[ExpertFfn, Any, Any] | None:
    """(ffn, ids, perm) if o_sorted[i] = FFN_{flat[perm[i]]}(x[perm[i] // K]).

    Expert biases may be added per row, gathered with the row's expert `b[flat[perm]]`.
    """
    down = _ragged(view, o_sorted)
    if down is None or down.cols is not None:
        return None
    inner = activation_of(view, down.rows)
    if inner is None:
        return None
    act, gate, up, act_params = inner
    g = _ragged(view, gate)
    u = None if up is None else _ragged(view, up)
    if g is None or (up is not None and u is None):
        return None
    parts = [g, down] if u is None else [g, u, down]
    if any(not view.same(p.sizes, down.sizes) for p in parts):
        return None
    if u is not None and not view.same(u.rows, g.rows):
        return None
    if u is not None and (g.cols is None) != (u.cols is None):
        return None
    source = _row_source(view, g.rows)
    if source is None:
        return None
    x, perm, k_rows = source
    order = idioms.argsort(view, perm)
    counts = idioms.bincount(view, down.sizes)
    if order is None or counts is None or order[1] != 0 or not view.same(order[0], counts[0]):
        return None
    flat = order[0]
    for p in parts:  # a bias must be gathered with each row's expert, flat[perm]
        row_e = None if p.bias_rows is None else idioms.take(view, p.bias_rows)
        if p.bias is None:
            continue
        if row_e is None or not (view.same(row_e[0], flat) and view.same(row_e[1], perm)):
            return None
    fe = view.producer(flat)
    if fe is None or fe.primitive.name != "reshape" or len(_shape(fe.invars[0])) != 2:
        return None
    ids = view.canon(fe.invars[0])
    t, k = _shape(ids)
    if k_rows != k or _shape(x)[0] != t or counts[1] != _shape(down.w)[0]:
        return None
    return _ffn_of_parts(x, g, u, down, act, act_params, ("T0", "K", "D")), ids, perm


def _row_source(view: View, rows: Any) -> tuple[Any, Any, float | None] | None:
    """(x, perm, k) if rows [T * k, D] == x[perm // k]: spelled so, or `jnp.repeat(x, k)[perm]`."""
    taken = idioms.take(view, rows)
    if taken is None:
        return None
    src, idx = taken
    repeated = idioms.repeated_rows(view, src)
    if repeated is not None:
        return repeated[0], idx, repeated[1]
    if len(_shape(src)) != 2 or view.op(idx) != "div":
        return None
    perm, k = view.args(idx)
    return src, perm, view.scalar(k)


def _unpermuted(view: View, flat: Any) -> tuple[Any, Any] | tuple[None, None]:
    """(sorted_values, perm) if flat[j] = sorted_values[inverse(perm)[j]]."""
    taken = idioms.take(view, flat)
    if taken is not None:
        vals, inv = taken
        got = idioms.argsort(view, inv)
        if got is not None and got[1] == 0 and idioms.argsort(view, got[0]) is not None:
            return vals, got[0]
    eqn = view.producer(flat)
    if eqn is not None and eqn.primitive.name == "scatter":
        operand, indices, updates = (view.canon(v) for v in eqn.invars[:3])
        dn = eqn.params["dimension_numbers"]
        perm = idioms.index_array(view, indices)
        if (
            perm is not None
            and view.scalar(operand) == 0
            and tuple(dn.inserted_window_dims) == (0,)
            and idioms.argsort(view, perm)
        ):
            return updates, perm
    return None, None


class _Ragged(NamedTuple):
    rows: Any
    w: Any
    sizes: Any
    dims: tuple[str, ...]  # W's labels; the output column dim is "F" (the caller relabels for down)
    cols: Cols | None
    bias: Bias | None
    bias_rows: Any  # the per-row expert index the bias was gathered with, or None


def _ragged(view: View, atom: Any) -> _Ragged | None:
    """atom = ragged_dot(rows, W, sizes), maybe cut to some columns, maybe + b[expert_of_row]."""
    atom = view.uncast(atom)  # preferred_element_type, or a cast back
    if view.op(atom) == "add":
        for inner, b in (view.args(atom), view.args(atom)[::-1]):
            taken = idioms.take(view, b)
            if taken is None or len(_shape(taken[0])) != 2 or len(_shape(taken[1])) != 1:
                continue
            got = _ragged(view, inner)
            if got is None or got.bias is not None:
                return None
            return got._replace(bias=Bias(taken[0], ("E", "F"), None), bias_rows=taken[1])
        return None
    cut = column_slice(view, atom)
    if cut is not None:
        inner_atom, axis, cols = cut
        inner = _ragged(view, inner_atom)
        if inner is None or inner.cols is not None or axis != 1:
            return None
        return inner._replace(cols=cols, bias=_cut_bias(inner.bias, cols))
    eqn = view.producer(atom)
    if eqn is None or eqn.primitive.name != "ragged_dot_general":
        return None
    rdn = eqn.params["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = rdn.dot_dimension_numbers
    if lb or rb or tuple(rdn.lhs_ragged_dimensions) != (0,) or tuple(rdn.rhs_group_dimensions) != (0,):
        return None
    if tuple(lc) != (1,) or len(rc) != 1 or rc[0] not in (1, 2):
        return None
    rows, w, sizes = (view.canon(v) for v in eqn.invars)
    dims = ("E", "D", "F") if rc[0] == 1 else ("E", "F", "D")
    base, perm = _through_transpose(view, w)  # torch-layout weights swapped for ragged_dot
    if perm[0] == 0:
        w, dims = base, tuple(dims[perm.index(d)] for d in range(3))
    return _Ragged(rows, w, sizes, dims, None, None, None)


def is_ragged_dot(view: View, atom: Any) -> bool:
    """Whether atom is (a bias-added, column-cut) `lax.ragged_dot` product."""
    return _ragged(view, atom) is not None


def looped_expert_outputs(view: View, y: Any) -> tuple[ExpertFfn, Any, Any] | None:
    """(ffn, weights, ids) for y = sum over e in range(E) of weight_e[:, None] * FFN(x; W[e]).

    The Python-loop spelling (HF Mixtral / Qwen2-MoE ports): weight_e = sum(where(ids == e, w, 0), -1)
    and each expert's FFN reads the e-th slice of stacked weights. Every expert must appear once.
    """
    return _unrolled_sum(view, y, _loop_term, lambda stacks, ids: _shape(stacks[-1][0])[0])


def _unrolled_sum(view: View, y: Any, term_of: Any, count: Any) -> tuple[ExpertFfn, Any, Any] | None:
    """A sum of unrolled terms, term_of(view, term) -> (index, key), one term for each index in
    range(count(stacks, ids)), all with the same key (x, weight stacks, activation, weights, ids)."""
    seen: dict[int, tuple] = {}
    for term in (t for t in _sum_terms(view, y) if view.scalar(t) != 0.0):
        got = term_of(view, term)
        if got is None or got[0] in seen:
            return None
        seen[got[0]] = got[1]
    if len(set(seen.values())) != 1:
        return None
    ((x, stacks, act, act_params, w, ids),) = set(seen.values())
    if sorted(seen) != list(range(count(stacks, ids))):
        return None
    (wg, wg_dims), up, (wd, wd_dims) = stacks if len(stacks) == 3 else (stacks[0], None, stacks[1])
    ffn = ExpertFfn(
        x=x,
        w_gate=wg,
        w_up=None if up is None else up[0],
        w_down=wd,
        activation=act,
        labels=("T0", "D"),
        w_gate_dims=wg_dims,
        w_up_dims=None if up is None else up[1],
        w_down_dims=wd_dims,
        act_params=act_params,
    )
    return ffn, w, ids


def _sum_terms(view: View, atom: Any) -> list[Any]:
    atom = view.canon(atom)
    if view.op(atom) == "add":
        return [t for a in view.args(atom) for t in _sum_terms(view, a)]
    return [atom]


def _loop_term(view: View, term: Any) -> tuple[int, tuple] | None:
    """(e, key) for term = weight_e[:, None] * FFN_e(x); key holds what must agree across experts."""
    if view.op(term) != "mul" or len(_shape(term)) != 2:
        return None
    for wexp, cur in (view.args(term), view.args(term)[::-1]):
        we, dims = idioms.unexpand(view, wexp)
        if len(_shape(we)) != 1 or dims.get(0) != 0:
            continue
        sel = loop_expert_weight(view, we)
        if sel is None:
            continue
        e, w, ids = sel
        down = _expert_slice_dot(view, cur, e, contracted="F")
        if down is None:
            continue
        a, wd = down
        inner = activation_of(view, a)
        if inner is None:
            continue
        act, gate, up, act_params = inner
        g = _expert_slice_dot(view, gate, e, contracted="D")
        u = None if up is None else _expert_slice_dot(view, up, e, contracted="D")
        if g is None or (up is not None and (u is None or not view.same(u[0], g[0]))):
            continue
        stacks = (g[1], wd) if u is None else (g[1], u[1], wd)
        return e, (view.canon(g[0]), stacks, act, act_params, w, ids)
    return None


def loop_expert_weight(view: View, atom: Any) -> tuple[int, Any, Any] | None:
    """(e, w, ids) for atom[t] = sum_j [ids[t, j] == e] * w[t, j].

    Spelled `sum(where(ids == e, w, 0), -1)`, `sum(w * (ids == e), -1)`, or a contraction of w with
    expert e's column of `one_hot(ids, E)` (`einsum('kt,tk->t', one_hot(ids).T[e], w)`, HF Qwen2-MoE).
    The multiplying spellings differ from the fused op only for an infinite weight (inf * 0 is NaN).
    """
    if view.op(atom) == "reduce_sum" and tuple(view.params(atom)["axes"]) == (1,):
        (inner,) = view.args(atom)
        if view.op(inner) == "select_n":
            pred, on_false, on_true = view.args(inner)
            col = _onehot_column(view, pred)
            if view.scalar(on_false) == 0.0 and col is not None and col[2] == ("T", "K"):
                return (col[1], view.canon(on_true), col[0]) if _shape(col[0]) == _shape(on_true) else None
        if view.op(inner) == "mul":
            for m, w in (view.args(inner), view.args(inner)[::-1]):
                col = _onehot_column(view, m)
                if col is not None and col[2] == ("T", "K") and _shape(col[0]) == _shape(w):
                    return col[1], view.canon(w), col[0]
        return None
    got = _dot(view, atom)
    if got is None:
        return None
    lhs, rhs, lc, rc, lb, rb = got
    for m, w, mc, wc, mb, wb in ((lhs, rhs, lc, rc, lb, rb), (rhs, lhs, rc, lc, rb, lb)):
        col = _onehot_column(view, m)
        if col is None or len(_shape(w)) != 2 or _shape(col[0]) != _shape(w):
            continue
        ids, e, labels = col
        if (tuple(wc), tuple(wb)) == ((1,), (0,)) and (tuple(mc), tuple(mb)) == (
            (labels.index("K"),),
            (labels.index("T"),),
        ):
            return e, view.canon(w), ids
    return None


def _onehot_column(view: View, atom: Any) -> tuple[Any, int, tuple[str, ...]] | None:
    """(ids, e, labels) if atom is `ids == e` for ids [T, K], with its dims labelled "T" and "K".

    Spelled `ids == e` (any cast) or as expert e's slice of a (transposed) `one_hot(ids, E)`.
    """
    atom = view.canon(atom)
    if view.op(atom) == "convert_element_type":
        atom = view.args(atom)[0]
    if view.op(atom) == "eq":
        got = _scalar_operand(view, atom)
        if got is None or not jnp.issubdtype(got[0].aval.dtype, jnp.integer):
            return None
        if len(_shape(got[0])) == 2 and float(got[1]).is_integer():
            return got[0], int(got[1]), ("T", "K")
        return None
    sq = view.producer(atom)
    if sq is None or sq.primitive.name != "squeeze" or len(sq.params["dimensions"]) != 1:
        return None
    cut = column_slice(view, sq.invars[0])
    if cut is None or cut[1] != sq.params["dimensions"][0] or cut[2][1] - cut[2][0] != 1 or cut[2][2] != 1:
        return None
    base, perm = _through_transpose(view, cut[0])
    oh = idioms.one_hot(view, base)
    if oh is None or len(_shape(oh[0])) != 2:
        return None
    labels = [("T", "K", "E")[p] for p in perm]
    if labels[cut[1]] != "E":
        return None
    del labels[cut[1]]
    return oh[0], cut[2][0], tuple(labels)


def _expert_slice_dot(view: View, atom: Any, e: int, contracted: str) -> tuple[Any, tuple] | None:
    """(lhs, (W, W labels)) for atom = lhs[T, n] . M where M is (a transpose of) W[e] of stacked W."""
    got = _dot(view, atom)
    if got is None:
        return None
    lhs, rhs, lc, rc, lb, rb = got
    if lb or rb or len(_shape(lhs)) != 2 or tuple(lc) != (1,) or len(_shape(rhs)) != 2:
        return None
    base, perm = _through_transpose(view, rhs)
    sq = view.producer(base)
    if sq is None or sq.primitive.name != "squeeze" or tuple(sq.params["dimensions"]) != (0,):
        return None
    sl = view.producer(sq.invars[0])
    if sl is None or sl.primitive.name != "slice" or any(st != 1 for st in sl.params.get("strides") or ()):
        return None
    stacked = view.canon(sl.invars[0])
    if (
        sl.params["start_indices"][0] != e
        or sl.params["limit_indices"][0] != e + 1
        or len(_shape(stacked)) != 3
    ):
        return None
    if any(
        sl.params["start_indices"][d] != 0 or sl.params["limit_indices"][d] != _shape(stacked)[d]
        for d in (1, 2)
    ):
        return None
    w_dim = 1 + perm[rc[0]]  # the stacked weight's dim that the matmul contracts
    labels = ["E", "?", "?"]
    labels[w_dim] = contracted
    labels[3 - w_dim] = "F" if contracted == "D" else "D"
    return lhs, (stacked, tuple(labels))


def slot_column(view: View, atom: Any) -> tuple[Any, int] | None:
    """(a, j) if atom [T] is column j of a 2-D array a [T, K] (`a[:, j]`), looking through broadcasts."""
    atom, dims = idioms.unexpand(view, atom)
    if dims.get(0) != 0:  # w[:, j, None]: the column must run along the tokens
        return None
    sq = view.producer(view.canon(atom))
    if sq is None or sq.primitive.name != "squeeze" or tuple(sq.params["dimensions"]) != (1,):
        return None
    cut = column_slice(view, sq.invars[0])
    if cut is None or cut[1] != 1 or len(_shape(cut[0])) != 2:
        return None
    start, limit, stride = cut[2]
    return (cut[0], start) if limit - start == 1 and stride == 1 else None


def slot_loop_outputs(view: View, y: Any) -> tuple[ExpertFfn, Any, Any] | None:
    """(ffn, weights, ids) for y = sum over slots j < K of w[:, j, None] * FFN(x; W[ids[:, j]]).

    The decode-style loop over the k slots: each slot gathers its experts' weights per token
    (`w_fc[ids[:, j]]`) and runs a batched matvec; every slot of the same ids and weights appears once.
    """
    return _unrolled_sum(view, y, _slot_term, lambda stacks, ids: _shape(ids)[1])


def _slot_term(view: View, term: Any) -> tuple[int, tuple] | None:
    """(j, key) for term = w[:, j, None] * FFN(x; W[ids[:, j]]); key must agree across slots."""
    if view.op(term) != "mul" or len(_shape(term)) != 2:
        return None
    for wexp, cur in (view.args(term), view.args(term)[::-1]):
        col = slot_column(view, wexp)
        down = _slot_matvec(view, view.uncast(cur))
        if col is None or down is None:
            continue
        h, wd, ids_j, wd_dims = down
        ids_col = slot_column(view, ids_j)
        inner = activation_of(view, h)
        if ids_col is None or ids_col[1] != col[1] or inner is None:
            continue
        act, gate, up, act_params = inner
        g = _slot_matvec(view, gate)
        u = None if up is None else _slot_matvec(view, up)
        if g is None or (up is not None and (u is None or not view.same(u[0], g[0]))):
            continue
        if any(not view.same(p[2], ids_j) for p in (g, u) if p is not None):
            continue
        stacks = ((g[1], g[3]),) + (() if u is None else ((u[1], u[3]),))
        stacks += ((wd, _down_labels(wd_dims)),)
        return col[1], (view.canon(g[0]), stacks, act, act_params, col[0], ids_col[0])
    return None


def _slot_matvec(view: View, atom: Any) -> tuple[Any, Any, Any, tuple[str, ...]] | None:
    """(v, W, ids_j, W labels) for atom [T, out] = W[ids_j] @ v per token.

    Spelled `matmul(W[e], v[:, :, None])[..., 0]` or `einsum('tod,td->to', W[e], v)`; W's contracted
    dim is labelled "D", its output dim "F".
    """
    atom = view.canon(atom)
    eqn = view.producer(atom)
    if eqn is not None and eqn.primitive.name == "squeeze" and len(_shape(eqn.invars[0])) == 3:
        if tuple(eqn.params["dimensions"]) != (2,):
            return None
        atom = view.canon(eqn.invars[0])
    got = _dot(view, atom)
    if got is None:
        return None
    lhs, rhs, lc, rc, lb, rb = got
    if tuple(lb) != (0,) or tuple(rb) != (0,) or len(lc) != 1:
        return None
    for g_side, v_side, gc, vc in ((lhs, rhs, lc, rc), (rhs, lhs, rc, lc)):
        taken = idioms.take(view, g_side)
        if taken is None or len(_shape(taken[0])) != 3 or len(_shape(taken[1])) != 1:
            continue
        v, dims = idioms.unexpand(view, v_side)
        if len(_shape(v)) != 2 or tuple(vc) != (1,) or dims.get(0) != 0 or dims.get(1) != 1:
            continue
        labels = ("E", "D", "F") if gc[0] == 1 else ("E", "F", "D")
        return v, taken[0], taken[1], labels
    return None
