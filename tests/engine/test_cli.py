"""Tests of the ``moefuse`` command line (``moefuse/cli.py``).

Most tests call ``moefuse.cli.main(argv)`` in-process with target files written to ``tmp_path``;
a few run ``python -m moefuse`` and the ``moefuse`` entry point as a user would. Example::

    python -m pytest tests/engine/test_cli.py -q
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from moefuse.cli import main
from moefuse.plan import strict_json

ROUTER_SRC = textwrap.dedent(
    """\
    import jax
    import jax.numpy as jnp
    import numpy as np


    def router(x, w):
        logits = x @ w
        probs = jax.nn.softmax(logits, -1)
        vals, ids = jax.lax.top_k(probs, 2)
        return vals / vals.sum(-1, keepdims=True), ids


    def target():
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)
        return router, (x, w)


    def target_abstract():
        return router, [jax.ShapeDtypeStruct((16, 32), jnp.float32),
                        jax.ShapeDtypeStruct((32, 8), jnp.float32)]


    def target_kwargs():
        x = jax.ShapeDtypeStruct((16, 32), jnp.float32)
        return router, (x,), {"w": jax.ShapeDtypeStruct((32, 8), jnp.float32)}


    def target_top3():
        def top3(x, w):
            return jax.lax.top_k(jax.nn.softmax(x @ w, -1), 3)

        return top3, [jax.ShapeDtypeStruct((16, 32), jnp.float32),
                      jax.ShapeDtypeStruct((32, 8), jnp.float32)]
    """
)
# Lines of `router` in ROUTER_SRC (1-based): the fused site must point into it.
_LINES = ROUTER_SRC.splitlines()
ROUTER_FIRST = _LINES.index("def router(x, w):") + 1
ROUTER_LAST = next(i for i, ln in enumerate(_LINES, 1) if ln.strip().startswith("return vals"))


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("moefuse: error: ")
    return lines[0]


def _write(tmp_path: Path, name: str, src: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(src))
    return path


@pytest.fixture
def router_file(tmp_path: Path) -> Path:
    return _write(tmp_path, f"router_{uuid.uuid4().hex[:8]}.py", ROUTER_SRC)


def _router_lines(text: str, path: Path) -> list[int]:
    """Line numbers that `text` cites as `<...>/<path.name>:<line>`."""
    return [int(n) for n in re.findall(rf"{re.escape(path.name)}:(\d+)", text)]


# ---------------------------------------------------------------------------------------------
# usage errors: exit 2, one line


@pytest.mark.parametrize(
    "target, fragment",
    [
        ("no_colon_here", "bad TARGET"),
        (":target", "bad TARGET"),
        ("some/file.py:", "bad TARGET"),
        ("some_module:1abc", "not a Python name"),
        ("not a module:target", "neither a .py file nor a module name"),
    ],
)
def test_bad_target_syntax(target: str, fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["explain", target], capsys)
    assert code == 2
    assert out == ""
    assert fragment in _one_error_line(err)


def test_file_not_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.py"
    code, _, err = _run(["explain", f"{missing}:target"], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert "file not found" in line and "missing.py" in line


def test_a_directory_is_named_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["explain", f"{tmp_path}:target"], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert f"{tmp_path} is a directory, not a Python file" in line
    assert "file not found" not in line


def test_module_not_found(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["explain", "no_such_module_for_moefuse_cli.sub:target"], capsys)
    assert code == 2
    assert "module not found: no_such_module_for_moefuse_cli.sub" in _one_error_line(err)


def test_module_that_fails_to_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"clibroken_{uuid.uuid4().hex[:8]}"
    _write(tmp_path, f"{name}.py", "import not_a_dependency_of_anything_xyz\n")
    monkeypatch.chdir(tmp_path)  # module targets are searched in the current folder
    code, _, err = _run(["explain", f"{name}:target"], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert f"importing {name} failed" in line
    assert "ModuleNotFoundError" in line and "not_a_dependency_of_anything_xyz" in line


def test_file_that_raises_on_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "raises.py", "raise RuntimeError('top-level boom')\n")
    code, _, err = _run(["explain", f"{path}:target"], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert "RuntimeError: top-level boom" in line


def test_attribute_missing(router_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["explain", f"{router_file}:nope"], capsys)
    assert code == 2
    assert "has no attribute 'nope'" in _one_error_line(err)


def test_not_callable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "notcallable.py", "target = 42\n")
    code, _, err = _run(["explain", f"{path}:target"], capsys)
    assert code == 2
    assert "is not callable (it is an int)" in _one_error_line(err)


def test_missing_target_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["explain"], capsys)
    assert code == 2
    assert "TARGET" in err


def test_help_returns_zero(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["explain", "--help"], capsys)
    assert code == 0
    assert "example:" in out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run([], capsys)
    assert code == 2
    assert "explain" in err


# ---------------------------------------------------------------------------------------------
# the target itself fails: exit 1, one line


def test_callable_raises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(
        tmp_path,
        "boom.py",
        """\
        def target():
            raise ValueError("no weights here\\nsecond line")
        """,
    )
    code, out, err = _run(["explain", f"{path}:target"], capsys)
    assert code == 1
    assert out == ""
    line = _one_error_line(err)
    assert "raised ValueError: no weights here" in line


def test_traceback_flag_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(
        tmp_path,
        "boom2.py",
        """\
        def target():
            raise ValueError("deep down")
        """,
    )
    code, _, err = _run(["explain", "--traceback", f"{path}:target"], capsys)
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("moefuse: error: ")


@pytest.mark.parametrize(
    "body, fragment",
    [
        ("return 3", "got int"),
        ("return (lambda x: x,)", "got a 1-tuple"),
        ("return (lambda x: x, (1,), {}, 4)", "got a 4-tuple"),
        ("return (1, (2,))", "fun is callable"),
        ("return (lambda x: x, 5)", "args is a tuple or list"),
        ("return (lambda x: x, (1,), [1])", "kwargs is a dict"),
    ],
)
def test_callable_returns_the_wrong_thing(
    body: str, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, "wrong.py", f"def target():\n    {body}\n")
    code, _, err = _run(["explain", f"{path}:target"], capsys)
    assert code == 1
    line = _one_error_line(err)
    assert "(fun, args) tuple" in line
    assert fragment in line


def test_strict_json_has_no_infinity_or_nan() -> None:
    data = {"a": [float("-inf"), 1.5, (float("inf"), float("nan"))], "b": {"c": 2}}
    assert strict_json(data) == {"a": ["-inf", 1.5, ["inf", "nan"]], "b": {"c": 2}}
    json.dumps(strict_json(data), allow_nan=False)


def test_sys_path_is_restored(router_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = list(sys.path)
    _run(["explain", f"{router_file}:nope"], capsys)
    assert sys.path == before


# ---------------------------------------------------------------------------------------------
# a real router (needs the engine: moefuse.plan and moefuse.rewritten_jaxpr)


def test_explain_router_table(router_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["explain", f"{router_file}:target"], capsys)
    assert code == 0, err
    assert "route" in out
    lines = _router_lines(out, router_file)
    assert lines, f"no {router_file.name}:LINE in the output:\n{out}"
    assert all(ROUTER_FIRST <= n <= ROUTER_LAST for n in lines), (lines, ROUTER_FIRST, ROUTER_LAST)


@pytest.mark.parametrize("factory", ["target", "target_abstract", "target_kwargs"])
def test_explain_router_json(factory: str, router_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["explain", "--json", f"{router_file}:{factory}"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert set(data) >= {"fused", "declined"}
    assert len(data["fused"]) == 1, data
    site = data["fused"][0]
    assert site["op"] == "route"
    assert site["params"]["k"] == 2
    assert site["params"]["num_experts"] == 8
    assert site["kernel"]
    (line,) = _router_lines(site["location"], router_file)
    assert ROUTER_FIRST <= line <= ROUTER_LAST


def test_explain_router_jaxpr(router_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["explain", "--jaxpr", f"{router_file}:target"], capsys)
    assert code == 0, err
    plan_text, _, jaxpr_text = out.partition("rewritten jaxpr:")
    assert "route" in plan_text
    assert "lambda" in jaxpr_text and "let" in jaxpr_text
    assert "f32[16,32]" in jaxpr_text and "i32[16,2]" in jaxpr_text


def test_explain_router_json_with_jaxpr(router_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["explain", "--json", "--jaxpr", f"{router_file}:target"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["fused"][0]["op"] == "route"
    assert "lambda" in data["jaxpr"]


def test_explain_module_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pkg = f"clipkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / pkg / "models.py").write_text(ROUTER_SRC)
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(["explain", "--json", f"{pkg}.models:target_abstract"], capsys)
    assert code == 0, err
    site = json.loads(out)["fused"][0]
    assert site["op"] == "route"
    assert _router_lines(site["location"], Path("models.py"))


def test_explain_platform_shows_each_kernel_and_every_fallback(
    router_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(["explain", "--platform", "tpu", f"{router_file}:target"], capsys)
    assert code == 0, err
    assert out.startswith("moefuse plan (platform tpu): 1 fused")
    assert re.search(r"FUSED +route .* kernel=pallas_tpu block_tokens=\d+\n", out), out
    # top-3 of 8 on GPU: the Triton kernel wants powers of two, so XLA, with the reason
    code, out, err = _run(["explain", "--platform", "gpu", f"{router_file}:target_top3"], capsys)
    assert code == 0, err
    assert re.search(r"FUSED +route .* kernel=xla\n", out), out
    assert "fallback: pallas_gpu: k=3 is not a power of two (Triton block shapes)" in out
    code, out, err = _run(["explain", "--json", "--platform", "gpu", f"{router_file}:target_top3"], capsys)
    (site,) = json.loads(out)["fused"]
    assert site["kernel"] == "xla" and site["fallbacks"] == [
        "pallas_gpu: k=3 is not a power of two (Triton block shapes)"
    ]


def test_patterns_table(capsys: pytest.CaptureFixture[str]) -> None:
    from moefuse import patterns

    code, out, err = _run(["patterns"], capsys)
    assert code == 0, err
    assert out.strip() == patterns.supported_table().strip()
    assert "route" in out


def test_kernels_table_marks_the_selected_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    from moefuse import select

    code, out, err = _run(["kernels"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 + len(select.rows())  # header, rule, one line per row
    first: set[tuple[str, str]] = set()
    for r in select.rows():  # the first available row per (op, platform) is tried first
        status = "fallback" if (r.op, r.platform) in first else "first choice"
        status = status if r.available else "not built"
        if r.available:
            first.add((r.op, r.platform))
        assert any(
            ln.startswith(f"| `{r.op}` | {r.platform} |") and f"| {r.impl} |" in ln and f"| {status} |" in ln
            for ln in lines
        ), (r, out)
    assert "| `route` | cpu | any | any | any | xla |" in out


# ---------------------------------------------------------------------------------------------
# as a user runs it: `python -m moefuse` and the `moefuse` entry point


def _subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # cwd is outside the repository, so the installed moefuse is the one imported.
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_python_dash_m_help(tmp_path: Path) -> None:
    res = _subprocess([sys.executable, "-m", "moefuse", "explain", "--help"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "TARGET" in res.stdout and "example:" in res.stdout
    assert "path/to/file.py:callable" in res.stdout


def test_python_dash_m_bad_target(tmp_path: Path) -> None:
    res = _subprocess([sys.executable, "-m", "moefuse", "explain", "nocolon"], tmp_path)
    assert res.returncode == 2
    assert res.stdout == ""
    assert _one_error_line(res.stderr)


def test_entry_point_explain_json(router_file: Path, tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "moefuse"
    if not script.exists():
        pytest.skip(f"no moefuse entry point next to {sys.executable} (package not installed here)")
    res = _subprocess([str(script), "explain", "--json", f"{router_file.name}:target"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["fused"][0]["op"] == "route"


def test_version(tmp_path: Path) -> None:
    res = _subprocess([sys.executable, "-m", "moefuse", "--version"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("moefuse ")
