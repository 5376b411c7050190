"""The expert FFN of a capacity block: per-expert buffers built by a dispatch einsum, run through
batched per-expert matmuls and an activation::

    xe = einsum("..sec,..sd->e..cd", dispatch, x)          # [E, groups, C, D] buffers
    out = act(xe @ w_gate[E, D, F]) [* (xe @ w_up)] @ w_down[E, F, D]

`expert_outputs(view, out, num_e)` recognises `out` and returns the pieces (`Ffn`): x, the dispatch
tensor, the weights with their dim labels, and the labels of out's dims. Whether the dispatch (and
the combine that reads `out`) drop tokens like the kernel is `patterns/capacity.py`'s business.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moefuse.patterns.activations import activation_of
from moefuse.patterns.dots import dot, dot_labels, through_transpose
from moefuse.view import View

_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh", "gelu", "gelu_tanh", "relu", "silu")


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(a.aval.shape)


@dataclasses.dataclass
class Ffn:
    """A recognised expert FFN on capacity buffers (dims named by labels: E, C, D, F, token dims)."""

    x: Any
    dispatch: Any
    x_dims: tuple  # x's dims matched to the dispatch tensor: (token dims..., "D")
    d_labels: tuple  # labels of the dispatch tensor's dims: token dims t0.., "E", "C"
    w_gate: Any
    w_up: Any | None
    w_down: Any
    activation: str
    w_gate_dims: tuple
    w_up_dims: tuple | None
    w_down_dims: tuple
    labels: tuple  # labels of the expert outputs: "E", "C", "D", group token dims


def _expert_inputs(view: View, atom: Any) -> tuple[Any, Any, tuple, tuple, tuple] | None:
    """(x, dispatch, labels, x token count, dispatch dims) for einsum('..sec,..sd->e..cd')."""
    base, perm = through_transpose(view, atom)
    got = dot(view, base)
    if got is None:
        return None
    lhs, rhs, lc, rc, lb, rb = got
    for d_side, x_side, dc, xc, db, xb in ((lhs, rhs, lc, rc, lb, rb), (rhs, lhs, rc, lc, rb, lb)):
        nx = len(_shape(x_side))
        nd = len(_shape(d_side))
        nt = nx - 1
        if nd != nt + 2 or len(xc) != 1 or tuple(xb) + tuple(xc) != tuple(range(nt)):
            continue
        if tuple(db) + tuple(dc) != tuple(range(nt)):
            continue
        # dispatch dims: tokens (batched groups, then the contracted axis), then E, C
        x_lab = tuple(f"t{i}" for i in range(nt)) + ("D",)
        d_lab = tuple(f"t{i}" for i in range(nt)) + ("E", "C")
        if d_side is lhs:
            labels = dot_labels(d_lab, x_lab, dc, xc, db, xb)
        else:
            labels = dot_labels(x_lab, d_lab, xc, dc, xb, db)
        return x_side, d_side, tuple(labels[p] for p in perm), d_lab, x_lab
    return None


def _proj(view: View, atom: Any, num_e: int, contract: str, new: str) -> tuple | None:
    """(input, W, labels of atom, W labels) for atom = input . W[E, .., ..] batched over E."""
    base, perm = through_transpose(view, atom)
    got = dot(view, base)
    if got is None:
        return None
    lhs, rhs, lc, rc, lb, rb = got
    for a_side, w_side, ac, wc, ab, wb in ((lhs, rhs, lc, rc, lb, rb), (rhs, lhs, rc, lc, rb, lb)):
        if len(_shape(w_side)) != 3 or len(wb) != 1 or len(wc) != 1 or _shape(w_side)[wb[0]] != num_e:
            continue
        w_lab = ["?"] * 3
        w_lab[wb[0]], w_lab[wc[0]] = "E", contract
        w_lab[next(i for i in range(3) if i not in (wb[0], wc[0]))] = new
        return a_side, w_side, ac, wc, ab, wb, tuple(w_lab), perm, w_side is lhs
    return None


def expert_outputs(view: View, out: Any, num_e: int) -> Ffn | None:
    down = _proj(view, out, num_e, "F", "D")
    if down is None:
        return None
    h, wd, hc, wc, hb, wb, wd_lab, perm, w_first = down
    if view.op(h) == "convert_element_type":
        return None  # hidden activations rounded to another dtype: not the kernel's compute dtype
    inner = activation_of(view, h)
    if inner is None or inner[0] not in _ACTIVATIONS:
        return None
    act, gate, up = inner[0], inner[1], inner[2]
    g = _up(view, gate, num_e)
    u = None if up is None else _up(view, up, num_e)
    if g is None or (up is not None and (u is None or u[0] is not g[0] or u[1] is not g[1] or u[2] != g[2])):
        return None
    x, dispatch, g_labels, wg, wg_lab, d_lab, x_lab = g
    if len(hb) != 1 or len(hc) != 1 or g_labels[hb[0]] != "E" or g_labels[hc[0]] != "F":
        return None
    if w_first:
        labels = dot_labels(wd_lab, g_labels, wc, hc, wb, hb)
    else:
        labels = dot_labels(g_labels, wd_lab, hc, wc, hb, wb)
    return Ffn(
        x=x,
        dispatch=dispatch,
        x_dims=x_lab,
        d_labels=d_lab,
        w_gate=wg,
        w_up=None if u is None else u[3],
        w_down=wd,
        activation=act,
        w_gate_dims=wg_lab,
        w_up_dims=None if u is None else u[4],
        w_down_dims=wd_lab,
        labels=tuple(labels[p] for p in perm),
    )


def _up(view: View, atom: Any, num_e: int) -> tuple | None:
    """(x, dispatch, labels, W, W labels, dispatch labels, x labels) for dispatched x . W[E, D, F]."""
    got = _proj(view, atom, num_e, "D", "F")
    if got is None:
        return None
    a, w, ac, wc, ab, wb, w_lab, perm, w_first = got
    ei = _expert_inputs(view, a)
    if ei is None:
        return None
    x, dispatch, a_labels, d_lab, x_lab = ei
    if len(ab) != 1 or a_labels[ab[0]] != "E" or a_labels[ac[0]] != "D":
        return None
    if w_first:
        labels = dot_labels(w_lab, a_labels, wc, ac, wb, ab)
    else:
        labels = dot_labels(a_labels, w_lab, ac, wc, ab, wb)
    return x, dispatch, tuple(labels[p] for p in perm), w, w_lab, d_lab, x_lab
