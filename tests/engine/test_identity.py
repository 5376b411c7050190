"""Identity corpus: when nothing matches, moefuse's rewrite must be an exact identity.

For every program of ``identity_corpus``:
- ``moefuse.jit(fn, **jit_kwargs)(*args)`` is bit-identical to ``jax.jit(fn, **jit_kwargs)(*args)``
  (same pytree structure, leaf types, dtypes, weak types, shapes, shardings and bits; donated
  buffers are deleted exactly when ``jax.jit`` deletes them);
- ``jax.jit(moefuse.fuse(fn), **jit_kwargs)`` is bit-identical too (on a subset that covers static
  args, kwargs, donation, Python scalars, pytrees and bodies);
- where ``grad_argnums`` is set, ``jax.jit(jax.grad(moefuse.fuse(loss)))`` is bit-identical to
  ``jax.jit(jax.grad(loss))`` (``loss`` reduces ``fn``'s floating outputs to a scalar).
Each check runs twice: plainly and under ``moefuse._testing.retrace_all()``, which makes the
interpreter rebuild every sub-jaxpr even though nothing matched.

The programs that need an 8-device CPU mesh (``shard_map``, ``in_shardings``/``out_shardings``)
run in a subprocess started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` unless this
process already has 8 devices. This file is also that subprocess's entry point
(``python tests/engine/test_identity.py --sharded``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moefuse

try:
    from . import identity_corpus as corpus
except ImportError:  # run as a script (the sharded subprocess)
    import identity_corpus as corpus

F32 = jnp.float32
RETRACE = [pytest.param(False, id="plain"), pytest.param(True, id="retrace_all")]


# --------------------------------------------------------------------------------------------
# harness
# --------------------------------------------------------------------------------------------


def retrace_ctx(retrace: bool):
    if not retrace:
        return contextlib.nullcontext()
    from moefuse import _testing

    return _testing.retrace_all()


def _copy_leaf(x):
    # A fresh buffer with the same sharding and committedness: donation deletes its inputs.
    return jnp.copy(x) if isinstance(x, jax.Array) else x


def fresh_args(case: corpus.Case) -> tuple[tuple, dict]:
    args = tuple(
        a if i in case.static_argnums else jax.tree.map(_copy_leaf, a) for i, a in enumerate(case.args)
    )
    return args, jax.tree.map(_copy_leaf, case.kwargs)


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(np.atleast_1d(a))
    return a.view(np.dtype(f"u{a.dtype.itemsize}")) if a.dtype.itemsize in (1, 2, 4, 8) else a.view(np.uint8)


def assert_identical(got, want, what: str) -> None:
    """Same pytree structure; per leaf: same type, dtype, weak type, shape, sharding and bits."""
    got_paths, got_tree = jax.tree_util.tree_flatten_with_path(got)
    want_paths, want_tree = jax.tree_util.tree_flatten_with_path(want)
    assert got_tree == want_tree, f"{what}: pytree structure differs:\n  got  {got_tree}\n  want {want_tree}"
    for (path, g), (_, w) in zip(got_paths, want_paths, strict=True):
        where = f"{what} leaf {jax.tree_util.keystr(path) or '<root>'}"
        assert type(g) is type(w), f"{where}: type {type(g).__name__} != {type(w).__name__}"
        if not isinstance(w, jax.Array):
            assert g == w, f"{where}: {g!r} != {w!r}"
            continue
        assert g.dtype == w.dtype, f"{where}: dtype {g.dtype} != {w.dtype}"
        assert g.shape == w.shape, f"{where}: shape {g.shape} != {w.shape}"
        g_weak, w_weak = getattr(g, "weak_type", None), getattr(w, "weak_type", None)
        assert g_weak == w_weak, f"{where}: weak_type {g_weak} != {w_weak}"
        assert g.sharding.is_equivalent_to(w.sharding, w.ndim), (
            f"{where}: sharding {g.sharding} != {w.sharding}"
        )
        if _is_key(w):
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        g_np, w_np = np.asarray(g), np.asarray(w)
        np.testing.assert_array_equal(g_np, w_np, err_msg=where, strict=True)
        differ = _bits(g_np) != _bits(w_np)
        assert not differ.any(), (
            f"{where}: {int(differ.sum())} elements differ in their bits (e.g. -0.0 vs 0.0 or NaN payload); "
            f"first at flat index {int(np.flatnonzero(differ)[0])}"
        )


def _donated_deleted(args: tuple, kwargs: dict) -> list[bool]:
    leaves = jax.tree.leaves((args, kwargs))
    return [x.is_deleted() for x in leaves if isinstance(x, jax.Array)]


def run_forward(make_jit, case: corpus.Case):
    args, kwargs = fresh_args(case)
    out = make_jit(case.fn, **case.jit_options())(*args, **kwargs)
    out = jax.block_until_ready(out)
    return out, _donated_deleted(args, kwargs)


def _cotangent(shape) -> jax.Array:
    n = int(np.prod(shape, dtype=np.int64))
    return jnp.cos(jnp.arange(n, dtype=F32) * 0.7 + 0.3).reshape(shape)


def scalarize(out) -> jax.Array:
    """A scalar from every real floating leaf, each weighted by a fixed non-uniform cotangent."""
    total = jnp.zeros((), F32)
    for leaf in jax.tree.leaves(out):
        leaf = jnp.asarray(leaf)
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            total = total + jnp.sum(leaf.astype(F32) * _cotangent(leaf.shape))
    return total


def loss_and_args(case: corpus.Case):
    """``(loss, argnums, dyn_args)``: static args and kwargs closed over, grad argnums remapped."""
    static = set(case.static_argnums)
    dyn_pos = [i for i in range(len(case.args)) if i not in static]

    def loss(*dyn):
        full = list(case.args)
        for p, v in zip(dyn_pos, dyn, strict=True):
            full[p] = v
        return scalarize(case.fn(*full, **case.kwargs))

    loss.__name__ = f"loss_{case.name}"
    argnums = tuple(dyn_pos.index(i) for i in case.grad_argnums)
    dyn_args = tuple(jax.tree.map(_copy_leaf, case.args[i]) for i in dyn_pos)
    return loss, argnums, dyn_args


def run_grad(transform, case: corpus.Case):
    loss, argnums, dyn_args = loss_and_args(case)
    return jax.block_until_ready(jax.jit(jax.grad(transform(loss), argnums=argnums))(*dyn_args))


@functools.cache
def _reference(name: str, sharded: bool = False):
    case = _lookup(name, sharded)
    out, deleted = run_forward(jax.jit, case)
    grads = run_grad(lambda f: f, case) if case.grad_argnums is not None else None
    return out, deleted, grads


def _lookup(name: str, sharded: bool) -> corpus.Case:
    pool = corpus.sharded_cases() if sharded else corpus.cases()
    return next(c for c in pool if c.name == name)


def _fuse_then_jit(fn, **jit_kwargs):
    return jax.jit(moefuse.fuse(fn), **jit_kwargs)


def check_forward(name: str, retrace: bool, sharded: bool = False) -> None:
    case = _lookup(name, sharded)
    want, want_deleted, _ = _reference(name, sharded)
    with retrace_ctx(retrace):
        got, got_deleted = run_forward(moefuse.jit, case)
    assert_identical(got, want, f"{name}: moefuse.jit vs jax.jit")
    assert got_deleted == want_deleted, (
        f"{name}: donated inputs deleted {got_deleted} under moefuse.jit, {want_deleted} under jax.jit"
    )


def check_fuse_forward(name: str, retrace: bool, sharded: bool = False) -> None:
    case = _lookup(name, sharded)
    want, want_deleted, _ = _reference(name, sharded)
    with retrace_ctx(retrace):
        got, got_deleted = run_forward(_fuse_then_jit, case)
    assert_identical(got, want, f"{name}: jax.jit(moefuse.fuse) vs jax.jit")
    assert got_deleted == want_deleted, f"{name}: donated inputs deleted {got_deleted} != {want_deleted}"


def check_grad(name: str, retrace: bool, sharded: bool = False) -> None:
    case = _lookup(name, sharded)
    _, _, want = _reference(name, sharded)
    with retrace_ctx(retrace):
        got = run_grad(moefuse.fuse, case)
    assert_identical(got, want, f"{name}: grad(moefuse.fuse(loss)) vs grad(loss)")


# --------------------------------------------------------------------------------------------
# the corpus, in this process
# --------------------------------------------------------------------------------------------

GRAD_NAMES = [n for n in corpus.case_names() if n not in corpus.NO_GRAD_CASES]


def test_corpus_size():
    assert len(corpus.case_names()) + len(corpus.SHARDED_CASE_NAMES) >= 30
    assert tuple(c.name for c in corpus.cases()) == tuple(corpus.case_names())
    assert {c.name for c in corpus.cases() if c.grad_argnums is None} == set(corpus.NO_GRAD_CASES)
    assert set(corpus.FUSE_UNDER_JIT_CASES) <= set(corpus.case_names())


@pytest.mark.parametrize("retrace", RETRACE)
@pytest.mark.parametrize("name", corpus.case_names())
def test_jit_identity(name, retrace):
    check_forward(name, retrace)


@pytest.mark.parametrize("name", corpus.FUSE_UNDER_JIT_CASES)
def test_fuse_under_jit_identity(name):
    check_fuse_forward(name, retrace=False)


@pytest.mark.parametrize("retrace", RETRACE)
@pytest.mark.parametrize("name", GRAD_NAMES)
def test_grad_identity(name, retrace):
    check_grad(name, retrace)


# --------------------------------------------------------------------------------------------
# jit drop-in behaviour: decorators, caching, MOEFUSE_DISABLE
# --------------------------------------------------------------------------------------------


def _mlp_body(x):
    return jax.nn.gelu(x @ x.T) * 2.0 + 1.0


def test_decorator_bare():
    @moefuse.jit
    def f(x):
        return _mlp_body(x)

    x = jnp.linspace(-1.0, 1.0, 12, dtype=F32).reshape(3, 4)
    assert_identical(f(x), jax.jit(_mlp_body)(x), "@moefuse.jit")


def test_decorator_with_kwargs():
    def body(n, x):
        for _ in range(n):
            x = jnp.sin(x) + x
        return x

    @moefuse.jit(static_argnums=0)
    def f(n, x):
        return body(n, x)

    x = jnp.linspace(-1.0, 1.0, 6, dtype=F32)
    assert_identical(f(3, x), jax.jit(body, static_argnums=0)(3, x), "@moefuse.jit(static_argnums=0)")
    assert_identical(f(1, x), jax.jit(body, static_argnums=0)(1, x), "@moefuse.jit(static_argnums=0)")


def test_wrapper_keeps_function_metadata():
    def documented(x):
        """Docstring."""
        return x + 1

    wrapped = moefuse.jit(documented)
    assert wrapped.__name__ == "documented"
    assert wrapped.__doc__ == "Docstring."


def test_lower_compile_like_jax_jit():
    x = jnp.linspace(-1.0, 1.0, 12, dtype=F32).reshape(3, 4)
    compiled = moefuse.jit(_mlp_body).lower(x).compile()
    assert_identical(compiled(x), jax.jit(_mlp_body)(x), "moefuse.jit(f).lower(x).compile()(x)")


def _count_traces(make_jit, calls, **jit_kwargs):
    """Python-side trace counts of ``f`` after each call of a fixed call sequence."""
    n = [0]

    def f(x, scale=2.0):
        n[0] += 1
        return x * scale + 1.0

    wrapped = make_jit(f, **jit_kwargs)
    counts = []
    for args, kwargs in calls:
        jax.block_until_ready(wrapped(*args, **kwargs))
        counts.append(n[0])
    return counts


def test_cache_hit_and_retrace_on_new_shape():
    a = jnp.ones((2, 3), F32)
    calls = [
        ((a,), {}),
        ((a,), {}),  # same signature: cache hit
        ((a + 1.0,), {}),  # same signature, new values: cache hit
        ((jnp.ones((4, 3), F32),), {}),  # new shape: retrace
        ((a,), {}),  # back to the first signature: cached
        ((a.astype(jnp.bfloat16),), {}),  # new dtype: retrace
    ]
    want = _count_traces(jax.jit, calls)
    assert want == [1, 1, 1, 2, 2, 3]
    assert _count_traces(moefuse.jit, calls) == want


def test_cache_with_static_args():
    a = jnp.ones((2, 3), F32)
    calls = [((a,), {"scale": 2.0}), ((a,), {"scale": 2.0}), ((a,), {"scale": 3.0}), ((a,), {"scale": 2.0})]
    want = _count_traces(jax.jit, calls, static_argnames="scale")
    assert want == [1, 1, 2, 2]
    assert _count_traces(moefuse.jit, calls, static_argnames="scale") == want


def _mixtral_router(x, w):
    """A plain Mixtral-style router (softmax -> top-k -> renormalise): a fusion candidate."""
    probs = jax.nn.softmax(x @ w, axis=-1)
    weights, ids = jax.lax.top_k(probs, 2)
    return weights / weights.sum(-1, keepdims=True), ids


def test_disable_env_makes_jit_plain_jax_jit(monkeypatch):
    monkeypatch.setenv("MOEFUSE_DISABLE", "1")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 8)), F32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((8, 4)), F32)
    assert_identical(moefuse.jit(_mixtral_router)(x, w), jax.jit(_mixtral_router)(x, w), "MOEFUSE_DISABLE=1")
    want = str(jax.make_jaxpr(jax.jit(_mixtral_router))(x, w))
    assert str(jax.make_jaxpr(moefuse.jit(_mixtral_router))(x, w)) == want
    calls = [((x,), {}), ((x,), {}), ((x[:3],), {})]
    assert _count_traces(moefuse.jit, calls) == _count_traces(jax.jit, calls)


def test_disable_env_makes_fuse_the_identity(monkeypatch):
    monkeypatch.setenv("MOEFUSE_DISABLE", "1")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 8)), F32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((8, 4)), F32)
    want = str(jax.make_jaxpr(_mixtral_router)(x, w))
    assert str(jax.make_jaxpr(moefuse.fuse(_mixtral_router))(x, w)) == want


# --------------------------------------------------------------------------------------------
# the sharded corpus (8-device CPU mesh), in a subprocess unless this process has 8 devices
# --------------------------------------------------------------------------------------------

_CHECKS = {"jit": check_forward, "fuse": check_fuse_forward, "grad": check_grad}


def _sharded_checks():
    for case in corpus.sharded_cases():
        for retrace in (False, True):
            for kind, check in _CHECKS.items():
                if kind == "grad" and case.grad_argnums is None:
                    continue
                if kind == "fuse" and retrace:  # as in-process: jax.jit(moefuse.fuse) is checked plainly
                    continue
                yield f"{case.name}|{kind}|{'retrace_all' if retrace else 'plain'}", check, case.name, retrace


def run_sharded_checks() -> dict[str, str]:
    """Run every sharded check here; ``{key: "ok" | failure text}``."""
    results = {}
    for key, check, name, retrace in _sharded_checks():
        try:
            check(name, retrace, sharded=True)
            results[key] = "ok"
        except Exception as e:  # noqa: BLE001 - report every failure, keep going
            tb = traceback.format_exc(limit=-4)
            results[key] = f"{type(e).__name__}: {e}\n{tb}"
    return results


_SHARDED_STATE: dict = {}
_MARKER = "MOEFUSE_SHARDED_RESULTS="


def _start_sharded_subprocess():
    if "proc" in _SHARDED_STATE or "results" in _SHARDED_STATE:
        return
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    _SHARDED_STATE["proc"] = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--sharded"],
        env=env,
        cwd=os.path.dirname(os.path.abspath(__file__)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _sharded_results() -> dict[str, str]:
    if "results" in _SHARDED_STATE:
        return _SHARDED_STATE["results"]
    if jax.device_count() >= 8:
        _SHARDED_STATE["results"] = run_sharded_checks()
        return _SHARDED_STATE["results"]
    _start_sharded_subprocess()
    proc = _SHARDED_STATE.pop("proc")
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        _SHARDED_STATE["results"] = {"__error__": f"sharded subprocess timed out\n{stderr[-4000:]}"}
        return _SHARDED_STATE["results"]
    lines = [ln for ln in stdout.splitlines() if ln.startswith(_MARKER)]
    if proc.returncode != 0 or not lines:
        _SHARDED_STATE["results"] = {
            "__error__": f"sharded subprocess exited {proc.returncode}\n{stdout[-2000:]}\n{stderr[-6000:]}"
        }
    else:
        _SHARDED_STATE["results"] = json.loads(lines[-1][len(_MARKER) :])
    return _SHARDED_STATE["results"]


@pytest.fixture(scope="module", autouse=True)
def _launch_sharded_early(request):
    """Start the sharded subprocess before the in-process tests, so the two overlap."""
    if jax.device_count() < 8 and any(
        getattr(item, "originalname", "") == "test_sharded_identity" for item in request.session.items
    ):
        _start_sharded_subprocess()
    yield
    proc = _SHARDED_STATE.pop("proc", None)
    if proc is not None:
        proc.kill()
        proc.communicate()


def _sharded_params():
    params = []
    grad_free = set(corpus.SHARDED_NO_GRAD_CASES)
    for name in corpus.SHARDED_CASE_NAMES:
        for kind in _CHECKS:
            if kind == "grad" and name in grad_free:
                continue
            for retrace in ("plain",) if kind == "fuse" else ("plain", "retrace_all"):
                params.append(pytest.param(name, kind, retrace, id=f"{name}-{kind}-{retrace}"))
    return params


@pytest.mark.parametrize("name,kind,retrace", _sharded_params())
def test_sharded_identity(name, kind, retrace):
    results = _sharded_results()
    assert "__error__" not in results, results.get("__error__")
    key = f"{name}|{kind}|{retrace}"
    assert key in results, f"{key} was not run by the sharded runner (ran: {sorted(results)})"
    assert results[key] == "ok", results[key]


def _main(argv: list[str]) -> int:
    if argv != ["--sharded"]:
        print("usage: test_identity.py --sharded", file=sys.stderr)
        return 2
    results = run_sharded_checks()
    for key, status in results.items():
        print(f"{key}: {'ok' if status == 'ok' else 'FAIL ' + status.splitlines()[0]}", file=sys.stderr)
    print(_MARKER + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
