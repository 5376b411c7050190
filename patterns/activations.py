"""Expert activations: which value is `act(gate)` or `act(gate) * up`, in any spelling.

SwiGLU, GeGLU (erf or tanh GELU, inline or as `jax.nn`'s custom_jvp), GPT-OSS's clamped SwiGLU,
plain GELU / ReLU / SiLU::

    act, gate, up, act_params = activation_of(view, h)   # e.g. ("swiglu", g, u, ())
    kernel_activation("gelu_tanh")                      # {"activation": "gelu", "gelu_approximate": True}
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from moefuse import _compat as C
from moefuse import idioms
from moefuse.rewrite import inline_jits
from moefuse.view import View

SQRT_2_OVER_PI = 0.7978845834732056
GELU_TANH_C = 0.044714998453855515
INV_SQRT2 = 0.7071067690849304


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(a.aval.shape)


def kernel_activation(name: str) -> dict[str, Any]:
    """MoeParams fields for a recognised activation name ("gelu_tanh" -> gelu, approximate=True)."""
    base = {"geglu_tanh": "geglu", "gelu_tanh": "gelu"}.get(name, name)
    return {"activation": base, "gelu_approximate": name.endswith("_tanh")}


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
            scaled = None if z is None or view.op(z) != "mul" else scalar_operand(view, z)
            capped = scalar_operand(view, g) if view.op(g) == "min" else None
            if scaled is None or capped is None or not view.same(scaled[0], g):
                continue
            (gate, limit), alpha = capped, scaled[1]
            if (lo, hi) == (-limit, limit):
                return "swiglu_oai", gate, up, (("swiglu_alpha", alpha), ("swiglu_limit", limit))
    return None


def scalar_operand(view: View, atom: Any) -> tuple[Any, float] | None:
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
    got = scalar_operand(view, atom)
    inner = None if got is None or view.op(got[0]) != {"min": "max", "max": "min"}[outer] else got[0]
    got2 = None if inner is None else scalar_operand(view, inner)
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
    """x for 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))) in any association of the products
    (jax.nn.gelu's `x * (0.5 * (1 + tanh(...)))`, a hand-written `0.5 * x * (...)`), or its identity
    x * sigmoid(2 sqrt(2/pi) * (...)); x^3 as `x ** 3` or `x * x * x`."""
    tol = _precision(atom)
    outer = idioms.product(view, atom)
    if len(outer.factors) != 2:
        return None
    for x, h in (outer.factors, outer.factors[::-1]):
        t = _with_const(view, h, "add", 1.0)
        if t is not None and view.op(t) == "tanh" and _near(outer.coef, 0.5, tol):
            arg, scale = view.args(t)[0], SQRT_2_OVER_PI
        elif (s := idioms.sigmoid(view, h)) is not None and _near(outer.coef, 1.0, tol):
            arg, scale = s, 2 * SQRT_2_OVER_PI  # 0.5 * (1 + tanh(z)) == sigmoid(2 z)
        else:
            continue
        inner = idioms.product(view, arg)
        if len(inner.factors) != 1 or not _near(inner.coef, scale, tol):
            continue
        poly = inner.factors[0]
        if view.op(poly) != "add":
            continue
        for xx, cube in (view.args(poly), view.args(poly)[::-1]):
            c = idioms.product(view, cube)
            if view.same(xx, x) and _near(c.coef, GELU_TANH_C, tol) and _is_cube_of(view, c.factors, x):
                return x
    return None


def _is_cube_of(view: View, factors: tuple[Any, ...], x: Any) -> bool:
    """Whether the product of `factors` is x^3: `x ** 3` (integer_pow), or x times x times x."""
    if len(factors) == 3:
        return all(view.same(f, x) for f in factors)
    if len(factors) == 1 and view.op(factors[0]) == "integer_pow":
        return view.params(factors[0])["y"] == 3 and view.same(view.args(factors[0])[0], x)
    return False


def _gelu_erf(view: View, atom: Any) -> Any | None:
    """x for 0.5 * x * erfc(-x / sqrt(2)) (jax.nn.gelu(approximate=False)) or 0.5 * x * (1 + erf(x /
    sqrt(2))), in any association of the products."""
    tol = _precision(atom)
    outer = idioms.product(view, atom)
    if len(outer.factors) != 2 or not _near(outer.coef, 0.5, tol):
        return None
    for x, e in (outer.factors, outer.factors[::-1]):
        if view.op(e) == "erfc":
            arg, want = view.args(e)[0], -INV_SQRT2
        elif (erf := _with_const(view, e, "add", 1.0)) is not None and view.op(erf) == "erf":
            arg, want = view.args(erf)[0], INV_SQRT2
        else:
            continue
        scaled = idioms.product(view, arg)
        if len(scaled.factors) == 1 and view.same(scaled.factors[0], x) and _near(scaled.coef, want, tol):
            return x
    return None


def _precision(atom: Any) -> float:
    """A tolerance for constants folded in `atom`'s dtype: a few of its ulps (bf16 rounds 1/sqrt(2) to
    0.70703125)."""
    dtype = atom.aval.dtype if jnp.issubdtype(atom.aval.dtype, jnp.floating) else jnp.float32
    return 4 * float(jnp.finfo(dtype).eps)


def _near(got: float, want: float, rel: float) -> bool:
    return abs(got - want) <= rel * abs(want)


def _close(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= 1e-6 * max(abs(b), 1e-30)
