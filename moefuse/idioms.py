"""Idiom raising: recognise common multi-op spellings in a `View` as one meaning.

Each recogniser takes a view and an atom and returns what the idiom binds, or None::

    if (sm := softmax(view, probs)) is not None:
        x, axis = sm.operand, sm.axis
    sigmoid(view, s)                 # -> operand of lax.logistic
    take_along_axis(view, w)         # -> (array, indices) for x[..., idx] along the last axis
    take_rows_along(view, y)         # -> (array, indices, axis) for whole rows picked along an axis
    indices_below(view, ids, n)      # -> whether ids are known to lie in [0, n) (top_k ids, argmax ...)
    take(view, g)                    # -> (vector, indices) for vec[idx]
    repeated_rows(view, r)           # -> (x, k) for jnp.repeat(x, k, axis=0)
    one_hot(view, m)                 # -> (indices, n)
    distinct_along_last(view, ids)   # -> whether ids never repeat along the last axis (top_k's)
    argsort(view, order)             # -> (keys, axis)
    inverse_permutation(view, inv)   # -> perm, for argsort(perm) or zeros.at[perm].set(arange)
    from_choice(view, w, ids)        # -> whether w is computed from the top-k that made ids
    reduction(view, r, "sum")        # -> (operand, axes), keepdims spellings included
    product(view, p)                 # -> Product(coef, factors): nested muls, neg, / const flattened
    column(view, c)                  # -> (a, j) for a[..., j]
    column_sum(view, s)              # -> ColumnSum: s = sum over j of f(a[..., j], b[..., j], ...)

Softmax is recognised inline (`exp(x - max) / sum`, with or without `stop_gradient`), as a
`custom_jvp` function whose body is that, as `exp(log_softmax(x))` and as `exp(x - logsumexp(x))`
(jax.nn.logsumexp's guards included). Sigmoid is `lax.logistic` or `1 / (1 + exp(-x))`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import numpy as np

from moefuse import _compat as C
from moefuse.view import View

_REDUCE_OPS = {"sum": "reduce_sum", "max": "reduce_max", "min": "reduce_min", "or": "reduce_or"}


def _shape(atom: Any) -> tuple[int, ...]:
    return tuple(atom.aval.shape)


def unexpand(view: View, atom: Any) -> tuple[Any, dict[int, int]]:
    """Strip broadcasts/reshapes that only add size-1 or broadcast dims.

    Returns (base, dims) where dims maps each base dimension to its dimension in `atom`.
    """
    atom = view.canon(atom)
    mapping = {d: d for d in range(len(_shape(atom)))}
    while True:
        eqn = view.producer(atom)
        if eqn is None:
            return atom, mapping
        src = view.canon(eqn.invars[0]) if eqn.invars else None
        name = eqn.primitive.name
        if name == "broadcast_in_dim" and src is not None:
            inner = {i: eqn.params["broadcast_dimensions"][i] for i in range(len(_shape(src)))}
        elif name == "reshape" and src is not None and eqn.params.get("dimensions") is None:
            inner = _reshape_unit_map(_shape(src), _shape(eqn.outvars[0]))
            if inner is None:
                return atom, mapping
        else:
            return atom, mapping
        mapping = {i: mapping[o] for i, o in inner.items() if o in mapping}
        atom = src


def index_array(view: View, indices: Any) -> Any | None:
    """The array of positions a gather/scatter reads: its `indices` [..., 1] without the index dim.

    Only reshapes that add or drop size-1 dims and broadcasts that add them are looked through, so
    the result holds exactly indices[..., 0] (also when T or k is 1 and `ids.reshape(-1)` is itself
    such a reshape: the walk stops at the first array of the right shape).
    """
    atom = view.canon(indices)
    want = _shape(atom)[:-1]
    if not _shape(atom) or _shape(atom)[-1] != 1:
        return None
    while _shape(atom) != want:
        eqn = view.producer(atom)
        if eqn is None or eqn.primitive.name not in ("reshape", "broadcast_in_dim"):
            return None
        src = view.canon(eqn.invars[0])
        if int(np.prod(_shape(src))) != int(np.prod(_shape(atom))):
            return None
        if eqn.primitive.name == "reshape" and (
            eqn.params.get("dimensions") is not None or _reshape_unit_map(_shape(src), _shape(atom)) is None
        ):
            return None
        if eqn.primitive.name == "broadcast_in_dim" and list(eqn.params["broadcast_dimensions"]) != sorted(
            eqn.params["broadcast_dimensions"]
        ):
            return None
        atom = src
    return atom


def _reshape_unit_map(src: tuple[int, ...], out: tuple[int, ...]) -> dict[int, int] | None:
    """Dim map for a reshape that only inserts/removes size-1 dims, else None."""
    s = [i for i, n in enumerate(src) if n != 1]
    o = [i for i, n in enumerate(out) if n != 1]
    if [src[i] for i in s] != [out[i] for i in o]:
        return None
    return dict(zip(s, o))


def reduction(view: View, atom: Any, kind: str) -> tuple[Any, tuple[int, ...]] | None:
    """(operand, axes) if `atom` is reduce_<kind>(operand, axes), possibly re-expanded (keepdims).

    When re-expanded, the result must broadcast back onto the operand with the reduced axes in
    place (so `x / reduction` divides each row by its own total).
    """
    base, dims = unexpand(view, atom)
    eqn = view.producer(base)
    if eqn is None or eqn.primitive.name != _REDUCE_OPS[kind]:
        return None
    operand = view.canon(eqn.invars[0])
    axes = tuple(sorted(eqn.params["axes"]))
    kept = [d for d in range(len(_shape(operand))) if d not in axes]
    out_shape = _shape(atom)
    if atom is base or view.canon(atom) is base:
        return operand, axes
    if len(out_shape) != len(_shape(operand)):
        return None
    for b, od in enumerate(kept):
        if dims.get(b) != od:
            return None
    for d in axes:
        if out_shape[d] not in (1, _shape(operand)[d]):
            return None
    return operand, axes


def renormalised(view: View, atom: Any) -> Any | None:
    """m if atom = m / sum(m, axis=-1, keepdims=True): each row divided by its own total."""
    if view.op(atom) != "div":
        return None
    num, den = view.args(atom)
    red = reduction(view, den, "sum")
    if red is None or not view.same(red[0], num) or tuple(red[1]) != (len(_shape(num)) - 1,):
        return None
    return num


@dataclasses.dataclass(frozen=True)
class Softmax:
    operand: Any
    axis: int


def softmax(view: View, atom: Any) -> Softmax | None:
    """`exp(x - max(x)) / sum(...)` over one axis, inline or as a custom_jvp / log_softmax form."""
    atom = view.canon(atom)
    name = view.op(atom)
    if name in C.CUSTOM_JVP_NAMES:
        return _softmax_custom_jvp(view, atom)
    if name == "exp":
        (inner,) = view.args(atom)
        ls = log_softmax(view, inner) or _minus_logsumexp(view, inner)
        return None if ls is None else Softmax(ls.operand, ls.axis)
    if name != "div":
        return None
    num, den = view.args(atom)
    red = reduction(view, den, "sum")
    if red is None or not view.same(red[0], num) or len(red[1]) != 1:
        return None
    axis = red[1][0]
    got = _exp_shifted(view, num, axis)
    return None if got is None else Softmax(got, axis)


def _exp_shifted(view: View, e: Any, axis: int, guarded: bool = False) -> Any | None:
    """x for `e = exp(x - stop_gradient(max(x, axis)))` (the -inf clamp optional; with `guarded`, also
    logsumexp's shift `where(isfinite(max), max, 0)`)."""
    if view.op(e) != "exp":
        return None
    (shifted,) = view.args(e)
    if view.op(shifted) != "sub":
        return None
    x, m = view.args(shifted)
    m = view.canon(m, through_stop_gradient=True)
    m = _unguarded(view, m) if guarded else m
    base, dims = unexpand(view, m)
    base = view.canon(base, through_stop_gradient=True)
    if view.op(base) == "max":  # max(-inf, reduce_max(x)) guards all -inf rows
        a, b = view.args(base)
        base = b if view.scalar(a) == float("-inf") else a if view.scalar(b) == float("-inf") else None
        if base is None:
            return None
    if _first_of_sorted(view, base, x, axis):
        return x  # max of top_k values (sorted descending) taken as their first column
    red = reduction(view, base, "max")
    if red is None:
        return None
    perm = list(range(len(_shape(x))))  # x's dim d is dim perm[d] of the array the max reads
    if not view.same(red[0], x):
        t = view.producer(view.canon(x))  # the max taken before a transpose (vmap over tokens)
        if t is None or t.primitive.name != "transpose" or not view.same(view.canon(t.invars[0]), red[0]):
            return None
        perm = list(t.params["permutation"])
    if red[1] != (perm[axis],):
        return None
    kept = [d for d in range(len(perm)) if d != perm[axis]]
    if any(dims.get(b) != perm.index(sd) for b, sd in enumerate(kept)):
        return None
    return x


def _unguarded(view: View, m: Any) -> Any:
    """m for `where(isfinite(m), m, 0)` (logsumexp's guard of an infinite shift), else m itself.

    The guard acts only on rows whose max is infinite: a row of -inf is NaN both ways; a row holding
    +inf is NaN at the +inf entries and 0 elsewhere here, NaN everywhere in jax.nn.softmax."""
    if view.op(m) != "select_n" or len(view.args(m)) != 3:
        return m
    pred, on_false, on_true = view.args(m)
    if view.op(pred) == "is_finite" and view.same(view.args(pred)[0], on_true) and view.scalar(on_false) == 0:
        return on_true
    return m


def _first_of_sorted(view: View, m: Any, x: Any, axis: int) -> bool:
    """Whether m == x[..., 0:1] along `axis` and x is top_k values (sorted, so that is the max)."""
    eqn = view.producer(m)
    if eqn is None or eqn.primitive.name != "slice" or view.canon(eqn.invars[0]) is not view.canon(x):
        return False
    rank = len(_shape(x))
    full = tuple(0 if d == axis else None for d in range(rank))
    starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
    if any(st != 1 for st in eqn.params.get("strides") or ()) or limits[axis] != 1:
        return False
    if any(full[d] is None and (starts[d], limits[d]) != (0, _shape(x)[d]) for d in range(rank)):
        return False
    t = view.producer(x)
    return t is not None and t.primitive.name == "top_k" and view.out_index(x) == 0 and axis == rank - 1


def log_softmax(view: View, atom: Any) -> Softmax | None:
    """`(x - max) - log(sum(exp(x - max)))` as jax.nn.log_softmax spells it."""
    atom = view.canon(atom)
    if view.op(atom) != "sub":
        return None
    shifted, logsum = view.args(atom)
    base, _ = unexpand(view, logsum)
    if view.op(base) == "log":
        inner = view.args(base)[0]
    elif view.op(logsum) == "log":
        inner = view.args(logsum)[0]
    else:
        return None
    red = reduction(view, inner, "sum")
    if red is None or len(red[1]) != 1:
        return None
    e = red[0]
    if view.op(e) != "exp" or view.canon(view.args(e)[0]) is not view.canon(shifted):
        return None
    x = _exp_shifted(view, e, red[1][0])
    return None if x is None else Softmax(x, red[1][0])


def _minus_logsumexp(view: View, atom: Any) -> Softmax | None:
    """`x - logsumexp(x)` as jax.nn.logsumexp spells it: `x - (log(|sum(exp(x - c))|) + c)` with the shift
    c = stop_gradient(max(x)) (zero where the max is not finite); |.| of a sum of exps is the sum."""
    if view.op(atom) != "sub":
        return None
    x, lse = view.args(atom)
    if view.op(lse) != "add":
        return None
    for logged, shift in itertools.permutations(view.args(lse)):
        logged, _ = unexpand(view, logged)
        if view.op(logged) != "log":
            continue
        total = view.args(logged)[0]
        if view.op(total) == "abs":
            total = view.args(total)[0]
        red = reduction(view, total, "sum")
        if red is None or len(red[1]) != 1:
            continue
        e = red[0]
        if view.op(e) != "exp" or view.op(view.args(e)[0]) != "sub":
            continue
        if not view.same(view.args(view.args(e)[0])[1], shift):
            continue
        got = _exp_shifted(view, e, red[1][0], guarded=True)
        if got is not None and view.same(got, x):
            return Softmax(x, red[1][0])
    return None


def _softmax_custom_jvp(view: View, atom: Any) -> Softmax | None:
    eqn = view.producer(atom)
    body = C.as_closed(eqn.params["call_jaxpr"])
    if len(body.jaxpr.outvars) != 1 or eqn.params.get("num_consts", 0):
        return None
    inner = View(body)
    sm = softmax(inner, body.jaxpr.outvars[0])
    if sm is None or sm.operand not in body.jaxpr.invars:
        return None
    return Softmax(view.canon(eqn.invars[body.jaxpr.invars.index(sm.operand)]), sm.axis)


@dataclasses.dataclass(frozen=True)
class Product:
    """atom = coef * factors[0] * factors[1] * ... (factors in the normal form, constants folded)."""

    coef: float
    factors: tuple[Any, ...]


def product(view: View, atom: Any, depth: int = 6) -> Product:
    """`atom` read as a product: nested multiplications flattened in any association, `neg` and
    scalar constants (multiplied, or divided by) folded into one coefficient. Every atom is a product
    (of itself, coefficient 1); `(0.5 * x) * y`, `x * (y * 0.5)` and `-(x * y) / -2` are all
    Product(0.5, (x, y)). The coefficient is exact only as real numbers: the program rounds after each
    step, so compare it with a tolerance of the dtype's precision."""
    atom = view.canon(atom)
    if (c := view.scalar(atom)) is not None:
        return Product(c, ())
    name = view.op(atom)
    if depth > 0 and name == "mul":
        a, b = (product(view, v, depth - 1) for v in view.args(atom))
        return Product(a.coef * b.coef, a.factors + b.factors)
    if depth > 0 and name == "neg":
        inner = product(view, view.args(atom)[0], depth - 1)
        return Product(-inner.coef, inner.factors)
    if depth > 0 and name == "div":
        num, den = view.args(atom)
        c = view.scalar(den)
        if c is not None and c != 0:
            inner = product(view, num, depth - 1)
            return Product(inner.coef / c, inner.factors)
    return Product(1.0, (atom,))


def sigmoid(view: View, atom: Any) -> Any | None:
    """x for `lax.logistic(x)` (jax.nn.sigmoid) or `1 / (1 + exp(-x))` (which XLA computes the same way)."""
    if view.op(atom) == "logistic":
        return view.args(atom)[0]
    if view.op(atom) != "div" or view.scalar(view.args(atom)[0]) != 1.0:
        return None
    den = view.args(atom)[1]
    if view.op(den) != "add":
        return None
    for one, e in itertools.permutations(view.args(den)):
        if view.scalar(one) == 1.0 and view.op(e) == "exp" and view.op(view.args(e)[0]) == "neg":
            return view.args(view.args(e)[0])[0]
    return None


def take_along_axis(view: View, atom: Any) -> tuple[Any, Any] | None:
    """(arr, idx) if atom[..., j] == arr[..., idx[..., j]] along the last axis."""
    eqn = view.producer(atom)
    if eqn is None or eqn.primitive.name != "gather":
        return None
    arr, ind = (view.canon(v) for v in eqn.invars)
    dn = eqn.params["dimension_numbers"]
    r = len(_shape(arr))
    if tuple(eqn.params["slice_sizes"]) != (1,) * r:
        return None
    if tuple(dn.collapsed_slice_dims) == (r - 1,) and tuple(dn.start_index_map) == (r - 1,):
        if not _batched_along_last(dn, _shape(arr), _shape(ind), len(_shape(atom))):
            return None
        idx, _ = unexpand(view, ind)
        return (arr, idx) if _shape(idx) == _shape(atom) else None
    if tuple(dn.offset_dims) != ():
        return None
    if (
        tuple(dn.collapsed_slice_dims) == tuple(range(r))
        and tuple(dn.start_index_map) == tuple(range(r))
        and not dn.operand_batching_dims
    ):
        return take_along_concat(view, arr, ind, _shape(atom))
    return None


def take_rows_along(view: View, atom: Any) -> tuple[Any, Any, int] | None:
    """(arr, idx, axis) if atom[b.., j, r..] == arr[b.., idx[b.., j], r..]: whole trailing rows picked
    along `axis`, each batch position b.. with its own indices (`jnp.take_along_axis(arr, idx[..., None],
    axis)` of an array with trailing dims, e.g. the k chosen experts' outputs out of [T, E, D])."""
    eqn = view.producer(atom)
    if eqn is None or eqn.primitive.name != "gather":
        return None
    arr, ind = (view.canon(v) for v in eqn.invars)
    dn = eqn.params["dimension_numbers"]
    shape, out = _shape(arr), _shape(atom)
    if len(dn.start_index_map) != 1 or tuple(dn.collapsed_slice_dims) != tuple(dn.start_index_map):
        return None
    axis = dn.start_index_map[0]
    lead, trail = tuple(range(axis)), tuple(range(axis + 1, len(shape)))
    if tuple(dn.operand_batching_dims) != lead or tuple(dn.start_indices_batching_dims) != lead:
        return None
    if tuple(eqn.params["slice_sizes"]) != (1,) * (axis + 1) + shape[axis + 1 :]:
        return None
    if tuple(dn.offset_dims) != tuple(range(axis + 1, len(out))) or len(out) != len(shape):
        return None
    idx, _ = unexpand(view, ind)
    if _shape(ind)[-1] != 1 or _shape(idx) != out[: axis + 1] or not trail:
        return None
    return arr, idx, axis


def indices_below(view: View, atom: Any, n: int) -> bool:
    """Whether `atom` holds indices known to lie in [0, n): top_k ids of at most n candidates, an
    argmax / argmin over at most n, an iota up to n, or layouts, reversals, sorts (an argsort's
    permuted iota) and concatenations of those."""
    atom = view.canon(atom)
    eqn = view.producer(atom)
    if eqn is None:
        return False
    name = eqn.primitive.name
    if name in ("top_k", "approx_top_k") and view.out_index(atom) == 1:
        return _shape(eqn.invars[0])[-1] <= n
    if name in ("argmax", "argmin"):
        return all(_shape(eqn.invars[0])[a] <= n for a in eqn.params["axes"])
    if name == "iota":
        return eqn.params["shape"][eqn.params["dimension"]] <= n
    if name in ("broadcast_in_dim", "reshape", "squeeze", "expand_dims", "slice", "transpose", "rev"):
        return indices_below(view, eqn.invars[0], n)
    if name == "sort":  # each output is its operand's values permuted (an argsort's payload: an iota)
        return indices_below(view, eqn.invars[view.out_index(atom)], n)
    if name == "concatenate":
        return all(indices_below(view, v, n) for v in eqn.invars)
    return False


def _batched_along_last(
    dn: Any, arr_shape: tuple[int, ...], ind_shape: tuple[int, ...], out_rank: int
) -> bool:
    """Whether a gather indexing arr's last axis keeps every other dim d of arr at output dim d and puts
    the one free dim of the indices last: each leading dim batched with an indices dim, or of size 1
    and kept as an offset dim (jnp.take_along_axis leaves size-1 dims out of the batching)."""
    r = len(arr_shape)
    if out_rank != r or not ind_shape or ind_shape[-1] != 1:
        return False
    batched = dict(zip(dn.operand_batching_dims, dn.start_indices_batching_dims))
    kept = [d for d in range(r - 1) if d not in batched]
    if any(arr_shape[d] != 1 for d in kept) or len(kept) != len(dn.offset_dims):
        return False
    ind_out = [p for p in range(out_rank) if p not in dn.offset_dims]  # output dims of the indices' dims
    if len(ind_out) != len(ind_shape) - 1:
        return False
    out_of = {d: dn.offset_dims[i] for i, d in enumerate(kept)}
    out_of.update({d: ind_out[i] for d, i in batched.items()})
    free = [i for i in range(len(ind_shape) - 1) if i not in batched.values()]
    return all(out_of[d] == d for d in range(r - 1)) and len(free) == 1 and ind_out[free[0]] == r - 1


def take_along_concat(view: View, arr: Any, ind: Any, out_shape: tuple[int, ...]) -> tuple[Any, Any] | None:
    """Old spelling: indices = concat([iota_0, ..., iota_{r-2}, idx], -1)."""
    eqn = view.producer(ind)
    if eqn is None or eqn.primitive.name != "concatenate":
        return None
    parts = [view.canon(v) for v in eqn.invars]
    r = len(_shape(arr))
    if len(parts) != r:
        return None
    for d, part in enumerate(parts[:-1]):
        if not _is_iota_along(view, part, d, out_shape):
            return None
    idx, _ = unexpand(view, parts[-1])
    return (arr, idx) if _shape(idx) == out_shape else None


def _is_iota_along(view: View, atom: Any, dim: int, out_shape: tuple[int, ...]) -> bool:
    """Whether atom (shape out_shape + (1,)) holds the index of dimension `dim` everywhere."""
    base, dims = unexpand(view, atom)
    eqn = view.producer(base)
    if eqn is None or eqn.primitive.name != "iota":
        return False
    bshape = _shape(base)
    it_dim = eqn.params["dimension"]
    if bshape[it_dim] != out_shape[dim] or dims.get(it_dim) != dim:
        return False
    return all(n == 1 for i, n in enumerate(bshape) if i != it_dim)


def take(view: View, atom: Any) -> tuple[Any, Any] | None:
    """(arr, idx) if atom == arr[idx] along axis 0 (jnp.take, fancy indexing; any trailing dims)."""
    eqn = view.producer(atom)
    if eqn is None or eqn.primitive.name != "gather":
        return None
    arr, ind = (view.canon(v) for v in eqn.invars)
    dn = eqn.params["dimension_numbers"]
    shape = _shape(arr)
    if tuple(eqn.params["slice_sizes"]) != (1, *shape[1:]) or dn.operand_batching_dims:
        return None
    if tuple(dn.collapsed_slice_dims) != (0,) or tuple(dn.start_index_map) != (0,):
        return None
    idx = index_array(view, ind)
    if idx is None:
        return None
    lead = len(_shape(idx))
    if tuple(dn.offset_dims) != tuple(range(lead, lead + len(shape) - 1)):
        return None
    return (arr, idx) if _shape(atom) == _shape(idx) + shape[1:] else None


def repeated_rows(view: View, atom: Any) -> tuple[Any, int] | None:
    """(x, k) if atom == jnp.repeat(x, k, axis=0): row i of atom is row i // k of x.

    The spelling is a broadcast to [T, k, ...] then a reshape to [T * k, ...]; so
    `repeat(x, k)[idx]` is `x[idx // k]`.
    """
    eqn = view.producer(atom)
    if eqn is None or eqn.primitive.name != "reshape" or eqn.params.get("dimensions") is not None:
        return None
    wide = view.canon(eqn.invars[0])
    b = view.producer(wide)
    if b is None or b.primitive.name != "broadcast_in_dim":
        return None
    x = view.canon(b.invars[0])
    xs, ws = _shape(x), _shape(wide)
    if not xs or len(ws) != len(xs) + 1 or tuple(b.params["broadcast_dimensions"]) != (0, *range(2, len(ws))):
        return None
    if ws[0] != xs[0] or ws[2:] != xs[1:] or _shape(atom) != (xs[0] * ws[1], *xs[1:]):
        return None
    return x, ws[1]


def pair_rows(view: View, atom: Any) -> int | None:
    """k if the 1-D atom [T * k] holds i // k at position i: the token of each (token, slot) pair of a
    [T, k] layout flattened in row-major order (`jnp.arange(T * k) // k`, `jnp.repeat(jnp.arange(T), k)`).
    """
    atom = view.canon(atom)
    if len(_shape(atom)) != 1 or not np.issubdtype(atom.aval.dtype, np.integer):
        return None  # (a float division is not i // k)
    if view.op(atom) == "div":
        iota, k = view.args(atom)
        n = view.scalar(k)
        if view.op(iota) == "iota" and n is not None and n >= 1 and n == int(n) and _shape(atom)[0] % n == 0:
            return int(n)
        return None
    repeated = repeated_rows(view, atom)
    if repeated is None or view.op(repeated[0]) != "iota" or len(_shape(repeated[0])) != 1:
        return None
    return repeated[1]


def segment_ids(view: View, atom: Any) -> Any | None:
    """sizes if atom[i] is the segment row i lies in, for consecutive segments of `sizes` rows
    (for i < sum(sizes), sizes >= 0): `jnp.repeat(jnp.arange(E), sizes, total_repeat_length=N)`.

    The spelling is jnp.repeat's: arange(E)[cumsum(zeros(N).at[starts].add(1)) - 1], with starts
    the exclusive cumsum of sizes (cumsum of sizes rolled by one with a 0 first, or cumsum - sizes).
    """
    taken = take(view, _unwrapped(view, atom))
    if taken is None or not _is_iota_along(view, taken[0], 0, _shape(taken[0])):
        return None
    idx = _unwrapped(view, taken[1])
    if view.op(idx) != "sub" or view.scalar(view.args(idx)[1]) != 1:
        return None
    counts = view.canon(view.args(idx)[0])
    if view.op(counts) != "cumsum" or view.params(counts).get("reverse"):
        return None
    marks = view.canon(view.args(counts)[0])
    if view.op(marks) not in ("scatter-add", "scatter_add"):
        return None
    eqn = view.producer(marks)
    operand, indices, updates = (view.canon(v) for v in eqn.invars[:3])
    dn = eqn.params["dimension_numbers"]
    if view.scalar(operand) != 0 or view.scalar(updates) != 1 or tuple(dn.inserted_window_dims) != (0,):
        return None
    starts = index_array(view, indices)
    return None if starts is None else _exclusive_cumsum_of(view, _unwrapped(view, starts))


def _unwrapped(view: View, atom: Any) -> Any:
    """i for `select_n(i < 0, i, i + n)` (negative indices wrapped), else atom. Only for values that
    are never negative by their structure (segment_ids reads three: a count of starts at or before
    each row minus one, with a start at row 0; an arange's values; an exclusive cumsum of sizes >= 0)."""
    atom = view.canon(atom)
    eqn = view.producer(atom)
    if eqn is None or eqn.primitive.name != "select_n" or len(eqn.invars) != 3:
        return atom
    pred, on_false, on_true = (view.canon(v) for v in eqn.invars)
    lt, add = view.producer(pred), view.producer(on_true)
    if lt is None or add is None or lt.primitive.name != "lt" or add.primitive.name != "add":
        return atom
    if view.canon(lt.invars[0]) is not on_false or view.scalar(lt.invars[1]) != 0:
        return atom
    return on_false if any(view.canon(v) is on_false for v in add.invars) else atom


def _exclusive_cumsum_of(view: View, atom: Any) -> Any | None:
    """sizes if atom == cumsum(sizes) - sizes, or cumsum of sizes shifted right by one with a 0 first."""
    if view.op(atom) == "sub":
        total, sizes = (view.canon(a) for a in view.args(atom))
        if view.op(total) == "cumsum" and view.same(view.args(total)[0], sizes):
            return sizes
        return None
    if view.op(atom) != "cumsum" or view.params(atom).get("reverse"):
        return None
    shifted = view.canon(view.args(atom)[0])
    if view.op(shifted) != "scatter":  # .at[0].set(0) of the roll
        return None
    eqn = view.producer(shifted)
    rolled, indices, updates = (view.canon(v) for v in eqn.invars[:3])
    at = view.value(indices)
    if view.scalar(updates) != 0 or at is None or np.asarray(at).ravel().tolist() != [0]:
        return None
    if view.op(rolled) != "concatenate" or len(view.args(rolled)) != 2:  # roll by one: [s[-1:], s[:-1]]
        return None
    last, first = view.args(rolled)
    n = _shape(rolled)[0]
    a, b = view.producer(last), view.producer(first)
    if a is None or b is None or a.primitive.name != "slice" or b.primitive.name != "slice":
        return None
    sizes = view.canon(a.invars[0])
    if not view.same(b.invars[0], sizes) or len(_shape(sizes)) != 1:
        return None
    if (tuple(a.params["start_indices"]), tuple(b.params["limit_indices"])) != ((n - 1,), (n - 1,)):
        return None
    return sizes if tuple(b.params["start_indices"]) == (0,) else None


def one_hot(view: View, atom: Any) -> tuple[Any, int] | None:
    """(ids, n) if atom[..., j] == (ids[...] == j) for j < n (bool or any numeric dtype)."""
    atom = view.canon(atom)
    if view.op(atom) == "convert_element_type":
        atom = view.args(atom)[0]
    if view.op(atom) != "eq":
        return None
    out_shape = _shape(atom)
    a, b = view.args(atom)
    for ids_side, iota_side in ((a, b), (b, a)):
        if _is_iota_along(view, iota_side, len(out_shape) - 1, out_shape[:-1] + (out_shape[-1],)):
            ids, dims = unexpand(view, ids_side)
            if _shape(ids) == out_shape[:-1] and all(dims.get(i) == i for i in range(len(out_shape) - 1)):
                return ids, out_shape[-1]
    return None


def argsort(view: View, atom: Any) -> tuple[Any, int] | None:
    """(keys, axis) if atom is the permutation that stably sorts keys ascending along axis."""
    eqn = view.producer(atom)
    if eqn is None or eqn.primitive.name != "sort" or eqn.params.get("num_keys") != 1:
        return None
    if len(eqn.invars) != 2 or view.out_index(atom) != 1:
        return None
    axis = eqn.params["dimension"]
    keys, payload = (view.canon(v) for v in eqn.invars)
    if not _is_iota_along(view, payload, axis, _shape(payload)) and not (
        view.op(payload) == "iota" and view.params(payload)["dimension"] == axis
    ):
        return None
    return keys, axis


def descending_argsort(view: View, atom: Any) -> tuple[Any, int] | None:
    """(keys, axis) if atom is the permutation that stably sorts keys descending along axis, ties to
    the lower index, as `jnp.argsort(keys, descending=True)` spells it: the stable ascending argsort of
    the reversed keys (payload the reversed iota), reversed back."""
    eqn = view.producer(atom)
    if eqn is None or eqn.primitive.name != "rev" or len(eqn.params["dimensions"]) != 1:
        return None
    (axis,) = eqn.params["dimensions"]
    sort = view.producer(eqn.invars[0])
    if (
        sort is None
        or sort.primitive.name != "sort"
        or not sort.params.get("is_stable")
        or sort.params.get("num_keys") != 1
        or len(sort.invars) != 2
        or view.out_index(eqn.invars[0]) != 1
        or sort.params["dimension"] != axis
    ):
        return None
    keys, payload = (view.producer(v) for v in sort.invars)
    for rev in (keys, payload):
        if rev is None or rev.primitive.name != "rev" or tuple(rev.params["dimensions"]) != (axis,):
            return None
    iota = view.canon(payload.invars[0])
    if view.op(iota) != "iota" or view.params(iota)["dimension"] != axis:
        return None
    return view.canon(keys.invars[0]), axis


def inverse_permutation(view: View, atom: Any) -> Any | None:
    """perm if atom [N] is the inverse of the permutation perm = argsort(...) along axis 0:
    `argsort(perm)`, or `zeros(N).at[perm].set(arange(N))` (both give inv[perm[i]] = i)."""
    got = argsort(view, atom)
    if got is not None:
        perm, axis = got
        return perm if axis == 0 and len(_shape(atom)) == 1 and argsort(view, perm) is not None else None
    eqn = view.producer(atom)
    if eqn is None or eqn.primitive.name != "scatter" or len(_shape(atom)) != 1:
        return None
    operand, indices, updates = (view.canon(v) for v in eqn.invars[:3])
    dn = eqn.params["dimension_numbers"]
    if tuple(dn.inserted_window_dims) != (0,) or tuple(dn.scatter_dims_to_operand_dims) != (0,):
        return None
    perm = index_array(view, indices)
    if perm is None or view.scalar(operand) is None or _shape(perm) != _shape(atom):
        return None
    got = argsort(view, perm)
    if got is None or got[1] != 0 or view.op(updates) != "iota" or view.params(updates)["dimension"] != 0:
        return None
    return perm


def put_along_last_axis(view: View, atom: Any) -> tuple[Any, Any] | None:
    """(idx, updates) if atom == zeros.at[rows, idx].set(updates) (or .add) along the last axis.

    The scatter writes one element per (row, j) at column idx[row, j]: the old spelling of
    `put_along_axis`, with indices concat([iota_0, ..., idx]).
    """
    eqn = view.producer(atom)
    if eqn is None or eqn.primitive.name not in ("scatter", "scatter-add", "scatter_add"):
        return None
    operand, indices, updates = (view.canon(v) for v in eqn.invars[:3])
    dn = eqn.params["dimension_numbers"]
    rank = len(_shape(operand))
    if view.scalar(operand) != 0.0 or dn.update_window_dims or dn.operand_batching_dims:
        return None
    every = tuple(range(rank))
    if tuple(dn.inserted_window_dims) != every or tuple(dn.scatter_dims_to_operand_dims) != every:
        return None
    got = take_along_concat(view, operand, indices, _shape(updates))
    return None if got is None else (got[1], updates)


def bincount(view: View, atom: Any) -> tuple[Any, int] | None:
    """(ids, n) if atom[e] == number of entries of the 1-D ids equal to e, for e < n.

    Spellings: scatter-add of ones into zeros (jnp.bincount, `.at[ids].add(1)`), segment_sum of
    ones, and `one_hot(ids, n).sum(0)`.
    """
    atom = view.canon(atom)
    if view.op(atom) == "convert_element_type":
        atom = view.args(atom)[0]
    if len(_shape(atom)) != 1:
        return None
    n = _shape(atom)[0]
    name = view.op(atom)
    if name in ("scatter-add", "scatter_add"):
        eqn = view.producer(atom)
        operand, indices, updates = (view.canon(v) for v in eqn.invars[:3])
        dn = eqn.params["dimension_numbers"]
        if view.scalar(operand) != 0 or view.scalar(updates) != 1 or dn.update_window_dims:
            return None
        if tuple(dn.inserted_window_dims) != (0,) or tuple(dn.scatter_dims_to_operand_dims) != (0,):
            return None
        ids = index_array(view, indices)
        return (ids, n) if ids is not None and len(_shape(ids)) == 1 and view.is_nonneg_index(ids) else None
    if name == "reduce_sum" and tuple(view.params(atom)["axes"]) == (0,):
        got = one_hot(view, view.args(atom)[0])
        return (got[0], n) if got is not None and got[1] == n and len(_shape(got[0])) == 1 else None
    return None


def membership(view: View, pred: Any) -> tuple[Any, bool] | None:
    """(mask, positive): pred is mask != 0 (positive) or mask == 0 (negative), spelled with `ne`, `gt`
    or `eq` against 0, `not`, a cast to bool, or the bool mask itself."""
    name = view.op(pred)
    if name == "not":
        got = membership(view, view.args(pred)[0])
        return None if got is None else (got[0], not got[1])
    if name == "convert_element_type":
        return view.args(pred)[0], True
    if name in ("ne", "gt", "eq"):
        a, b = view.args(pred)
        if view.scalar(b) == 0.0:
            return a, name != "eq"
        return None
    if pred.aval.dtype == bool:
        return pred, True
    return None


def chosen_along_last(view: View, gm: Any, n: int) -> Any | None:
    """ids if gm[.., g] (g < n) is non-zero exactly for the g in ids[.., :] (scatter or one_hot-sum
    spellings).

    Every spelling below is a count >= 0, so clipping it to [0, c] with c > 0 (`jnp.clip(.., 0, 1)`)
    keeps which entries are non-zero, which is all a mask condition reads."""
    name = view.op(gm)
    if name == "convert_element_type":
        return chosen_along_last(view, view.args(gm)[0], n)
    if name in ("min", "max"):
        a, b = view.args(gm)
        for bound, inner in ((a, b), (b, a)):
            c = view.scalar(bound)
            if c is not None and (c > 0 if name == "min" else c == 0):
                return chosen_along_last(view, inner, n)
        return None
    if name in ("reduce_sum", "reduce_max", "reduce_or"):
        (oh,) = view.args(gm)
        if tuple(view.params(gm)["axes"]) != (len(_shape(oh)) - 2,):
            return None
        got = one_hot(view, oh)
        return got[0] if got is not None and got[1] == n else None
    got = put_along_last_axis(view, gm)
    if got is not None and view.scalar(got[1]) == 1.0:
        return got[0]
    return None


def masked_at_choice(view: View, atom: Any, fill: float = 0.0) -> tuple[Any, Any] | None:
    """(s, ids) if atom = where(mask, s, fill) with the mask true exactly at the distinct ids along the
    last axis (a scatter of True at them, or their one-hot summed); a fill of 0 must be +0.0."""
    if view.op(atom) != "select_n" or len(view.args(atom)) != 3:
        return None
    pred, on_false, on_true = view.args(atom)
    member = membership(view, pred)
    if member is None or _shape(member[0]) != _shape(atom):
        return None
    ids = chosen_along_last(view, member[0], _shape(atom)[-1])
    s, other = (on_true, on_false) if member[1] else (on_false, on_true)
    got = view.scalar(other)
    if ids is None or got != fill or math.copysign(1.0, got) != math.copysign(1.0, fill):
        return None
    return (s, ids) if distinct_along_last(view, ids) else None


def distinct_along_last(view: View, ids: Any) -> bool:
    """Whether the integer array ids [..., k] never holds one value twice along its last axis: the
    indices of a `lax.top_k` over that axis (k different positions of its operand)."""
    ids = view.canon(ids)
    eqn = view.producer(ids)
    if eqn is None or eqn.primitive.name != "top_k" or view.out_index(ids) != 1:
        return False
    rank = len(_shape(ids))
    return eqn.params.get("axis", rank - 1) in (-1, rank - 1)



# Primitives applied element by element (scalars broadcast): a function of column j stays one of column j.
_ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "neg", "max", "min", "abs", "sign", "exp", "log", "tanh", "logistic",
    "sqrt", "rsqrt", "integer_pow", "pow", "select_n", "eq", "ne", "lt", "le", "gt", "ge", "and", "or",
    "not", "convert_element_type",
})
_SYMMETRIC = frozenset({"add", "mul", "max", "min", "eq", "ne", "and", "or"})


