"""What a new user hits first: the MOEFUSE_LOG setting, a function that returns a non-JAX value,
verify=True's report and its jax.jit surface, and file locations inside installed libraries.

    python -m pytest tests/engine/test_first_use.py -q
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import moefuse
from moefuse import _compat as C
from moefuse.api import log_level
from moefuse.verify import check_outputs

X = jax.random.normal(jax.random.PRNGKey(0), (16, 32))
W = jax.random.normal(jax.random.PRNGKey(1), (32, 8)) * 0.2


def mixtral(x, w):
    probs = jax.nn.softmax(x @ w, axis=-1)
    v, i = lax.top_k(probs, 2)
    return v / v.sum(-1, keepdims=True), i


# ---------------------------------------------------------------------------------------------
# MOEFUSE_LOG


@pytest.mark.parametrize(
    "value, level",
    [
        ("1", logging.INFO),
        ("true", logging.INFO),
        ("Yes", logging.INFO),
        ("on", logging.INFO),
        ("info", logging.INFO),
        ("DEBUG", logging.DEBUG),
        (" debug ", logging.DEBUG),
        ("warning", logging.WARNING),
        ("warn", logging.WARNING),
        ("error", logging.ERROR),
        ("critical", logging.CRITICAL),
        ("", None),
        ("0", None),
        ("off", None),
        ("false", None),
    ],
)
def test_moefuse_log_values(value: str, level: int | None) -> None:
    assert log_level(value) == level


def test_an_unknown_moefuse_log_value_says_what_is_valid() -> None:
    with pytest.raises(ValueError, match="MOEFUSE_LOG='verbose' is not understood") as e:
        log_level("verbose")
    for valid in ("1", "true", "debug", "info", "warning", "error"):
        assert valid in str(e.value)


def _import_moefuse(tmp_path: Path, log: str) -> subprocess.CompletedProcess[str]:
    code = "import logging, moefuse; print(logging.getLogger('moefuse').getEffectiveLevel())"
    env = {**os.environ, "MOEFUSE_LOG": log}
    # cwd outside the repository, so the installed moefuse is imported
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def test_import_with_moefuse_log_1_logs_at_info(tmp_path: Path) -> None:
    res = _import_moefuse(tmp_path, "1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(logging.INFO)


def test_import_with_an_unknown_moefuse_log_warns_once_and_imports(tmp_path: Path) -> None:
    res = _import_moefuse(tmp_path, "verbose")
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("MOEFUSE_LOG='verbose' is not understood") == 1, res.stderr
    assert "debug" in res.stderr


def test_debug_log_says_what_was_tried(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="moefuse"):
        moefuse.plan(mixtral, X, W)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("route pattern: 1 anchor(s) at equations") for m in messages), messages
    assert any(m.startswith("trying the route pattern at equation") and "(top_k)" in m for m in messages)
    assert any(m.startswith("moe pattern:") for m in messages), messages  # every pattern says so
    assert any(m.startswith("fused route at") for m in messages)


def test_info_log_shows_outcomes_only(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="moefuse"):
        moefuse.plan(mixtral, X, W)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("fused route at") for m in messages), messages
    assert not any(m.startswith("trying") for m in messages), messages


# ---------------------------------------------------------------------------------------------
# a function that returns something that is not a JAX value


def returns_a_string(x, w):
    return "not an array"


def returns_a_dict_with_a_string(x, w):
    return {"ids": lax.top_k(x @ w, 2)[1], "note": "not an array"}


@pytest.mark.parametrize(
    "fun, where", [(returns_a_string, ""), (returns_a_dict_with_a_string, " at output component ['note']")]
)
def test_a_non_jax_output_raises_what_jax_jit_raises(fun, where: str) -> None:
    with pytest.raises(TypeError) as theirs:
        jax.jit(fun)(X, W)
    expected = f"returned a value of type <class 'str'>{where}, which is not a valid JAX type"
    assert expected in str(theirs.value)  # what jax.jit says, so the test below matches it
    name = f"function {fun.__name__} at {__file__}:"
    for run in (moefuse.jit(fun), moefuse.fuse(fun), functools.partial(moefuse.plan, fun)):
        with pytest.raises(TypeError) as ours:
            run(X, W)
        assert expected in str(ours.value) and str(ours.value).startswith(name), str(ours.value)


def test_a_none_output_is_fine_as_with_jax_jit() -> None:
    def returns_none(x, w):
        return None

    assert jax.jit(returns_none)(X, W) is None
    assert moefuse.jit(returns_none)(X, W) is None
    assert moefuse.plan(returns_none, X, W).fused == []


# ---------------------------------------------------------------------------------------------
# verify=True: NaN/inf mismatches are named


def _verify_message(expected: np.ndarray, got: np.ndarray) -> str:
    with pytest.raises(moefuse.VerificationError) as e:
        check_outputs(expected, got)
    return str(e.value)


def test_verify_names_a_nan_only_in_the_original() -> None:
    expected = np.array([[1.0, np.nan, 3.0], [4.0, 5.0, 6.0]], np.float32)
    got = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
    msg = _verify_message(expected, got)
    assert "1 of 6 elements differ in NaN/inf (1 NaN in the original only)" in msg, msg
    assert "first at [0, 1]: original nan, fused 2.0" in msg, msg
    assert "max abs diff" not in msg, msg


def test_verify_names_nans_only_in_the_fused_and_inf_mismatches() -> None:
    expected = np.array([1.0, 2.0, np.inf, np.inf, 5.0], np.float32)
    got = np.array([1.0, np.nan, -np.inf, np.inf, 5.5], np.float32)
    msg = _verify_message(expected, got)
    assert "2 of 5 elements differ in NaN/inf (1 NaN in the fused only, 1 inf mismatches" in msg, msg
    assert "first at [1]: original 2.0, fused nan" in msg, msg
    assert "1 of 5 elements outside" in msg and "max abs diff 0.5" in msg, msg  # the finite one


def test_verify_accepts_nan_and_inf_in_the_same_places() -> None:
    values = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    check_outputs(values, values.copy())


# ---------------------------------------------------------------------------------------------
# verify=True has jax.jit's surface


def test_the_verify_wrapper_has_the_jax_jit_surface() -> None:
    checked = moefuse.jit(mixtral, verify=True)
    fast = moefuse.jit(mixtral)
    public = [name for name in dir(jax.jit(mixtral)) if not name.startswith("_")]
    assert {"lower", "trace", "eval_shape", "clear_cache"} <= set(public)
    assert [name for name in public if not hasattr(checked, name)] == []
    assert checked.__name__ == "mixtral" and checked.__wrapped__ is mixtral
    assert checked.lower(X, W).as_text() == fast.lower(X, W).as_text()
    assert "custom_vjp_call" in str(checked.trace(X, W).jaxpr)  # the fused program
    assert checked.eval_shape(X, W) == jax.eval_shape(mixtral, X, W)


def test_clear_cache_makes_the_next_call_verify_again(monkeypatch: pytest.MonkeyPatch) -> None:
    import moefuse.kernels.route as route_mod

    checked = moefuse.jit(mixtral, verify=True)
    checked(X, W)
    real = route_mod.route

    def broken(logits, params, **kw):
        w, ids, *rest = real(logits, params, **kw)
        return (w, ids[..., ::-1], *rest)

    monkeypatch.setattr(route_mod, "route", broken)
    checked(X, W)  # the compiled, verified program: not traced again, not checked again
    checked.clear_cache()
    with pytest.raises(moefuse.VerificationError, match="elements differ"):
        checked(X, W)


def test_the_verify_wrapper_decorates_methods() -> None:
    class Router:
        def __init__(self, w):
            self.w = w

        @functools.partial(moefuse.jit, verify=True, static_argnums=0)
        def __call__(self, x):
            return mixtral(x, self.w)

    np.testing.assert_array_equal(Router(W)(X)[1], mixtral(X, W)[1])


# ---------------------------------------------------------------------------------------------
# locations inside installed libraries


@pytest.mark.parametrize("install_dir", ["site-packages", "dist-packages"])
def test_relpath_of_an_installed_file_is_relative_to_its_install_folder(install_dir: str) -> None:
    path = f"/opt/venv/lib/python3.11/{install_dir}/maxtext/layers/moe.py"
    assert C.relpath(path) == os.path.join("maxtext", "layers", "moe.py")


def test_relpath_of_other_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert C.relpath(str(tmp_path / "models" / "moe.py")) == os.path.join("models", "moe.py")
    outside = str(tmp_path.parent / "elsewhere.py")
    assert C.relpath(outside) == outside


def test_the_plan_shows_an_installed_library_relative_to_its_package(tmp_path: Path) -> None:
    package = tmp_path / "lib" / "python3.11" / "site-packages" / "fakelib"
    package.mkdir(parents=True)
    source = textwrap.dedent(
        """\
        import jax
        from jax import lax


        def router(x, w):
            probs = jax.nn.softmax(x @ w, axis=-1)
            v, i = lax.top_k(probs, 2)
            return v / v.sum(-1, keepdims=True), i
        """
    )
    (package / "routing.py").write_text(source)
    spec = importlib.util.spec_from_file_location("fakelib_routing", package / "routing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (site,) = moefuse.plan(module.router, X, W).fused
    file, _, line = site.location.rpartition(":")
    assert file == os.path.join("fakelib", "routing.py"), site.location
    assert source.splitlines()[int(line) - 1].strip() == site.source


def test_plan_leaves_the_garbage_collector_as_it_found_it():
    def fn(x):
        return jnp.tanh(x)

    assert gc.isenabled()
    moefuse.plan(fn, jnp.ones(3))
    assert gc.isenabled()
    gc.disable()
    try:
        moefuse.plan(fn, jnp.ones(3))
        assert not gc.isenabled()
    finally:
        gc.enable()
