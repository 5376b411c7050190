"""Expert-FFN recognition: which values are `act(x @ W_gate[e]) * (x @ W_up[e]) @ W_down[e]`.

Works on labelled dimensions: every recognised value carries a tuple of labels ("T" for token
dims, "E" experts, "F" the expert hidden dim, "D" the model dim), tracked through
`dot_general` and `transpose`, so any einsum spelling and dim order is understood::

    ffn = dense_expert_outputs(view, o, num_experts)   # o holds FFN_e(x[t]) for every (t, e)
    ffn.x, ffn.w_gate, ffn.w_up, ffn.w_down, ffn.activation, ffn.labels   # labels e.g. ("T","E","D")
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from moefuse import _compat as C
from moefuse import idioms
from moefuse.rewrite import inline_jits
from moefuse.view import View

SQRT_2_OVER_PI = 0.7978845834732056
GELU_TANH_C = 0.044714998453855515
INV_SQRT2 = 0.7071067690849304


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
    gate_cols: tuple[int, int] | None = None  # F range of w_gate's F dim (fused gate_up weights)
    up_cols: tuple[int, int] | None = None
    biases: tuple[tuple[Any, tuple[str, ...]] | None, ...] = (None, None, None)
    """(bias, its dim labels) added after the gate, up and down projections, or None each."""


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(a.aval.shape)


def _through_transpose(view: View, atom: Any) -> tuple[Any, tuple[int, ...]]:
    """(base, perm) with atom == transpose(base, perm) (identity perm when not transposed)."""
    atom = view.canon(atom)
    eqn = view.producer(atom)
    if eqn is not None and eqn.primitive.name == "transpose":
        return view.canon(eqn.invars[0]), tuple(eqn.params["permutation"])
    return atom, tuple(range(len(_shape(atom))))


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
            if view.op(inner) in ("dot_general", "transpose"):
                return view.canon(inner), base, dims
    return atom, None, None


def _bias_labels(bias: Any, dims: dict[int, int] | None, labels: tuple[str, ...], want: set[str]):
    """(bias, its labels) when the bias runs along exactly the `want` dims, None without bias."""
    if bias is None:
        return None
    got = tuple(labels[dims[i]] for i in range(2))
    return (bias, got) if set(got) == want else False


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
        inner = _activation(view, act_side)
        if inner is None:
            continue
        act, gate, up = inner
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
        if got is None or got[4] is not None or got[5] is not None:
            return None
        return (*got[:5], _bias_labels(bias, bias_map, got[2], {"E", "F"}))
    atom = view.canon(atom)
    eqn = view.producer(atom)
    if (
        eqn is not None
        and eqn.primitive.name == "slice"
        and not any(st != 1 for st in eqn.params.get("strides") or ())
    ):
        inner = _up_projection(view, eqn.invars[0], num_experts)
        if inner is None or inner[4] is not None or inner[5] is not None:
            return None
        starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
        shape = _shape(eqn.invars[0])
        cut = [d for d in range(len(shape)) if (starts[d], limits[d]) != (0, shape[d])]
        if len(cut) != 1 or inner[2][cut[0]] != "F":
            return None
        return (*inner[:4], (int(starts[cut[0]]), int(limits[cut[0]])), None)
    if eqn is not None and eqn.primitive.name == "split":
        inner = _up_projection(view, eqn.invars[0], num_experts)
        axis, sizes = eqn.params["axis"], eqn.params["sizes"]
        if inner is None or inner[4] is not None or inner[5] is not None or inner[2][axis] != "F":
            return None
        part = view.out_index(atom)
        return (*inner[:4], (int(sum(sizes[:part])), int(sum(sizes[: part + 1]))), None)
    base, perm = _through_transpose(view, atom)
    got = _dot(view, base)
    if got is None:
        return None
    lhs, rhs, lc, rc, lb, rb = got
    if lb or rb or len(lc) != 1:
        return None
    for x_side, w_side, xc, wc in ((lhs, rhs, lc, rc), (rhs, lhs, rc, lc)):
        if len(_shape(x_side)) != 2 or len(_shape(w_side)) != 3:
            continue
        free = [i for i in range(3) if i != wc[0]]
        e_dims = [i for i in free if _shape(w_side)[i] == num_experts]
        if not e_dims:
            continue
        e_dim = e_dims[0]
        f_dim = next(i for i in free if i != e_dim)
        w_labels = ["?"] * 3
        w_labels[e_dim], w_labels[f_dim], w_labels[wc[0]] = "E", "F", "D"
        x_labels = ["T", "T"]
        x_labels[xc[0]] = "D"
        if x_labels.count("T") != 1:
            continue
        if x_side is lhs:
            labels = _dot_labels(tuple(x_labels), tuple(w_labels), xc, wc, (), ())
        else:
            labels = _dot_labels(tuple(w_labels), tuple(x_labels), wc, xc, (), ())
        labels = tuple(labels[p] for p in perm)
        if xc[0] != 1:
            continue  # tokens must be [T, D]
        return x_side, w_side, labels, tuple(w_labels), None, None
    return None


def _activation(view: View, atom: Any) -> tuple[str, Any, Any | None] | None:
    """(name, gate, up) for a gated activation act(gate) * up, or (name, h, None) for act(h)."""
    atom = view.canon(atom)
    if view.op(atom) == "mul":
        a, b = view.args(atom)
        for g_side, u_side in ((a, b), (b, a)):
            inner = _plain_activation(view, g_side)
            if inner is not None and inner[0] in ("silu", "gelu", "gelu_tanh"):
                name = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}[inner[0]]
                return name, inner[1], u_side
    inner = _plain_activation(view, atom)
    return None if inner is None else (inner[0], inner[1], None)


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

    Token dims may be several ([B, S, D] tokens with [B, S, K] ids): they are labelled "T" each.
    """
    base, perm = _through_transpose(view, out)
    got = _dot(view, base)
    if got is None:
        return None
    lhs, rhs, lc, rc, lb, rb = got
    for a_side, g_side, ac, gc, ab, gb in ((lhs, rhs, lc, rc, lb, rb), (rhs, lhs, rc, lc, rb, lb)):
        taken = idioms.take(view, g_side)
        if taken is None or len(_shape(taken[0])) != 3:
            continue
        num_experts = _shape(taken[0])[0]
        w_down, ids = taken
        nt = len(_shape(ids)) - 1  # token dims
        batch = tuple(range(nt + 1))  # token dims and the k dim
        if nt < 1 or tuple(gb) != batch or len(gc) != 1 or gc[0] - nt not in (1, 2):
            continue
        inner = _activation(view, a_side)
        if inner is None:
            continue
        act, gate, up = inner
        g = _gathered_up(view, gate, num_experts, ids)
        u = None if up is None else _gathered_up(view, up, num_experts, ids)
        if g is None or (up is not None and (u is None or u[0] is not g[0] or u[2] != g[2])):
            continue
        x, w_gate, labels, wg_dims = g
        if labels != ("T",) * nt + ("K", "F") or tuple(ab) != batch or tuple(ac) != (nt + 1,):
            continue
        wd_dims = ("E", "F", "D") if gc[0] - nt == 1 else ("E", "D", "F")
        o_labels = ("T",) * nt + ("K", "D")  # batch (tokens, K), then D, whichever side it is on
        ffn = ExpertFfn(
            x=x,
            w_gate=w_gate,
            w_up=None if u is None else u[1],
            w_down=w_down,
            activation=act,
            labels=tuple(o_labels[p] for p in perm),
            w_gate_dims=wg_dims,
            w_up_dims=None if u is None else u[3],
            w_down_dims=wd_dims,
        )
        return ffn, ids
    return None