def column(view: View, atom: Any) -> tuple[Any, int] | None:
    """(a, j) if atom is `a[..., j]`: column j of a [..., k] along its last axis (a slice of width one
    there, then that axis squeezed)."""
    eqn = view.producer(atom)
    if eqn is None or eqn.primitive.name != "squeeze":
        return None
    cut = view.producer(eqn.invars[0])
    if cut is None or cut.primitive.name != "slice" or set(cut.params.get("strides") or (1,)) != {1}:
        return None
    a = view.canon(cut.invars[0])
    last = len(_shape(a)) - 1
    starts, limits = cut.params["start_indices"], cut.params["limit_indices"]
    if last < 1 or tuple(eqn.params["dimensions"]) != (last,) or limits[last] != starts[last] + 1:
        return None
    if any((starts[d], limits[d]) != (0, _shape(a)[d]) for d in range(last)):
        return None
    return a, int(starts[last])


@dataclasses.dataclass(frozen=True)
class ColumnSum:
    """atom = sum over j < k of f(a[..., j], b[..., j], ...): one elementwise f of column j of each of
    the arrays a, b ... [..., k] (and of values that are the same in every term)."""

    term: Any  # the term of column 0: f of the column-0 reads
    arrays: dict[Any, Any]  # each column-0 read in `term` (a canonical atom) -> the array it is column 0 of
    k: int


