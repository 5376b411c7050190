"""The identity corpus: ordinary JAX programs that contain no Mixture-of-Experts region.

Rewriting any of them with moefuse must be an exact identity: the outputs (and gradients, where
``grad_argnums`` is set) of ``moefuse.jit(fn, **jit_kwargs)`` must be bit-identical to those of
``jax.jit(fn, **jit_kwargs)``. The programs cover every higher-order primitive the rewriting
interpreter recurses into (``jit``, ``scan``, ``while``, ``cond``, ``remat``, ``shard_map``,
``custom_jvp_call``, ``custom_vjp_call``), nestings of them, pytrees, static arguments, donation,
shardings, a Flax NNX model and a scan-over-layers transformer.

``cases()`` builds the single-device programs. ``sharded_cases()`` builds the programs that need an
8-device mesh: call it only in a process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (see ``tests/engine/test_identity.py``).

Nothing here touches a JAX backend at import time: arrays are built inside ``cases()``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

F32 = jnp.float32
BF16 = jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class Case:
    """One program of the corpus.

    ``fn(*args, **kwargs)`` is the program. ``static_argnums`` and ``jit_kwargs`` are passed to
    both ``jax.jit`` and ``moefuse.jit`` (``jit_options()`` merges them). ``grad_argnums``: when set,
    the gradient of a scalar loss built from ``fn``'s floating outputs is compared too (static args
    and ``kwargs`` are closed over for that check).
    """

    name: str
    fn: Callable[..., Any]
    args: tuple
    static_argnums: tuple[int, ...] = ()
    jit_kwargs: dict = dataclasses.field(default_factory=dict)
    grad_argnums: tuple[int, ...] | None = None
    kwargs: dict = dataclasses.field(default_factory=dict)

    def jit_options(self) -> dict:
        opts = dict(self.jit_kwargs)
        if self.static_argnums:
            opts["static_argnums"] = self.static_argnums
        return opts

    @property
    def donates(self) -> bool:
        return bool(self.jit_kwargs.get("donate_argnums") or self.jit_kwargs.get("donate_argnames"))


# --------------------------------------------------------------------------------------------
# data helpers (deterministic)
# --------------------------------------------------------------------------------------------


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _normal(seed: int, *shape: int, dtype=F32, scale: float = 1.0) -> jax.Array:
    return jnp.asarray(_rng(seed).standard_normal(shape).astype(np.float32) * scale, dtype=dtype)


def _ints(seed: int, low: int, high: int, *shape: int, dtype=jnp.int32) -> jax.Array:
    return jnp.asarray(_rng(seed).integers(low, high, size=shape), dtype=dtype)


# --------------------------------------------------------------------------------------------
# programs
# --------------------------------------------------------------------------------------------


def arith(x, y):
    a = x * 2.0 + y
    b = jnp.sin(a) * jnp.exp(-jnp.abs(y)) / (1.0 + x**2)
    c = jnp.maximum(a, b) - jnp.minimum(a, b) ** 3
    d = jnp.tanh(c) + jnp.sqrt(jnp.abs(x)) + jnp.log1p(jnp.abs(y)) + lax.rsqrt(1.0 + y * y)
    return d - jnp.mean(d, axis=-1, keepdims=True) * jnp.float32(0.5)


def mlp_gelu(params, x):
    h = x @ params["w1"] + params["b1"]
    h = jax.nn.gelu(h, approximate=False)
    return h @ params["w2"] + params["b2"]


@jax.jit
def _inner(a, b):
    return a * b + jnp.sin(a)


@jax.jit
def _middle(a, b):
    return _inner(a, b) - _inner(b, a) * 0.5


_inlined = jax.jit(lambda a: jnp.cos(a) * a, inline=True)


@functools.partial(jax.jit, static_argnums=1)
def _power(a, n):
    for _ in range(n):
        a = a * jnp.tanh(a)
    return a


def nested_jit(x, y):
    return _middle(x, y) + _inner(x, 1.0 + y) + _inlined(y) + _power(x, 2) + _power(y, 3)


def scan_carry_xs_ys(c0, xs, w):
    def body(c, x):
        c = jnp.tanh(c @ w + x)
        return c, (c.sum(), c * 2.0)

    c, (s, ys) = lax.scan(body, c0, xs)
    return c, s, ys


def scan_reverse(c0, xs, ys):
    def body(carry, inp):
        a, b = carry
        a = a * 0.9 + inp["x"] * inp["y"]
        b = jnp.maximum(b, a)
        return (a, b), a - b

    (a, b), out = lax.scan(body, (c0, c0 * 0.5), {"x": xs, "y": ys}, reverse=True, unroll=2)

    def no_xs(c, _):
        return (c[0] * 0.5 + jnp.sin(c[1]), c[1]), None

    (z, _), _ = lax.scan(no_xs, (a, b), None, length=3)
    return a, b, out, z


def fori_fixed(x, w):
    def body(i, carry):
        v, acc = carry
        v = jnp.tanh(v @ w) + jnp.sin(i.astype(F32))
        return v, acc + v.sum()

    return lax.fori_loop(0, 6, body, (x, jnp.zeros((), F32)))


def fori_dynamic(x, n):
    def body(i, v):
        return v * 0.75 + jnp.cos(v) * i.astype(F32)

    return lax.fori_loop(1, n, body, x)


def while_loop(x, tol):
    def cond(s):
        i, _, err = s
        return (i < 50) & (err > tol)

    def body(s):
        i, v, _ = s
        new = 0.5 * (v + x / v)
        return i + 1, new, jnp.max(jnp.abs(new - v))

    return lax.while_loop(cond, body, (jnp.int32(0), jnp.ones_like(x), jnp.array(jnp.inf, F32)))


def cond_case(x, y):
    a = lax.cond(jnp.sum(x) > 0, lambda u, v: (u * v, jnp.sin(u)), lambda u, v: (u - v, jnp.cos(v)), x, y)
    b = lax.cond(jnp.sum(x) <= 0, lambda u: u * 3.0, lambda u: u / 3.0, y)
    c = lax.cond(x[0, 0] > 100.0, lambda: jnp.float32(1.0), lambda: jnp.float32(2.0))
    return a, b * c


def switch_case(idx, x):
    branches = [lambda v: v * 2.0, lambda v: jnp.sin(v) @ v.T @ v, lambda v: jnp.exp(-v * v)]
    a = lax.switch(idx, branches, x)
    b = lax.switch(idx + 4, branches, x)  # clamped to the last branch
    return a, b


def remat_nothing_saveable(w, x):
    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
    def block(w, x):
        return jnp.tanh(x @ w) @ w.T

    return block(w, block(w, x))


def remat_dots_saveable(w, x):
    @functools.partial(
        jax.checkpoint, policy=jax.checkpoint_policies.dots_saveable, prevent_cse=False, static_argnums=(2,)
    )
    def block(w, x, act):
        h = x @ w
        h = jnp.tanh(h) if act == "tanh" else jax.nn.relu(h)
        return h @ w.T

    plain = jax.remat(lambda v: jnp.sin(v) * v)
    return plain(block(w, block(w, x, "tanh"), "relu"))


@jax.custom_jvp
def safe_log(x):
    return jnp.log(jnp.maximum(x, 1e-6))


@safe_log.defjvp
def _safe_log_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return safe_log(x), t / jnp.maximum(x, 1e-6)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def soft_clip(x, limit):
    return limit * jnp.tanh(x / limit)


@soft_clip.defjvp
def _soft_clip_jvp(limit, primals, tangents):
    (x,), (t,) = primals, tangents
    y = soft_clip(x, limit)
    return y, t * (1.0 - (y / limit) ** 2)


def custom_jvp_case(x):
    return safe_log(x) * 2.0 + soft_clip(x, 3.0), safe_log(jnp.abs(x) + 1.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def clip_gradient(lo, hi, x):
    return x


def _clip_gradient_fwd(lo, hi, x):
    return x, None


def _clip_gradient_bwd(lo, hi, _, g):
    return (jnp.clip(g, lo, hi),)


clip_gradient.defvjp(_clip_gradient_fwd, _clip_gradient_bwd)


@jax.custom_vjp
def scaled_tanh(x, s):
    return jnp.tanh(x) * s


def _scaled_tanh_fwd(x, s):
    y = jnp.tanh(x)
    return y * s, (y, s)


def _scaled_tanh_bwd(res, g):
    y, s = res
    return g * s * (1.0 - y * y), jnp.sum(g * y, axis=0)


scaled_tanh.defvjp(_scaled_tanh_fwd, _scaled_tanh_bwd)


def custom_vjp_case(x, w):
    h = clip_gradient(-0.5, 0.5, x @ w)
    return scaled_tanh(h * 3.0, w[0]) ** 2


def nn_activations(x):
    return {
        "softmax": jax.nn.softmax(x),
        "softmax0": jax.nn.softmax(x, axis=0),
        "log_softmax": jax.nn.log_softmax(x),
        "relu": jax.nn.relu(x),
        "gelu_tanh": jax.nn.gelu(x),
        "gelu_erf": jax.nn.gelu(x, approximate=False),
        "silu": jax.nn.silu(x),
        "sigmoid": jax.nn.sigmoid(x),
        "softplus": jax.nn.softplus(x),
        "logsumexp": jax.nn.logsumexp(x, axis=-1),
    }


@jax.jit
def _double(v):
    return v * 2.0


@jax.jit
def _wave(v):
    return jnp.sin(v) - 0.1 * v


def scan_of_cond_of_jit(c0, xs):
    def body(c, x):
        c = lax.cond(jnp.sum(x) > 0, _double, _wave, c + x)
        return jnp.tanh(c), c.mean()

    return lax.scan(body, c0, xs)


def scan_layers_remat(ws, x):
    @jax.checkpoint
    def layer(h, w):
        h = jax.nn.relu(h @ w) + h
        return h / (1.0 + jnp.abs(h).mean()), h.sum()

    return lax.scan(layer, x, ws)


def pytree_dict_tuple(tree, scale):
    (a, b), c = tree["pair"], tree["nested"]["c"]
    return {
        "sum": a + b * scale,
        "pair": (a * c.sum(), jnp.outer(b[0], c)),
        "list": [a.T, {"deep": c - 1.0}],
    }


class Particle(NamedTuple):
    pos: jax.Array
    vel: jax.Array


class Stats(NamedTuple):
    energy: jax.Array
    speed: jax.Array


def pytree_namedtuple(p, dt):
    vel = p.vel - dt * p.pos
    new = Particle(pos=p.pos + dt * vel, vel=vel)
    return new, Stats(energy=0.5 * jnp.sum(vel**2), speed=jnp.linalg.norm(vel, axis=-1))


def static_int(n, x):
    for _ in range(n):
        x = jnp.sin(x) * x + 0.1
    return x


def static_names(x, *, kind="tanh", times=2):
    act = {"tanh": jnp.tanh, "gelu": jax.nn.gelu, "relu": jax.nn.relu}[kind]
    for _ in range(times):
        x = act(x) * 1.5 - 0.25
    return x


def kwargs_dynamic(x, *, scale, bias=None):
    out = x * scale
    return out if bias is None else out + bias


def sgd_step(params, grads, lr):
    new = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    return new, jax.tree.map(lambda g: jnp.sum(g * g), grads)


def donate_by_name(state, delta):
    return state * 0.5 + delta, jnp.sum(delta)


def transformer_layers(params, x):
    """A scan over layers of a small pre-LN transformer block (causal attention + GELU MLP)."""
    seq, d = x.shape
    heads = 2
    mask = jnp.tril(jnp.ones((seq, seq), bool))

    def ln(h, g):
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        return (h - mu) * lax.rsqrt(var + 1e-5) * g

    def block(h, p):
        a = ln(h, p["ln1"])
        q = (a @ p["wq"]).reshape(seq, heads, d // heads)
        k = (a @ p["wk"]).reshape(seq, heads, d // heads)
        v = (a @ p["wv"]).reshape(seq, heads, d // heads)
        s = jnp.einsum("qhd,khd->hqk", q, k) / jnp.sqrt(jnp.float32(d // heads))
        s = jnp.where(mask[None], s, -jnp.inf)
        probs = jax.nn.softmax(s, axis=-1)
        att = jnp.einsum("hqk,khd->qhd", probs, v).reshape(seq, d)
        h = h + att @ p["wo"]
        m = ln(h, p["ln2"])
        h = h + jax.nn.gelu(m @ p["w1"]) @ p["w2"]
        return h, probs.max()

    return lax.scan(block, x, params)


def integer_ops(x, y):
    u = x.astype(jnp.uint32)
    return {
        "floordiv": x // y,
        "mod": x % y,
        "rem": lax.rem(x, y),
        "bits": (x & y) | (x ^ 3),
        "shift": (x << 2) >> 1,
        "lshr": lax.shift_right_logical(x, jnp.int32(3)),
        "abs_sign": jnp.abs(x) * jnp.sign(y),
        "clip": jnp.clip(x, -5, 5),
        "u8": (x * 37).astype(jnp.uint8),
        "i8_wrap": (x.astype(jnp.int8) * jnp.int8(100)),
        "u32": u * jnp.uint32(2654435761) + jnp.uint32(7),
        "popcnt": lax.population_count(x),
        "argmax": jnp.argmax(x, axis=-1),
        "sum": jnp.sum(x, axis=0),
        "cmp": jnp.where(x > y, x, y) + (x == y),
        "max_min": jnp.maximum(x, y) - jnp.minimum(x, y),
    }


def bf16_ops(x, w):
    h32 = jnp.dot(x, w, preferred_element_type=F32)
    h16 = x @ w
    g = jax.nn.gelu(h16)
    return h32.astype(BF16) + g * BF16(0.5), jnp.mean(g, axis=-1), (h32 * 1e-3).astype(BF16).astype(F32)


def random_ops(key, raw_key, x):
    """A typed key (``jax.random.key``) and a raw uint32 key (``jax.random.PRNGKey``)."""
    k1, k2 = jax.random.split(key)
    noise = jax.random.normal(k1, x.shape, F32)
    keep = jax.random.bernoulli(raw_key, 0.7, x.shape)
    out = jnp.where(keep, x / 0.7, 0.0) + noise
    return out, keep, jax.random.fold_in(k2, 11), jax.random.fold_in(raw_key, 3)


def sort_topk_gather_scatter(scores, table, ids):
    """Sorting, top-k, gather and scatter used the ordinary way (no routing, no softmax)."""
    order = jnp.argsort(scores, axis=-1)
    sorted_vals = jnp.sort(scores, axis=-1)
    vals, idx = lax.top_k(scores, 3)
    rows = table[idx]  # [B, 3, D] gather
    picked = jnp.take_along_axis(scores, order[:, :2], axis=-1)
    hist = jnp.zeros(16, jnp.int32).at[ids].add(1)
    marked = jnp.zeros_like(table).at[ids % table.shape[0]].set(1.0)
    desc = jnp.argsort(-scores, axis=0, stable=True)
    return order, sorted_vals, vals.sum(-1), rows.mean(1), picked, hist, marked * table, desc


def vmap_inside(w, xs):
    def per_example(w, x):
        return jnp.tanh(w @ x).sum()

    a = jax.vmap(per_example, in_axes=(None, 0))(w, xs)
    b = jax.vmap(jax.grad(per_example, argnums=1), in_axes=(None, 0))(w, xs)
    c = jax.vmap(jax.vmap(lambda u, v: u * v + jnp.sin(u)), in_axes=(0, 1), out_axes=1)(xs, xs.T)
    return a, b, c


def where_nan(x):
    unsafe = jnp.where(x > 0, jnp.log(x), 0.0)  # the classic NaN-gradient where
    safe = jnp.where(x > 0, jnp.log(jnp.where(x > 0, x, 1.0)), 0.0)
    no_nan = jnp.where(jnp.isnan(x), 0.0, x)
    root = jnp.sqrt(x)
    return unsafe, safe, no_nan, jnp.nan_to_num(root), jnp.nanmean(root), root, x / 0.0


def reductions_cumulative(x, w):
    return {
        "cumsum": jnp.cumsum(x, axis=1),
        "assoc": lax.associative_scan(jnp.add, x, axis=1),
        "argmin": jnp.argmin(x, axis=0),
        "var_std": jnp.var(x, axis=0) + jnp.std(x, axis=1).sum(),
        "einsum": jnp.einsum("ij,jk,ik->i", x, w, x @ w),
        "batched": jnp.matmul(x[None] * jnp.arange(1.0, 3.0)[:, None, None], w),
        "max_min": jnp.max(x, axis=1) * jnp.min(x, axis=0).sum(),
    }


def slicing_shapes(x, i):
    ds = lax.dynamic_slice(x, (i, 1), (3, 4))
    dus = lax.dynamic_update_slice(x, ds * 10.0, (1, i))
    cat = jnp.concatenate([x, dus[::-1]], axis=0)
    pad = lax.pad(x, 0.5, ((1, 2, 1), (-1, 0, 0)))
    t = jnp.transpose(x.reshape(2, 3, 6), (2, 0, 1))
    r = jnp.roll(x, 2, axis=1) + jnp.flip(x, axis=0)
    strided = x[::2, 1:] * x[1::2, :-1]
    e = jnp.expand_dims(x[:, 0], 1) * jnp.broadcast_to(x[0], (6, 6))
    return ds, dus, cat, pad, t, r, strided, jnp.squeeze(e[:1]), x[i], x[:, i]


def conv_pool(img, kernel):
    y = lax.conv_general_dilated(img, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jax.nn.relu(y)
    pooled = lax.reduce_window(y, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return pooled, jnp.mean(y, axis=(1, 2))


_CONST_TABLE = np.linspace(-1.0, 1.0, 64 * 8, dtype=np.float32).reshape(64, 8)


def closed_over_consts(x):
    table = jnp.asarray(_CONST_TABLE)
    h = x @ table.T
    return jnp.tanh(h) @ table + jnp.float32(np.pi), jnp.asarray(_CONST_TABLE[:2]) * 2.0


def passthrough_outputs(x, y, unused):
    return x, x, y * 1.0, {"k": x, "none": None, "empty": ()}, 3.0, jnp.arange(3)


def python_scalar_args(x, a, n):
    return x * a + n, a * 2.0, jnp.asarray(n) * 3


def scan_switch_remat(ws, x, sel):
    def layer(h, inp):
        w, s = inp

        @jax.checkpoint
        def inner(h):
            return lax.switch(s, [lambda v: jnp.tanh(v @ w), lambda v: jax.nn.relu(v @ w), lambda v: v], h)

        return inner(h) + h * 0.5, s

    return lax.scan(layer, x, (ws, sel))


def while_scan_cond(x, n):
    def inner_scan(v):
        def body(c, i):
            c = lax.cond(i % 2 == 0, lambda u: u * 0.9, lambda u: jnp.sin(u), c)
            return c, c.sum()

        return lax.scan(body, v, jnp.arange(3))

    def cond(s):
        return s[0] < n

    def body(s):
        i, v, tot = s
        v, sums = inner_scan(v)
        return i + 1, v, tot + sums.sum()

    return lax.while_loop(cond, body, (jnp.int32(0), x, jnp.float32(0.0)))


def vmap_of_cond_and_while(xs):
    def per(x):
        y = lax.cond(x.sum() > 0, lambda u: u * 2.0, lambda u: -u, x)

        def body(s):
            return s[0] + 1, s[1] * 0.5

        steps, z = lax.while_loop(lambda s: jnp.max(jnp.abs(s[1])) > 0.1, body, (0, y))
        return steps, z

    return jax.vmap(per)(xs)


def custom_rules_nested(x, w):
    def layer(h, _):
        h = jax.nn.relu(safe_log(jnp.abs(h @ w) + 1.0)) + soft_clip(h, 2.0)
        return h, None

    h, _ = lax.scan(layer, x, None, length=3)
    clipped = jax.checkpoint(lambda v: clip_gradient(-0.1, 0.1, v) * scaled_tanh(v, w[0]))(h)
    return clipped


def misc_primitives(x):
    a = lax.map(lambda r: r * jnp.arange(r.shape[0], dtype=F32), x)
    b = lax.optimization_barrier(a + 1.0)
    c = lax.reduce_precision(b, exponent_bits=5, mantissa_bits=10)
    d = lax.stop_gradient(c) * x + jnp.sin(x)
    with jax.named_scope("scoped"):
        e = jnp.cos(d) @ x.T
    return d, e, lax.clamp(-1.0, x, 1.0), lax.erf_inv(jnp.clip(x, -0.9, 0.9))


def linalg_ops(a, b):
    spd = a @ a.T + 4.0 * jnp.eye(a.shape[0], dtype=a.dtype)
    chol = jnp.linalg.cholesky(spd)
    tri = jax.scipy.linalg.solve_triangular(chol, b, lower=True)
    return chol, tri


def fft_complex(x):
    f = jnp.fft.rfft(x, axis=-1)
    g = f * jnp.exp(1j * jnp.float32(0.3))
    back = jnp.fft.irfft(g, n=x.shape[-1], axis=-1)
    return back, jnp.abs(f), g


def _nnx_model():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, din: int, dh: int, dout: int, *, rngs: nnx.Rngs):
            self.ln = nnx.LayerNorm(din, rngs=rngs)
            self.fc1 = nnx.Linear(din, dh, rngs=rngs)
            self.fc2 = nnx.Linear(dh, dout, rngs=rngs)

        def __call__(self, x):
            return self.fc2(jax.nn.gelu(self.fc1(self.ln(x))))

    return nnx.split(MLP(8, 16, 8, rngs=nnx.Rngs(0)))


def _nnx_cases() -> list[Case]:
    from flax import nnx

    graphdef, state = _nnx_model()
    x = _normal(40, 4, 8)

    def nnx_apply(state, x):
        return nnx.merge(graphdef, state)(x)

    def nnx_apply_static(graphdef, state, x):
        model = nnx.merge(graphdef, state)
        y = model(x)
        return y, nnx.state(model)

    return [
        Case("nnx_mlp", nnx_apply, (state, x), grad_argnums=(0, 1)),
        Case(
            "nnx_mlp_graphdef_static",
            nnx_apply_static,
            (graphdef, state, x),
            static_argnums=(0,),
            grad_argnums=(1,),
        ),
    ]


# --------------------------------------------------------------------------------------------
# the corpus
# --------------------------------------------------------------------------------------------


@functools.cache
def cases() -> tuple[Case, ...]:
    d = 8
    mlp_params = {
        "w1": _normal(1, d, 16, scale=0.3),
        "b1": _normal(2, 16),
        "w2": _normal(3, 16, d, scale=0.3),
        "b2": _normal(4, d),
    }
    L = 2
    tparams = {
        "ln1": 1.0 + _normal(5, L, d, scale=0.1),
        "ln2": 1.0 + _normal(6, L, d, scale=0.1),
        "wq": _normal(7, L, d, d, scale=0.3),
        "wk": _normal(8, L, d, d, scale=0.3),
        "wv": _normal(9, L, d, d, scale=0.3),
        "wo": _normal(10, L, d, d, scale=0.3),
        "w1": _normal(11, L, d, 2 * d, scale=0.3),
        "w2": _normal(12, L, 2 * d, d, scale=0.3),
    }
    nan_input = jnp.array([-1.0, -0.0, 0.0, 0.5, 2.0, np.inf, -np.inf, np.nan], F32)
    pos_input = jnp.abs(_normal(13, 6)) + 0.5
    sgd_params = {"w": _normal(14, 4, 4), "b": _normal(15, 4)}
    sgd_grads = {"w": _normal(16, 4, 4), "b": _normal(17, 4)}

    corpus = [
        Case("arith", arith, (_normal(20, 4, 8), _normal(21, 4, 8)), grad_argnums=(0, 1)),
        Case("mlp_gelu", mlp_gelu, (mlp_params, _normal(22, 4, d)), grad_argnums=(0, 1)),
        Case("nested_jit", nested_jit, (_normal(23, 3, 5), _normal(24, 3, 5)), grad_argnums=(0, 1)),
        Case(
            "scan_carry_xs_ys",
            scan_carry_xs_ys,
            (_normal(25, 4), _normal(26, 5, 4), _normal(27, 4, 4)),
            grad_argnums=(0, 1, 2),
        ),
        Case(
            "scan_reverse_unroll",
            scan_reverse,
            (_normal(28, 3), _normal(29, 6, 3), _normal(30, 6, 3)),
            grad_argnums=(0, 1, 2),
        ),
        Case(
            "fori_loop_fixed_trip",
            fori_fixed,
            (_normal(31, 2, 4), _normal(32, 4, 4, scale=0.5)),
            grad_argnums=(0, 1),
        ),
        Case("fori_loop_dynamic_bounds", fori_dynamic, (_normal(33, 5), jnp.int32(4))),
        Case("while_loop", while_loop, (pos_input, jnp.float32(1e-6))),
        Case("cond", cond_case, (_normal(34, 3, 3), _normal(35, 3, 3)), grad_argnums=(0, 1)),
        Case("switch", switch_case, (jnp.int32(1), _normal(36, 3, 3)), grad_argnums=(1,)),
        Case(
            "remat_nothing_saveable",
            remat_nothing_saveable,
            (_normal(37, 4, 4), _normal(38, 2, 4)),
            grad_argnums=(0, 1),
        ),
        Case(
            "remat_dots_saveable",
            remat_dots_saveable,
            (_normal(39, 4, 4), _normal(41, 2, 4)),
            grad_argnums=(0, 1),
        ),
        Case(
            "custom_jvp_safe_log",
            custom_jvp_case,
            (jnp.array([-1.0, 0.0, 1e-8, 0.3, 2.0, 5.0], F32),),
            grad_argnums=(0,),
        ),
        Case(
            "custom_vjp_clip_gradient",
            custom_vjp_case,
            (_normal(42, 3, 4), _normal(43, 4, 4)),
            grad_argnums=(0, 1),
        ),
        Case("nn_activations", nn_activations, (_normal(44, 4, 6, scale=3.0),), grad_argnums=(0,)),
        Case(
            "scan_of_cond_of_jit",
            scan_of_cond_of_jit,
            (_normal(45, 3), _normal(46, 6, 3)),
            grad_argnums=(0, 1),
        ),
        Case(
            "scan_layers_remat",
            scan_layers_remat,
            (_normal(47, 4, 5, 5, scale=0.5), _normal(48, 2, 5)),
            grad_argnums=(0, 1),
        ),
        Case(
            "pytree_dict_tuple",
            pytree_dict_tuple,
            (
                {"pair": (_normal(49, 3, 3), _normal(50, 3, 3)), "nested": {"c": _normal(51, 3)}},
                jnp.float32(0.5),
            ),
            grad_argnums=(0, 1),
        ),
        Case(
            "pytree_namedtuple",
            pytree_namedtuple,
            (Particle(_normal(52, 4, 3), _normal(53, 4, 3)), jnp.float32(0.1)),
            grad_argnums=(0,),
        ),
        Case("static_argnums_int", static_int, (3, _normal(54, 5)), static_argnums=(0,), grad_argnums=(1,)),
        Case(
            "static_argnames_str",
            static_names,
            (_normal(55, 5),),
            jit_kwargs={"static_argnames": ("kind", "times")},
            kwargs={"kind": "gelu", "times": 3},
            grad_argnums=(0,),
        ),
        Case(
            "kwargs_dynamic",
            kwargs_dynamic,
            (_normal(56, 4),),
            kwargs={"scale": _normal(57, 4), "bias": jnp.float32(2.0)},
            grad_argnums=(0,),
        ),
        Case(
            "donate_argnums",
            sgd_step,
            (sgd_params, sgd_grads, jnp.float32(0.1)),
            jit_kwargs={"donate_argnums": (0,)},
        ),
        Case(
            "donate_argnames",
            donate_by_name,
            (_normal(58, 6), _normal(59, 6)),
            jit_kwargs={"donate_argnames": ("state",)},
        ),
        *_nnx_cases(),
        Case(
            "transformer_scan_layers", transformer_layers, (tparams, _normal(60, 4, d)), grad_argnums=(0, 1)
        ),
        Case("integer_ops", integer_ops, (_ints(61, -50, 50, 4, 6), _ints(62, 1, 9, 4, 6))),
        Case(
            "bf16",
            bf16_ops,
            (_normal(63, 4, 8, dtype=BF16), _normal(64, 8, 8, dtype=BF16, scale=0.3)),
            grad_argnums=(0, 1),
        ),
        Case(
            "random_keys",
            random_ops,
            (jax.random.key(7), jax.random.PRNGKey(8), _normal(65, 4, 8)),
            grad_argnums=(2,),
        ),
        Case(
            "sort_topk_gather_scatter",
            sort_topk_gather_scatter,
            (_normal(67, 4, 10), _normal(68, 10, 3), _ints(69, 0, 16, 12)),
            grad_argnums=(0, 1),
        ),
        Case("vmap_inside", vmap_inside, (_normal(70, 4, 4), _normal(71, 4, 4)), grad_argnums=(0, 1)),
        Case("where_nan", where_nan, (nan_input,), grad_argnums=(0,)),
        Case(
            "reductions_cumulative",
            reductions_cumulative,
            (_normal(72, 4, 5), _normal(73, 5, 5)),
            grad_argnums=(0, 1),
        ),
        Case("slicing_shapes", slicing_shapes, (_normal(74, 6, 6), jnp.int32(2)), grad_argnums=(0,)),
        Case("conv_pool", conv_pool, (_normal(75, 1, 6, 6, 2), _normal(76, 3, 3, 2, 3)), grad_argnums=(0, 1)),
        Case("closed_over_consts", closed_over_consts, (_normal(77, 3, 8),), grad_argnums=(0,)),
        Case(
            "passthrough_outputs",
            passthrough_outputs,
            (_normal(78, 3), _normal(79, 3), _normal(80, 2)),
            jit_kwargs={"keep_unused": True},
            grad_argnums=(0, 1),
        ),
        Case("python_scalar_args", python_scalar_args, (_normal(81, 3), 2.5, 4), grad_argnums=(0, 1)),
        Case(
            "scan_switch_remat",
            scan_switch_remat,
            (_normal(82, 3, 4, 4, scale=0.5), _normal(83, 2, 4), jnp.array([0, 2, 1], jnp.int32)),
            grad_argnums=(0, 1),
        ),
        Case("while_scan_cond", while_scan_cond, (_normal(84, 3), jnp.int32(2))),
        Case("vmap_of_cond_and_while", vmap_of_cond_and_while, (_normal(85, 4, 3),)),
        Case(
            "custom_rules_nested",
            custom_rules_nested,
            (_normal(86, 2, 4), _normal(87, 4, 4, scale=0.5)),
            grad_argnums=(0, 1),
        ),
        Case("misc_primitives", misc_primitives, (_normal(88, 3, 3),), grad_argnums=(0,)),
        Case("linalg", linalg_ops, (_normal(89, 4, 4), _normal(90, 4, 2)), grad_argnums=(0, 1)),
        Case("fft_complex", fft_complex, (_normal(91, 2, 8),), grad_argnums=(0,)),
    ]
    names = tuple(c.name for c in corpus)
    assert names == _CASE_NAMES, "keep _CASE_NAMES in step with cases()"
    return tuple(corpus)


def case_names() -> list[str]:
    """Names of ``cases()`` without building any array (for pytest parametrization)."""
    return list(_CASE_NAMES)


_CASE_NAMES = (
    "arith",
    "mlp_gelu",
    "nested_jit",
    "scan_carry_xs_ys",
    "scan_reverse_unroll",
    "fori_loop_fixed_trip",
    "fori_loop_dynamic_bounds",
    "while_loop",
    "cond",
    "switch",
    "remat_nothing_saveable",
    "remat_dots_saveable",
    "custom_jvp_safe_log",
    "custom_vjp_clip_gradient",
    "nn_activations",
    "scan_of_cond_of_jit",
    "scan_layers_remat",
    "pytree_dict_tuple",
    "pytree_namedtuple",
    "static_argnums_int",
    "static_argnames_str",
    "kwargs_dynamic",
    "donate_argnums",
    "donate_argnames",
    "nnx_mlp",
    "nnx_mlp_graphdef_static",
    "transformer_scan_layers",
    "integer_ops",
    "bf16",
    "random_keys",
    "sort_topk_gather_scatter",
    "vmap_inside",
    "where_nan",
    "reductions_cumulative",
    "slicing_shapes",
    "conv_pool",
    "closed_over_consts",
    "passthrough_outputs",
    "python_scalar_args",
    "scan_switch_remat",
    "while_scan_cond",
    "vmap_of_cond_and_while",
    "custom_rules_nested",
    "misc_primitives",
    "linalg",
    "fft_complex",
)


# Cases without a gradient check (integer-only, while loops, donation).
NO_GRAD_CASES = (
    "fori_loop_dynamic_bounds",
    "while_loop",
    "donate_argnums",
    "donate_argnames",
    "integer_ops",
    "while_scan_cond",
    "vmap_of_cond_and_while",
)


# The cases also checked as ``jax.jit(moefuse.fuse(fn), **jit_kwargs)``: the ways arguments reach
# a transform under ``jax.jit`` (static, keyword, donated, Python scalars, pytrees) and some bodies.
FUSE_UNDER_JIT_CASES = (
    "static_argnums_int",
    "static_argnames_str",
    "kwargs_dynamic",
    "donate_argnums",
    "donate_argnames",
    "python_scalar_args",
    "passthrough_outputs",
    "pytree_namedtuple",
    "nnx_mlp_graphdef_static",
    "scan_layers_remat",
    "custom_rules_nested",
    "random_keys",
)


def case_by_name(name: str) -> Case:
    for c in cases():
        if c.name == name:
            return c
    raise KeyError(name)


# --------------------------------------------------------------------------------------------
# programs that need the 8-device CPU mesh
# --------------------------------------------------------------------------------------------

SHARDED_CASE_NAMES = (
    "shard_map_psum",
    "shard_map_collectives",
    "in_out_shardings",
    "in_shardings_committed_args",
    "sharding_constraint",
    "scan_of_shard_map",
    "donate_sharded",
)
SHARDED_NO_GRAD_CASES = ("donate_sharded",)


@functools.cache
def sharded_cases() -> tuple[Case, ...]:
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    if jax.device_count() < 8:
        raise RuntimeError(
            "sharded_cases() needs 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
        )
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))

    def ns(*spec):
        return NamedSharding(mesh, P(*spec))

    def shard_map_psum(x, w):
        def local(xb, wb):  # xb [2, 2], wb [2, 6]
            return lax.psum(jnp.tanh(xb @ wb), "model")

        return jax.shard_map(
            local, mesh=mesh, in_specs=(P("data", "model"), P("model", None)), out_specs=P("data", None)
        )(x, w)

    def shard_map_collectives(x):
        def local(xb):  # [2, 3] per device
            idx = lax.axis_index("data")
            gathered = lax.all_gather(xb, "data", tiled=True)  # [8, 3]
            mean = lax.pmean(xb * idx.astype(F32), ("data", "model"))
            rolled = lax.ppermute(xb, "data", perm=[(i, (i + 1) % 4) for i in range(4)])
            return gathered.sum(0, keepdims=True) + mean + rolled.sum(), jnp.max(jnp.abs(rolled))[None, None]

        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=P("data", None),
            out_specs=(P("data", None), P("data", "model")),
            check_vma=False,
        )(x)

    def mlp_sharded(x, w1, w2):
        return jax.nn.gelu(x @ w1) @ w2

    def constrained(x, w):
        h = jax.lax.with_sharding_constraint(x @ w, ns("data", "model"))
        h = jax.nn.relu(h)
        return jax.lax.with_sharding_constraint(h.sum(-1), ns("data"))

    def scan_of_shard_map(ws, x):
        def layer(h, w):
            def local(hb, wb):
                return lax.psum(hb @ wb, "model")

            y = jax.shard_map(
                local, mesh=mesh, in_specs=(P("data", "model"), P("model", None)), out_specs=P("data", None)
            )(h, w)
            return jnp.tanh(y), y.sum()

        return lax.scan(layer, x, ws)

    def donate_sharded(state, delta):
        return state - 0.1 * delta, jnp.sum(delta * delta)

    x8x4 = _normal(100, 8, 4)
    w4x6 = _normal(101, 4, 6)
    mlp_args = (_normal(102, 8, 4), _normal(103, 4, 8, scale=0.5), _normal(104, 8, 4, scale=0.5))
    mlp_in = (ns("data", None), ns(None, "model"), ns("model", None))
    committed = tuple(jax.device_put(a, s) for a, s in zip(mlp_args, mlp_in, strict=True))
    corpus = [
        Case("shard_map_psum", shard_map_psum, (x8x4, w4x6), grad_argnums=(0, 1)),
        Case("shard_map_collectives", shard_map_collectives, (_normal(105, 8, 3),), grad_argnums=(0,)),
        Case(
            "in_out_shardings",
            mlp_sharded,
            mlp_args,
            jit_kwargs={"in_shardings": mlp_in, "out_shardings": ns("data", "model")},
            grad_argnums=(0, 1, 2),
        ),
        Case(
            "in_shardings_committed_args",
            mlp_sharded,
            committed,
            jit_kwargs={"in_shardings": mlp_in},
            grad_argnums=(0, 1, 2),
        ),
        Case(
            "sharding_constraint",
            constrained,
            (jax.device_put(_normal(106, 8, 4), ns("data", None)), _normal(107, 4, 4)),
            grad_argnums=(0, 1),
        ),
        Case(
            "scan_of_shard_map",
            scan_of_shard_map,
            (_normal(108, 3, 4, 4, scale=0.5), _normal(109, 8, 4)),
            grad_argnums=(0, 1),
        ),
        Case(
            "donate_sharded",
            donate_sharded,
            (jax.device_put(_normal(110, 8, 4), ns("data", "model")), _normal(111, 8, 4)),
            jit_kwargs={
                "donate_argnums": (0,),
                "in_shardings": (ns("data", "model"), ns("data", "model")),
                "out_shardings": (ns("data", "model"), ns()),
            },
        ),
    ]
    assert tuple(c.name for c in corpus) == SHARDED_CASE_NAMES
    return tuple(corpus)
