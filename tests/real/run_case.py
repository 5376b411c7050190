"""Run real-model cases through moefuse inside a library's venv; print one JSON object per case.

moefuse is imported from the checkout ``--root`` (default: this one) through an import hook that
follows that checkout's ``[tool.setuptools.package-dir]``, so the cached venv (which holds no moefuse)
serves every checkout at once. All the cases named must need the same number of CPU devices.

Each result is one stdout line, ``MOEFUSE_REAL_RESULT {json}``, with: ``case``, ``fused`` (the
Plan's fused ops in order), ``plan`` (the Plan's text),
``error`` (null, or ``{"stage", "last_line", "traceback"}`` for the first stage that raised),
``checks`` (forward / gradient comparisons against ``jax.jit``: max error and the bound it must
stay under), ``versions`` and ``seconds``.

Example::

    ~/.cache/moefuse-real/maxtext/bin/python tests/real/run_case.py --root /path/to/checkout \\
        maxtext/dense_dropless --jaxpr-dir /tmp/jaxprs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HARNESS_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(HARNESS_ROOT))  # run as a script: the repo's `tests`
from tests.checkout import use_checkout  # noqa: E402

DEVICES_FLAG = "--xla_force_host_platform_device_count"
RESULT_PREFIX = "MOEFUSE_REAL_RESULT "  # libraries print to stdout too: result lines carry this prefix


def set_devices(n: int) -> None:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICES_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"{DEVICES_FLAG}={n}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def find_case(case_id: str) -> Any:
    from tests.real.cases import load_cases

    lib, _, name = case_id.partition("/")
    for case in load_cases(lib):
        if case.name == name:
            return case
    raise SystemExit(f"no case {case_id!r}")


class StageError(Exception):
    def __init__(self, stage: str) -> None:
        self.stage = stage


def tolerance(dtype: Any) -> tuple[float, float]:
    """(rtol, atol) relative to the expected output's own max magnitude."""
    import jax.numpy as jnp

    if dtype == jnp.float32 or dtype == jnp.float64:
        return 1e-5, 1e-6
    # bf16 / f16: 8 (resp. 11) mantissa bits; a different summation order moves a few ulps
    return 2e-2, 1e-3


def narrowest_float(closed: Any) -> Any:
    """The float dtype with the fewest mantissa bits any value of the program has (bodies included)."""
    import jax.numpy as jnp

    found, stack = {jnp.dtype(jnp.float32)}, [closed.jaxpr]
    while stack:
        for eqn in stack.pop().eqns:
            found.update(jnp.dtype(v.aval.dtype) for v in eqn.outvars
                         if hasattr(v.aval, "dtype") and jnp.issubdtype(v.aval.dtype, jnp.floating))
            for p in eqn.params.values():
                for sub in p if isinstance(p, (tuple, list)) else (p,):
                    body = getattr(sub, "jaxpr", sub)
                    if hasattr(body, "eqns"):
                        stack.append(body)
    return min(found, key=lambda d: jnp.finfo(d).nmant)