def column_sum(view: View, atom: Any) -> ColumnSum | None:
    """The sum over all k columns of an elementwise function of column j, written out as k terms added
    up (`where(ids[:, 0] == e, w[:, 0], 0) + where(ids[:, 1] == e, w[:, 1], 0)`), or None.

    Terms may come in any order and added zeros are ignored. Every term reads column j of its arrays
    for its own j, and is term 0 with each column 0 replaced by column j (values not read from a
    column must be the same in every term); each j < k appears once, k the arrays' last dim. (Summing
    the k terms in another order than the program differs from it only by rounding.)
    """
    terms = _add_terms(view, atom)
    if terms is None:
        return None
    by_column: dict[int, Any] = {}
    widths: set[int] = set()
    for term in terms:
        if view.scalar(term) == 0.0:
            continue
        reads = _column_reads(view, term)
        cols = {j for _, j in reads.values()}
        if len(cols) != 1 or next(iter(cols)) in by_column:
            return None
        by_column[next(iter(cols))] = term
        widths |= {_shape(a)[-1] for a, _ in reads.values()}
    if len(widths) != 1 or sorted(by_column) != list(range(next(iter(widths)))):
        return None
    first = by_column[0]
    cone = _column_cone(view, first)
    if not all(_same_but_column(view, first, t, j, cone, {}) for j, t in by_column.items()):
        return None
    return ColumnSum(first, {read: a for read, (a, _) in _column_reads(view, first).items()}, len(by_column))