def _gathered_up(view: View, atom: Any, num_experts: int, ids: Any) -> tuple[Any, Any, tuple, tuple] | None:
    """(x, W, labels, W labels) for atom = einsum('..d,..kdf->..kf', x, W[ids])."""
    base, perm = _through_transpose(view, atom)
    got = _dot(view, base)
    if got is None:
        return None
    lhs, rhs, lc, rc, lb, rb = got
    nt = len(_shape(ids)) - 1
    toks = tuple(range(nt))
    if len(_shape(lhs)) != nt + 1 or tuple(lb) != toks or tuple(rb) != toks:
        return None
    taken = idioms.take(view, rhs)
    if taken is None or not view.same(taken[1], ids) or len(_shape(taken[0])) != 3:
        return None
    w, _ = taken
    if _shape(w)[0] != num_experts or tuple(lc) != (nt,) or len(rc) != 1 or rc[0] - nt not in (1, 2):
        return None
    w_dims = ("E", "D", "F") if rc[0] - nt == 1 else ("E", "F", "D")
    labels = ("T",) * nt + ("K", "F")
    return lhs, w, tuple(labels[p] for p in perm), w_dims


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
    src, _ = idioms.unexpand(view, indices)
    for o_side, w_side in (view.args(updates), view.args(updates)[::-1]):
        got = sorted_rows_ffn(view, o_side)
        if got is None or not view.same(got[3], src):
            continue
        ffn, ids, perm, _ = got
        w_sorted, _ = idioms.unexpand(view, w_side)
        taken = idioms.take(view, w_sorted)
        if taken is None or not view.same(taken[1], perm):
            continue
        wf = view.producer(taken[0])
        if wf is None or wf.primitive.name != "reshape" or _shape(wf.invars[0]) != _shape(ids):
            continue
        return ffn, ids, view.canon(wf.invars[0])
    return None