def compare(label: str, want: Any, got: Any, floor: Any = None) -> list[dict[str, Any]]:
    """Leaf-by-leaf comparison; integer and bool leaves must be equal exactly.

    floats: within `tolerance` of the leaf's dtype, or one ulp of `floor` (relative to the leaf's scale)
    where that is less precise.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    want_leaves, want_tree = jax.tree_util.tree_flatten(want)
    got_leaves, got_tree = jax.tree_util.tree_flatten(got)
    if want_tree != got_tree:
        return [{"what": label, "ok": False, "detail": f"tree {got_tree} != {want_tree}"}]
    out = []
    for i, (w, g) in enumerate(zip(want_leaves, got_leaves)):
        w_np, g_np = np.asarray(w), np.asarray(g)
        what = f"{label}[{i}] {w_np.dtype}{list(w_np.shape)}"
        if w_np.shape != g_np.shape or w_np.dtype != g_np.dtype:
            out.append({"what": what, "ok": False, "detail": f"got {g_np.dtype}{list(g_np.shape)}"})
        elif not jnp.issubdtype(w_np.dtype, jnp.inexact):  # (numpy does not know bfloat16 is a float)
            mismatches = int(np.sum(w_np != g_np))
            out.append({"what": what, "ok": mismatches == 0, "detail": f"{mismatches} elements differ"})
        else:
            w64, g64 = w_np.astype(np.float64), g_np.astype(np.float64)
            rtol, atol = tolerance(w.dtype)
            if floor is not None and jnp.finfo(floor).nmant < jnp.finfo(w.dtype).nmant:
                rtol = max(rtol, float(jnp.finfo(floor).eps))  # one ulp of floor at the leaf's scale
            scale = float(np.max(np.abs(w64))) if w64.size else 0.0
            bound = rtol * scale + atol
            err = float(np.max(np.abs(g64 - w64))) if w64.size else 0.0
            finite = bool(np.all(np.isfinite(g64) == np.isfinite(w64)))
            ok = finite and err <= bound
            out.append(
                {"what": what, "ok": ok, "detail": f"max|err| {err:.3g} <= {bound:.3g} (scale {scale:.3g})"}
            )
    return out


def loss_of(fn: Any, out_example: Any) -> Any:
    """A scalar of every floating output leaf, weighted by fixed random cotangents."""
    import jax
    import jax.numpy as jnp

    leaves = jax.tree_util.tree_leaves(out_example)
    keys = jax.random.split(jax.random.key(7), max(len(leaves), 1))
    cot = [
        jax.random.normal(k, leaf.shape, jnp.float32) if jnp.issubdtype(leaf.dtype, jnp.floating) else None
        for k, leaf in zip(keys, leaves)
    ]

    def loss(*args: Any) -> Any:
        outs = jax.tree_util.tree_leaves(fn(*args))
        return sum(jnp.sum(o.astype(jnp.float32) * c) for o, c in zip(outs, cot) if c is not None)

    return loss


def float_argnums_grad(loss: Any, args: tuple) -> Any:
    """jax.grad of `loss` w.r.t. every floating leaf of args (other leaves held fixed)."""
    import jax
    import jax.numpy as jnp

    leaves, tree = jax.tree_util.tree_flatten(args)
    is_float = [hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) for x in leaves]

    def of_floats(floats: list[Any], rest: list[Any]) -> Any:
        it_f, it_r = iter(floats), iter(rest)
        full = [next(it_f) if f else next(it_r) for f in is_float]
        return loss(*jax.tree_util.tree_unflatten(tree, full))

    floats = [x for x, f in zip(leaves, is_float) if f]
    rest = [x for x, f in zip(leaves, is_float) if not f]
    return jax.jit(jax.grad(of_floats))(floats, rest)


def run_one(case: Any, jaxpr_dir: Path | None) -> dict[str, Any]:
    import jax

    import moefuse

    result: dict[str, Any] = {"case": case.id, "expect": list(case.expect), "known_miss": case.known_miss}
    result.update(fused=None, plan=None, error=None, checks=[], seconds={})
    stage = "build"
    jaxpr_text = ""
    started = time.monotonic()

    def mark(name: str) -> None:
        nonlocal started
        result["seconds"][name] = round(time.monotonic() - started, 2)
        started = time.monotonic()

    try:
        built = case.build()
        mark("build")
        with built.context():
            stage = "jax.make_jaxpr"
            closed = jax.make_jaxpr(built.fn)(*built.args)
            jaxpr_text = str(closed)
            stage = "moefuse.plan"
            plan = moefuse.plan(built.fn, *built.args)
            result["plan"] = str(plan)
            result["fused"] = [site.op for site in plan.fused]
            mark("plan")
            if not case.runs:
                stage = "jax.jit(fn).lower (the original program)"
                jax.jit(built.fn).lower(*built.args)
                stage = "jax.jit(moefuse.fuse(fn)).lower"
                jax.jit(moefuse.fuse(built.fn)).lower(*built.args)
                mark("lower")
            else:
                stage = "jax.jit (the original program)"
                want = jax.block_until_ready(jax.jit(built.fn)(*built.args))
                mark("jax.jit")
                stage = "moefuse.jit"
                got = jax.block_until_ready(moefuse.jit(built.fn)(*built.args))
                mark("moefuse.jit")
                # a program that computes in bf16 anywhere defines its f32 outputs to bf16 precision
                # only: XLA keeps bf16 intermediates in f32 where it fuses them (at the realistic
                # size EasyDeL STANDARD_MOE under jax.jit and op by op differ by 0.45 at scale 130)
                floor = narrowest_float(closed)
                result["checks"] += compare("forward", want, got, floor)
                if case.trains:
                    stage = "jax.grad (the original program)"
                    want_g = float_argnums_grad(loss_of(built.fn, want), built.args)
                    stage = "jax.grad(moefuse.fuse(fn))"
                    got_g = float_argnums_grad(loss_of(moefuse.fuse(built.fn), want), built.args)
                    # and where a cotangent is rounded is not fixed by the forward program either
                    result["checks"] += compare("grad", want_g, got_g, floor)
                    mark("grad")
    except Exception as e:  # noqa: BLE001 - every failure is reported, with the stage it happened in
        tb = traceback.format_exc()
        last = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
        result["error"] = {"stage": stage, "last_line": last, "traceback": tb}
    if jaxpr_dir is not None:
        jaxpr_dir.mkdir(parents=True, exist_ok=True)
        tail = result["plan"] or ""
        if result["error"]:
            tail += f"\n\nFAILED at {result['error']['stage']}:\n{result['error']['traceback']}"
        (jaxpr_dir / f"{case.lib}__{case.name}.txt").write_text(f"{jaxpr_text}\n\n{tail}\n")
    return result


def versions(lib: str) -> dict[str, str]:
    import importlib.metadata as md

    dist = {"sglang_jax": "sglang-jax", "tpu_inference": "tpu-inference"}.get(lib, lib)
    out = {}
    for name in ("jax", "jaxlib", "flax", dist):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+", help="lib/name, e.g. maxtext/dense_dropless")
    parser.add_argument(
        "--root", type=Path, default=HARNESS_ROOT, help="the checkout moefuse is imported from"
    )
    parser.add_argument("--jaxpr-dir", type=Path, help="also write <lib>__<name>.txt: the jaxpr and the Plan")
    args = parser.parse_args(argv)
    cases = [find_case(c) for c in args.cases]
    devices = {c.devices for c in cases}
    if len(devices) != 1:
        raise SystemExit(f"the cases need different device counts {sorted(devices)}: run them separately")
    set_devices(devices.pop())
    use_checkout(args.root.resolve())
    for case in cases:
        result = run_one(case, args.jaxpr_dir)
        result["versions"] = versions(case.lib)
        print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