_MAX_TERMS = 1024  # a sum of more terms than this is not read as one over columns


def _add_terms(view: View, atom: Any) -> list[Any] | None:
    """The terms of a tree of adds, each as often as it is added (atom itself when it is not an add);
    None past _MAX_TERMS."""
    terms, stack = [], [view.canon(atom)]
    while stack:
        a = stack.pop()
        if view.op(a) == "add":
            stack.extend(view.args(a)[::-1])
        elif len(terms) == _MAX_TERMS:
            return None
        else:
            terms.append(a)
    return terms


def _column_reads(view: View, atom: Any) -> dict[Any, tuple[Any, int]]:
    """{read: (a, j)} for each column read `read` = a[..., j] that atom computes from elementwise."""
    reads: dict[Any, tuple[Any, int]] = {}
    seen: set[Any] = set()
    stack = [view.canon(atom)]
    while stack:
        a = stack.pop()
        if C.is_literal(a) or a in seen:
            continue
        seen.add(a)
        got = column(view, a)
        if got is not None:
            reads[a] = got
        elif view.op(a) in _ELEMENTWISE:
            stack.extend(view.args(a))
    return reads


def _column_cone(view: View, atom: Any) -> set[Any]:
    """The values atom computes from elementwise that read a column (themselves, or their operands)."""
    cone: set[Any] = set()
    done: set[Any] = set()
    stack = [(view.canon(atom), False)]
    while stack:
        a, expanded = stack.pop()
        if C.is_literal(a) or (a in done and not expanded):
            continue
        if column(view, a) is not None:
            cone.add(a)
            done.add(a)
        elif view.op(a) not in _ELEMENTWISE:
            done.add(a)
        elif not expanded:
            stack.append((a, True))
            stack.extend((v, False) for v in view.args(a))
        else:
            done.add(a)
            if any(not C.is_literal(v) and v in cone for v in view.args(a)):
                cone.add(a)
    return cone


