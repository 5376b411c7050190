"""The ``moefuse`` command line: explain what moefuse would fuse in a program, and why.

A target is a zero-argument callable that returns the function to analyse and its example
arguments (arrays or ``jax.ShapeDtypeStruct``s)::

    # my_model.py
    import jax, jax.numpy as jnp

    def router(x, w):
        probs = jax.nn.softmax(x @ w, axis=-1)
        return jax.lax.top_k(probs, 2)

    def target():
        x = jax.ShapeDtypeStruct((16, 32), jnp.float32)
        w = jax.ShapeDtypeStruct((32, 8), jnp.float32)
        return router, (x, w)

Then::

    moefuse explain my_model.py:target            # the Plan as a table
    moefuse explain my_model.py:target --json     # the Plan as JSON
    moefuse explain my_model.py:target --jaxpr    # ... and the rewritten jaxpr
    moefuse explain my_model.py:target --platform tpu   # kernels chosen for TPU (from any host)
    moefuse explain my_pkg.models:target          # a module on sys.path (or in the cwd)
    moefuse patterns                              # the MoE patterns moefuse knows
    moefuse kernels                               # which kernel runs each fused op, per platform
    python -m moefuse ...                         # the same without the entry point

Exit status: 0 on success, 2 for a bad target (syntax, file, module, attribute), 1 when the
target or the analysis fails. Errors are one line on stderr; ``--traceback`` shows the full one.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_ATTR_RE = re.compile(rf"{_IDENT}(\.{_IDENT})*")

_TARGET_HELP = """\
TARGET names a callable that takes no arguments and returns (fun, args) or (fun, args, kwargs):
fun is the function to analyse, args a tuple of arrays or jax.ShapeDtypeStructs. Forms:
  path/to/file.py:callable     a Python file (its folder is put on sys.path while it runs)
  pkg.module:callable          an importable module (the current folder is searched first)
"""

_EXAMPLE = """\
example:
  $ cat router.py
  import jax, jax.numpy as jnp
  def route(x, w):
      probs = jax.nn.softmax(x @ w, axis=-1)
      v, i = jax.lax.top_k(probs, 2)
      return v / v.sum(-1, keepdims=True), i
  def target():
      return route, (jax.ShapeDtypeStruct((16, 32), jnp.float32),
                     jax.ShapeDtypeStruct((32, 8), jnp.float32))
  $ moefuse explain router.py:target
