"""Labelled matmuls: each matmul-like equation read as an einsum over named dims.

Every recognised value carries a tuple of labels ("T0", "T1" ... for x's token dims in order, "E"
experts, "F" the expert hidden dim, "D" the model dim), tracked through `dot_general`,
`transpose`, per-expert biases and column cuts of a fused projection::

    lhs, rhs, lc, rc, lb, rb = dot(view, atom)                # atom's dot_general, operands canonical
    dot_labels(("T0", "D"), ("E", "D", "F"), lc, rc, lb, rb)  # ("T0", "E", "F")
"""

from __future__ import annotations

from typing import Any, NamedTuple

from moefuse import idioms
from moefuse.view import View

Cols = tuple[int, int, int]
"""(start, limit, stride) of the columns a projection keeps along F (a slice of a fused gate/up)."""


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(a.aval.shape)


class Bias(NamedTuple):
    """A per-expert bias added after a projection: `array` has dims `labels` (("E", "F") or ("E", "D"))."""

    array: Any
    labels: tuple[str, ...]
    cols: Cols | None  # the bias was added before the projection was cut to these columns


def token_labels(n: int) -> tuple[str, ...]:
    """Labels of n token dims, in the order of x's dims: ("T0", "T1", ...)."""
    return tuple(f"T{i}" for i in range(n))


def through_transpose(view: View, atom: Any) -> tuple[Any, tuple[int, ...]]:
    """(base, perm) with atom == transpose(base, perm) (identity perm when not transposed)."""
    atom = view.canon(atom)
    eqn = view.producer(atom)
    if eqn is not None and eqn.primitive.name == "transpose":
        return view.canon(eqn.invars[0]), tuple(eqn.params["permutation"])
    return atom, tuple(range(len(_shape(atom))))


def down_labels(labels: tuple[str, ...]) -> tuple[str, ...]:
    """Labels of a down projection's weight: it contracts F and keeps D (a projection's own labels
    call the contracted dim "D" and the output dim "F")."""
    return tuple({"D": "F", "F": "D"}.get(c, c) for c in labels)


def dot(view: View, atom: Any) -> tuple[Any, Any, tuple, tuple, tuple, tuple] | None:
    eqn = view.producer(atom)
    if eqn is None or eqn.primitive.name != "dot_general":
        return None
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = (view.canon(v) for v in eqn.invars)
    return lhs, rhs, tuple(lc), tuple(rc), tuple(lb), tuple(rb)


def dot_labels(lhs_l, rhs_l, lc, rc, lb, rb) -> tuple[str, ...]:
    free_l = [lab for i, lab in enumerate(lhs_l) if i not in lc and i not in lb]
    free_r = [lab for i, lab in enumerate(rhs_l) if i not in rc and i not in rb]
    return tuple([lhs_l[i] for i in lb] + free_l + free_r)


def strip_bias(view: View, atom: Any) -> tuple[Any, Any, dict[int, int] | None]:
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


def bias_labels(bias: Any, dims: dict[int, int] | None, labels: tuple[str, ...], want: set[str]):
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


def cut_bias(bias: Bias | None | bool, cols: Cols) -> Bias | None | bool:
    """A bias of the whole fused projection, seen from the columns `cols` of it."""
    return bias._replace(cols=cols) if isinstance(bias, Bias) else bias