def _same_but_column(view: View, first: Any, other: Any, j: int, cone: set[Any], memo: dict) -> bool:
    """Whether `other` computes what `first` does with each column 0 it reads replaced by column j of
    the same array, and every other value the same (cone: `_column_cone` of the whole term)."""
    first, other = view.canon(first), view.canon(other)
    if C.is_literal(first) or C.is_literal(other) or first not in cone:
        return view.same(first, other)
    if (first, other) not in memo:
        memo[first, other] = _same_node_but_column(view, first, other, j, cone, memo)
    return memo[first, other]


def _same_node_but_column(view: View, first: Any, other: Any, j: int, cone: set[Any], memo: dict) -> bool:
    col = column(view, first)
    if col is not None:
        return col[1] == 0 and column(view, other) == (col[0], j)
    name = view.op(first)
    if view.op(other) != name or view.params(first) != view.params(other):
        return False
    a, b = view.args(first), view.args(other)
    if len(a) != len(b):
        return False
    if all(_same_but_column(view, x, y, j, cone, memo) for x, y in zip(a, b)):
        return True
    return name in _SYMMETRIC and all(_same_but_column(view, x, y, j, cone, memo) for x, y in zip(a, b[::-1]))


def from_choice(view: View, w: Any, ids: Any, depth: int = 6) -> bool:
    """Whether w [..., k] is computed, elementwise in the layout of ids [..., k], from the choice that
    made ids: the values of the `top_k` whose indices are ids, or an array gathered at ids along its
    last axis (`take_along_axis(scores, ids)`), through ops that keep that shape (a sigmoid of the
    values, a renormalisation, a cast)."""
    w, ids = view.canon(w), view.canon(ids)
    eqn = view.producer(w)
    if eqn is None or _shape(w) != _shape(ids):
        return False
    if eqn.primitive.name in ("top_k", "approx_top_k") and view.out_index(w) == 0:
        return view.canon(eqn.outvars[1]) is ids
    if eqn.primitive.name == "gather":
        got = take_along_axis(view, w)
        return got is not None and view.same(got[1], ids)
    same_layout = [a for a in view.args(w) if _shape(a) == _shape(w)]
    return depth > 0 and any(from_choice(view, a, ids, depth - 1) for a in same_layout)