def sorted_rows_ffn(view: View, o_sorted: Any) -> tuple[ExpertFfn, Any, Any, Any] | None:
    """(ffn, ids, perm, src) if o_sorted[i] = FFN_{flat[perm[i]]}(x[src[i]]) with src = perm // K."""
    down = _ragged(view, o_sorted)
    if down is None:
        return None
    a, w_down, sizes, down_dims, _ = down
    wd_dims = tuple({"D": "F", "F": "D"}.get(c, c) for c in down_dims)  # down contracts F, keeps D
    inner = _activation(view, a)
    if inner is None:
        return None
    act, gate, up = inner
    g = _ragged(view, gate)
    u = None if up is None else _ragged(view, up)
    if g is None or (up is not None and u is None):
        return None
    rows, w_gate, g_sizes, wg_dims, g_cols = g
    if u is not None and (
        not view.same(u[0], rows) or not view.same(u[2], sizes) or (g_cols is None) != (u[4] is None)
    ):
        return None
    if not view.same(g_sizes, sizes):
        return None
    taken = idioms.take(view, rows)
    if taken is None or len(_shape(taken[0])) != 2:
        return None
    x, src = taken
    order = idioms.argsort(view, view.args(src)[0]) if view.op(src) == "div" else None
    counts = idioms.bincount(view, sizes)
    if order is None or counts is None or order[1] != 0 or not view.same(order[0], counts[0]):
        return None
    perm = view.canon(view.args(src)[0])
    fe = view.producer(order[0])
    if fe is None or fe.primitive.name != "reshape" or len(_shape(fe.invars[0])) != 2:
        return None
    ids = view.canon(fe.invars[0])
    t, k = _shape(ids)
    if view.scalar(view.args(src)[1]) != k or _shape(x)[0] != t or counts[1] != _shape(w_down)[0]:
        return None
    ffn = ExpertFfn(
        x=x,
        w_gate=w_gate,
        w_up=None if u is None else u[1],
        w_down=w_down,
        activation=act,
        labels=("T", "K", "D"),
        w_gate_dims=wg_dims,
        w_up_dims=None if u is None else u[3],
        w_down_dims=wd_dims,
        gate_cols=g_cols,
        up_cols=None if u is None else u[4],
    )
    return ffn, ids, perm, src


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
        perm, _ = idioms.unexpand(view, indices)
        if (
            view.scalar(operand) == 0
            and tuple(dn.inserted_window_dims) == (0,)
            and idioms.argsort(view, perm)
        ):
            return updates, perm
    return None, None