"""


class CliError(Exception):
    """An error reported as one line on stderr, with an exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``moefuse`` command."""
    parser = argparse.ArgumentParser(
        prog="moefuse",
        description="Find Mixture-of-Experts subgraphs in JAX programs and show how moefuse rewrites "
        "them into fused ops.",
        epilog="examples:\n"
        "  moefuse explain examples/demo.py:target          # the Ling-style demo model\n"
        "  moefuse explain my_model.py:target --json        # machine-readable\n"
        "  moefuse patterns                                 # what moefuse can fuse\n"
        "  moefuse kernels                                  # which kernel each op uses, per platform\n\n"
        "Run 'moefuse explain --help' for how to write a target.\n"
        "Environment: MOEFUSE_DISABLE=1 turns the pass off, MOEFUSE_LOG=debug logs matching decisions.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    explain = sub.add_parser(
        "explain",
        help="show what is fused and what is declined (and why) in a program",
        description="Trace a program without running it and print moefuse's Plan: every fused site\n"
        "and every declined candidate, with file:line and the reason.\n\n" + _TARGET_HELP,
        epilog=_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    explain.add_argument("target", metavar="TARGET", help="path/to/file.py:callable or pkg.module:callable")
    explain.add_argument(
        "--json",
        action="store_true",
        help="print the Plan as JSON (with --jaxpr: the rewritten jaxpr under the key 'jaxpr')",
    )
    explain.add_argument("--jaxpr", action="store_true", help="also print the rewritten jaxpr")
    explain.add_argument(
        "--platform",
        choices=("tpu", "gpu", "cpu"),
        help="choose kernels for this platform instead of the default backend (each site shows its "
        "kernel, tiles and the reason for every fallback)",
    )
    explain.add_argument("--traceback", action="store_true", help="on failure, print the full traceback")

    patterns = sub.add_parser(
        "patterns",
        help="print the table of supported MoE patterns",
        description="Print the table of MoE patterns moefuse detects and fuses.",
    )
    patterns.add_argument("--traceback", action="store_true", help="on failure, print the full traceback")

    kernels = sub.add_parser(
        "kernels",
        help="print the kernel selection table",
        description="Print which implementation runs each fused op on each platform: rows are tried in\n"
        "order, the first available one is used, and unavailable rows say why.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kernels.add_argument("--traceback", action="store_true", help="on failure, print the full traceback")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error argparse already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "explain":
            out = _explain(args.target, as_json=args.json, with_jaxpr=args.jaxpr, platform=args.platform)
        elif args.command == "kernels":
            out = _kernels()
        else:
            out = _patterns()
        _write(out)
        return EXIT_OK
    except CliError as e:
        if args.traceback and e.__cause__ is not None:
            traceback.print_exception(e.__cause__, file=sys.stderr)
        print(f"moefuse: error: {e.message}", file=sys.stderr)
        return e.code
    except BrokenPipeError:  # e.g. `moefuse explain ... | head`
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # silence the flush at exit
        return EXIT_OK


# --------------------------------------------------------------------------------------------
# explain


def _explain(target: str, *, as_json: bool, with_jaxpr: bool, platform: str | None = None) -> str:
    import moefuse

    with _target_context(target) as factory:
        fun, args, kwargs = _call_factory(target, factory)
        try:
            plan = moefuse.jit(fun, platform=platform).plan(*args, **kwargs)
        except Exception as e:
            raise CliError(f"moefuse.plan failed on {_name(fun)}: {_one_line(e)}") from e
        jaxpr = None
        if with_jaxpr:
            try:
                jaxpr = moefuse.rewritten_jaxpr(fun, *args, **kwargs)
            except Exception as e:
                raise CliError(f"rewriting {_name(fun)} failed: {_one_line(e)}") from e

    if as_json:
        data = plan.to_json()
        if jaxpr is not None:
            data["jaxpr"] = str(jaxpr)
        return json.dumps(data, indent=2, allow_nan=False)
    text = str(plan)
    if jaxpr is not None:
        text += "\n\nrewritten jaxpr:\n" + str(jaxpr)
    return text


def _call_factory(target: str, factory: Callable[[], Any]) -> tuple[Callable[..., Any], tuple, dict]:
    """Call the target and check that it returned (fun, args) or (fun, args, kwargs)."""
    expected = "a (fun, args) tuple or a (fun, args, kwargs) tuple"
    try:
        result = factory()
    except Exception as e:
        raise CliError(f"{target}() raised {_one_line(e)}") from e
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        got = f"a {len(result)}-tuple" if isinstance(result, tuple) else type(result).__name__
        raise CliError(f"{target}() must return {expected}, got {got}")
    fun, args = result[0], result[1]
    kwargs = result[2] if len(result) == 3 else {}
    if not callable(fun):
        raise CliError(
            f"{target}() must return {expected} whose fun is callable, got fun of type {type(fun).__name__}"
        )
    if not isinstance(args, tuple | list):
        raise CliError(
            f"{target}() must return {expected} whose args is a tuple or list, "
            f"got args of type {type(args).__name__}"
        )
    if not isinstance(kwargs, dict):
        raise CliError(
            f"{target}() must return {expected} whose kwargs is a dict, "
            f"got kwargs of type {type(kwargs).__name__}"
        )
    return fun, tuple(args), kwargs


@contextlib.contextmanager
def _target_context(target: str) -> Iterator[Callable[[], Any]]:
    """Resolve TARGET to its callable, with the target's folder on sys.path meanwhile."""
    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr:
        raise CliError(
            f"bad TARGET {target!r}: expected path/to/file.py:callable or pkg.module:callable", EXIT_USAGE
        )
    if not _ATTR_RE.fullmatch(attr):
        raise CliError(f"bad TARGET {target!r}: {attr!r} is not a Python name", EXIT_USAGE)

    is_file = where.endswith(".py") or "/" in where or os.sep in where
    if is_file:
        path = Path(where).expanduser()
        if path.is_dir():
            raise CliError(
                f"{where} is a directory, not a Python file: name a file in it, as {where.rstrip('/')}/"
                f"file.py:{attr}, or a module, as pkg.module:{attr}",
                EXIT_USAGE,
            )
        if not path.is_file():
            raise CliError(f"file not found: {where}", EXIT_USAGE)
        search_dir = str(path.resolve().parent)
    else:
        if not _ATTR_RE.fullmatch(where):
            raise CliError(
                f"bad TARGET {target!r}: {where!r} is neither a .py file nor a module name", EXIT_USAGE
            )
        search_dir = os.getcwd()

    saved = list(sys.path)
    sys.path.insert(0, search_dir)
    try:
        module = _load_file(path) if is_file else _import_module(where)
        obj: Any = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise CliError(f"{where} has no attribute {attr!r}", EXIT_USAGE)
            obj = getattr(obj, part)
        if not callable(obj):
            raise CliError(f"{where}:{attr} is not callable (it is {_a(type(obj).__name__)})", EXIT_USAGE)
        yield obj
    finally:
        sys.path[:] = saved


def _load_file(path: Path) -> Any:
    resolved = path.resolve()
    name = "_moefuse_target_" + re.sub(r"\W", "_", resolved.stem)
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise CliError(f"cannot load {path} as a Python file", EXIT_USAGE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up here
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise CliError(f"importing {path} failed: {_one_line(e)}", EXIT_USAGE) from e
    return module


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            raise CliError(
                f"module not found: {name} (is it installed, or in the current folder?)", EXIT_USAGE
            ) from e
        raise CliError(f"importing {name} failed: {_one_line(e)}", EXIT_USAGE) from e
    except Exception as e:
        raise CliError(f"importing {name} failed: {_one_line(e)}", EXIT_USAGE) from e


# --------------------------------------------------------------------------------------------
# patterns


def _kernels() -> str:
    from moefuse import select

    return select.format_table()


def _patterns() -> str:
    try:
        from moefuse import patterns
    except Exception as e:
        raise CliError(f"cannot import moefuse.patterns: {_one_line(e)}") from e
    table = getattr(patterns, "supported_table", None)
    if table is None:
        raise CliError("this moefuse build has no patterns table (moefuse.patterns.supported_table)")
    try:
        return str(table())
    except Exception as e:
        raise CliError(f"building the patterns table failed: {_one_line(e)}") from e


# --------------------------------------------------------------------------------------------
# helpers


def _one_line(e: BaseException, limit: int = 300) -> str:
    """'Type: first line of the message', shortened to one line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    elif len(lines) > 1:
        msg += " ..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _a(noun: str) -> str:
    """`noun` with its indefinite article: 'an int', 'a str'."""
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def _name(fun: Any) -> str:
    return getattr(fun, "__qualname__", None) or getattr(fun, "__name__", None) or type(fun).__name__


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("moefuse")
    except Exception:
        return "unknown"


def _write(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