def _ragged(view: View, atom: Any) -> tuple[Any, Any, Any, tuple, Any] | None:
    """(rows, W, group_sizes, W labels, F column range) for atom = ragged_dot(rows, W, sizes)."""
    atom = view.canon(atom)
    eqn = view.producer(atom)
    if eqn is not None and eqn.primitive.name in ("split", "slice"):
        inner = _ragged(view, eqn.invars[0])
        if inner is None or inner[4] is not None:
            return None
        if eqn.primitive.name == "split":
            if eqn.params["axis"] != 1:
                return None
            sizes, part = eqn.params["sizes"], view.out_index(atom)
            cols = (int(sum(sizes[:part])), int(sum(sizes[: part + 1])))
        else:
            starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
            if any(st != 1 for st in eqn.params.get("strides") or ()) or starts[0] != 0:
                return None
            cols = (int(starts[1]), int(limits[1]))
        return (*inner[:4], cols)
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
    return rows, w, sizes, dims, None


def looped_expert_outputs(view: View, y: Any) -> tuple[ExpertFfn, Any, Any] | None:
    """(ffn, weights, ids) for y = sum over e in range(E) of weight_e[:, None] * FFN(x; W[e]).

    The Python-loop spelling (HF Mixtral / Qwen2-MoE ports): weight_e = sum(where(ids == e, w, 0), -1)
    and each expert's FFN reads the e-th slice of stacked weights. Every expert must appear once.
    """
    terms = [t for t in _sum_terms(view, y) if view.scalar(t) != 0.0]
    seen: dict[int, tuple] = {}
    for term in terms:
        got = _loop_term(view, term)
        if got is None:
            return None
        e, key = got
        if e in seen:
            return None
        seen[e] = key
    keys = set(seen.values())
    if len(keys) != 1:
        return None
    ((x, stacks, act, w, ids),) = keys
    num_e = _shape(stacks[-1][0])[0]
    if sorted(seen) != list(range(num_e)):
        return None
    (wg, wg_dims), up, (wd, wd_dims) = stacks if len(stacks) == 3 else (stacks[0], None, stacks[1])
    ffn = ExpertFfn(
        x=x,
        w_gate=wg,
        w_up=None if up is None else up[0],
        w_down=wd,
        activation=act,
        labels=("T", "D"),
        w_gate_dims=wg_dims,
        w_up_dims=None if up is None else up[1],
        w_down_dims=wd_dims,
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
        sel = _expert_weight(view, we)
        if sel is None:
            continue
        e, w, ids = sel
        down = _expert_slice_dot(view, cur, e, contracted="F")
        if down is None:
            continue
        a, wd = down
        inner = _activation(view, a)
        if inner is None:
            continue
        act, gate, up = inner
        g = _expert_slice_dot(view, gate, e, contracted="D")
        u = None if up is None else _expert_slice_dot(view, up, e, contracted="D")
        if g is None or (up is not None and (u is None or not view.same(u[0], g[0]))):
            continue
        stacks = (g[1], wd) if u is None else (g[1], u[1], wd)
        return e, (view.canon(g[0]), stacks, act, w, ids)
    return None


def _expert_weight(view: View, atom: Any) -> tuple[int, Any, Any] | None:
    """(e, w, ids) for atom = sum(where(ids == e, w, 0), axis=-1)."""
    if view.op(atom) != "reduce_sum" or tuple(view.params(atom)["axes"]) != (1,):
        return None
    (sel,) = view.args(atom)
    if view.op(sel) != "select_n":
        return None
    pred, on_false, on_true = view.args(sel)
    if view.scalar(on_false) != 0.0 or view.op(pred) != "eq":
        return None
    a, b = view.args(pred)
    for ids, lit in ((a, b), (b, a)):
        e = view.scalar(lit)
        if e is not None and len(_shape(ids)) == 2 and _shape(ids) == _shape(on_true):
            return int(e), view.canon(on_true), view.canon(ids)
    return None


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
