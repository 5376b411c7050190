"""CPU timing of the real-model suite's MoE paths: ``jax.jit(fn)`` against ``moefuse.jit(fn)``.

Every case of ``tests/real/cases/<lib>.py`` (for each lib in ``tests.real.cases.LIBS``) is built at
the test suite's tiny size and at ``CPU_REALISTIC`` (``tests/real/case.py``: 256 tokens, hidden 256,
expert FFN 512, 16 experts, top-2), in its library's venv (``python tests/real/setup_venvs.py <lib>``),
with moefuse imported from a checkout by ``tests/real/run_case.py``'s import hook. In one process per
library, both programs are compiled first (the first call, timed apart as "first call"), warmed up,
then run interleaved, the original twice per round (original, fused, original again; the order
rotates each round), each sample the mean of as many consecutive calls as take about 2 ms (a single
call at the tiny size is a tenth of a millisecond, mostly timer and dispatch jitter). Each one's
median is reported with the ratio original / fused (above 1: moefuse is faster), the A/A ratio
original / original again (the same program in two slots: how far apart two timings of one program
land on this machine, the noise a ratio is read against) and the ops the Plan fused. Cases with
``runs=False`` (they only trace and lower on XLA:CPU) are skipped with that reason; a builder without
a ``size`` parameter runs at the tiny size only.

The table goes to stdout, the results to ``benchmarks/results/real_models.{json,md}`` with the CPU
model, core count, load average, JAX version and date::

    python benchmarks/real_models.py                              # every case, both sizes
    python benchmarks/real_models.py --libs maxtext --sizes tiny --runs 10
    python benchmarks/real_models.py --cases easydel/mixtral_dense_moe sglang_jax/single_device

The driver needs no JAX (any Python 3.11+ that runs from this checkout); each library's own venv
does the work, one subprocess per library and device count.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from host import cpu_model  # noqa: E402  (benchmarks/ is this script's directory)

from tests.real.case import CPU_REALISTIC, TINY, RealCase, Size  # noqa: E402
from tests.real.cases import LIBS, load_cases  # noqa: E402
from tests.real.run_case import RESULT_PREFIX  # noqa: E402

SIZES: dict[str, Size] = {"tiny": TINY, "realistic": CPU_REALISTIC}
RESULTS = REPO_ROOT / "benchmarks" / "results"


def machine() -> dict[str, Any]:
    """The CPU model (``/proc/cpuinfo``), core count, architecture and Python of this host."""
    return {
        "cpu": cpu_model() or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        "driver_python": platform.python_version(),
    }


# ---------------------------------------------------------------- the worker (in a library's venv)


def accepts_size(build: Any) -> bool:
    try:
        return "size" in inspect.signature(build).parameters
    except (TypeError, ValueError):
        return False


def args_summary(args: tuple) -> dict[str, Any]:
    """The shapes a case was built with: its last array argument (the input) and the weight count."""
    import jax

    leaves = [x for x in jax.tree_util.tree_leaves(args) if hasattr(x, "shape")]
    return {
        "input": f"{leaves[-1].dtype}{list(leaves[-1].shape)}" if leaves else "",
        "param_elements": int(sum(x.size for x in leaves[:-1])),
    }


def calls_per_sample(fn: Any, args: tuple, sample_ms: float = 2.0) -> int:
    """How many consecutive calls of `fn` make one timing sample of about `sample_ms` (at least 1): a
    single call of a tenth of a millisecond is mostly timer and dispatch jitter."""
    import jax

    start = time.perf_counter()
    for _ in range(5):
        jax.block_until_ready(fn(*args))
    per_call_ms = (time.perf_counter() - start) * 1e3 / 5
    return max(1, min(100, round(sample_ms / per_call_ms)))


def bench_one(case: RealCase, size_name: str, runs: int, warmup: int) -> dict[str, Any]:
    """Build, plan, compile and time one case at one size (the caller entered nothing)."""
    import jax

    import moefuse
    from tests.real.run_case import compare, narrowest_float

    size = SIZES[size_name]
    row: dict[str, Any] = {"case": case.id, "size": size_name, "dims": vars(size).copy(), "error": None}
    tag = f"[{case.id} {size_name}]"
    stage = "build"
    try:
        start = time.monotonic()
        built = case.build(size=size) if accepts_size(case.build) else case.build()
        row.update(args_summary(built.args), build_s=round(time.monotonic() - start, 2))
        with built.context():
            stage = "moefuse.plan"
            plan = moefuse.plan(built.fn, *built.args)
            row["fused"] = [site.op for site in plan.fused]
            row["fused_sites"] = [
                {"op": s.op, "kernel": s.kernel, "location": s.location, "path": s.path} for s in plan.fused
            ]
            row["declined"] = len(plan.declined)
            row["plan"] = str(plan)
            progress(f"{tag} built in {row['build_s']}s (input {row['input']}); plan fused "
                     f"{row['fused'] or 'nothing'}, declined {row['declined']}")
            original, fused = jax.jit(built.fn), moefuse.jit(built.fn)
            stage = "jax.jit first call"
            start = time.perf_counter()
            want = jax.block_until_ready(original(*built.args))
            row["first_call_s_original"] = round(time.perf_counter() - start, 3)
            stage = "moefuse.jit first call"
            start = time.perf_counter()
            got = jax.block_until_ready(fused(*built.args))
            row["first_call_s_fused"] = round(time.perf_counter() - start, 3)
            # compared at the narrowest precision the program computes in (tests/real/README.md)
            checks = compare("forward", want, got, narrowest_float(jax.make_jaxpr(built.fn)(*built.args)))
            row["forward_ok"] = all(c["ok"] for c in checks)
            row["checks"] = checks
            stage = "timing"
            for _ in range(warmup):
                jax.block_until_ready(original(*built.args))
                jax.block_until_ready(fused(*built.args))
            # the original is also timed in a second slot of each round (an A/A control: how far two
            # timings of one program land apart here); the order rotates, so no slot always runs first
            programs = (("original", original), ("fused", fused), ("original_again", original))
            calls = calls_per_sample(original, built.args)
            times: dict[str, list[float]] = {name: [] for name, _ in programs}
            for r in range(runs):
                for name, fn in programs[r % 3:] + programs[:r % 3]:
                    start = time.perf_counter()
                    for _ in range(calls):
                        jax.block_until_ready(fn(*built.args))
                    times[name].append((time.perf_counter() - start) * 1e3 / calls)
    except Exception as e:  # noqa: BLE001 - reported per case, the other cases still run
        last = f"{type(e).__name__}: {e}".splitlines()[0]
        row["error"] = {"stage": stage, "last_line": last}
        progress(f"{tag} FAILED at {stage}: {last}")
        return row
    for name, ts in times.items():
        row[f"median_ms_{name}"] = statistics.median(ts)
        row[f"min_ms_{name}"] = min(ts)
    row["runs"] = runs
    row["calls_per_sample"] = calls
    row["ratio"] = row["median_ms_original"] / row["median_ms_fused"]
    row["aa_ratio"] = row["median_ms_original"] / row["median_ms_original_again"]
    progress(f"{tag} first call {row['first_call_s_original']}s / {row['first_call_s_fused']}s; "
             f"median of {runs}: jax.jit {row['median_ms_original']:.3f} ms, moefuse.jit "
             f"{row['median_ms_fused']:.3f} ms, ratio {row['ratio']:.2f} (A/A {row['aa_ratio']:.2f})"
             + ("" if row["forward_ok"] else "  (FORWARD DIFFERS)"))
    return row


def worker(ids: list[str], root: Path, sizes: list[str], runs: int, warmup: int) -> None:
    from tests.real.run_case import find_case, set_devices, use_checkout, versions

    cases = [find_case(i) for i in ids]
    set_devices(cases[0].devices)  # before JAX starts; the driver groups cases by device count
    use_checkout(root)
    import jax

    for case in cases:
        for size_name in sizes:
            row = bench_one(case, size_name, runs, warmup)
            row["versions"] = versions(case.lib)
            row["jax_device"] = jax.devices()[0].device_kind
            print(RESULT_PREFIX + json.dumps(row), flush=True)


# ---------------------------------------------------------------- the driver


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_lib(lib: str, cases: list[RealCase], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One worker subprocess per device count in ``lib``'s venv; its result rows."""
    from tests.real.setup_venvs import CACHE

    python = CACHE.python(lib)
    if not python.exists():
        why = f"no venv at {python}: run `python tests/real/setup_venvs.py {lib}`"
        progress(f"[{lib}] {why}")
        return [{"case": c.id, "size": s, "error": {"stage": "venv", "last_line": why}}
                for c in cases for s in args.sizes]
    rows = []
    for devices in sorted({c.devices for c in cases}):
        ids = [c.id for c in cases if c.devices == devices]
        cmd = [str(python), str(Path(__file__).resolve()), "--worker", "--root", str(args.root),
               "--sizes", *args.sizes, "--runs", str(args.runs), "--warmup", str(args.warmup), "--", *ids]
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the worker sets the device count
        progress(f"[{lib}] {len(ids)} case(s) x {len(args.sizes)} size(s) in {python.parent.parent}")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
        assert proc.stdout is not None
        for line in proc.stdout:  # libraries print to stdout too: only result lines are read
            if line.startswith(RESULT_PREFIX):
                rows.append(json.loads(line[len(RESULT_PREFIX):]))
        if proc.wait() != 0:
            done = {(r["case"], r["size"]) for r in rows}
            why = f"worker exited {proc.returncode}"
            progress(f"[{lib}] {why}")
            rows += [{"case": i, "size": s, "error": {"stage": "worker", "last_line": why}}
                     for i in ids for s in args.sizes if (i, s) not in done]
    return rows


def select_cases(args: argparse.Namespace) -> list[RealCase]:
    libs = args.libs or list(LIBS)
    unknown = sorted(set(libs) - set(LIBS))
    if unknown:
        raise SystemExit(f"unknown libs {unknown}; tests/real/cases LIBS: {list(LIBS)}")
    cases = [c for lib in libs for c in load_cases(lib)]
    if args.cases:
        missing = sorted(set(args.cases) - {c.id for c in cases})
        if missing:
            raise SystemExit(f"no such case(s) {missing} in libs {libs}")
        cases = [c for c in cases if c.id in args.cases]
    return cases


def fmt_ms(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.3f}" if key in row else "-"


def table(rows: list[dict[str, Any]], skipped: list[dict[str, str]]) -> str:
    """The markdown table of the results, then the skipped cases and the failures."""
    head = ("| case | size | input | fused ops | jax.jit ms | moefuse.jit ms | ratio orig/fused "
            "| A/A ratio | min ms (jax / moefuse) | first call s (jax / moefuse) | forward |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        if r.get("error"):
            why = f"FAILED at {r['error']['stage']}: {r['error']['last_line']}"
            lines.append(f"| {r['case']} | {r['size']} | {r.get('input', '')} | {r.get('fused', '')} "
                         f"| - | - | - | - | - | - | {why} |")
            continue
        fused = ", ".join(r["fused"]) or "(nothing)"
        lines.append(
            f"| {r['case']} | {r['size']} | {r['input']} | {fused} | {fmt_ms(r, 'median_ms_original')} "
            f"| {fmt_ms(r, 'median_ms_fused')} | {r['ratio']:.2f} | {r['aa_ratio']:.2f} "
            f"| {fmt_ms(r, 'min_ms_original')} / {fmt_ms(r, 'min_ms_fused')} "
            f"| {r['first_call_s_original']:.1f} / {r['first_call_s_fused']:.1f} "
            f"| {'equal' if r['forward_ok'] else 'DIFFERS'} |"
        )
    for s in skipped:
        lines.append(f"| {s['case']} | all | | | - | - | - | - | - | - | skipped: {s['reason']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"Libraries: {', '.join(LIBS)} (tests/real/cases LIBS; a lib without a case module has no "
        "cases). Case ids are lib/name as in `python -m pytest -m real tests/real` "
        f"(e.g. maxtext/dense_dropless). Sizes: "
        + "; ".join(f"{n} = {s}" for n, s in SIZES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--libs", nargs="+", metavar="LIB",
                        help=f"only these libraries (default: all of {', '.join(LIBS)})")
    parser.add_argument("--cases", nargs="+", metavar="LIB/NAME", help="only these case ids (default: all)")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES),
                        help="the sizes to build each case at (default: tiny realistic)")
    parser.add_argument("--runs", type=int, default=50,
                        help="timed samples of EACH program per case and size, interleaved (default: 50; "
                        "a sample is the mean of as many consecutive calls as take about 2 ms)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed calls of each after the first (compiling) call (default: 2)")
    parser.add_argument("--root", type=Path, default=REPO_ROOT,
                        help="the checkout moefuse is imported from (default: this one)")
    parser.add_argument("--out", type=Path, default=RESULTS / "real_models",
                        help="results path without suffix: writes OUT.json and OUT.md "
                        "(default: benchmarks/results/real_models)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("ids", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.root = args.root.resolve()
    if args.worker:
        worker(args.ids, args.root, args.sizes, args.runs, args.warmup)
        return

    started, load_start = time.monotonic(), os.getloadavg()
    cases = select_cases(args)
    skipped = [{"case": c.id, "reason": "runs=False: it only traces and lowers on XLA:CPU (the suite does "
                "not run it either)", "known_miss": c.known_miss} for c in cases if not c.runs]
    for s in skipped:
        progress(f"[{s['case']}] skipped: {s['reason']}")
    rows: list[dict[str, Any]] = []
    for lib in dict.fromkeys(c.lib for c in cases):
        rows += run_lib(lib, [c for c in cases if c.lib == lib and c.runs], args)
    order = {(c.id, s): i for i, (c, s) in enumerate((c, s) for c in cases for s in args.sizes)}
    rows.sort(key=lambda r: order.get((r["case"], r["size"]), len(order)))
    elapsed = time.monotonic() - started

    versions = next((r["versions"] for r in rows if "versions" in r), {})
    info = {
        "machine": machine(),
        "jax_device": next((r["jax_device"] for r in rows if "jax_device" in r), None),
        "jax": versions.get("jax"),
        "jaxlib": versions.get("jaxlib"),
        "flax": versions.get("flax"),
        "date": datetime.date.today().isoformat(),
        "load_avg_1min_start_end": [load_start[0], os.getloadavg()[0]],
        "wall_s": round(elapsed, 1),
    }
    text = table(rows, skipped)
    print(text)
    print(f"{len(rows)} rows in {elapsed:.0f}s")
    timing = (f"median of {args.runs} samples of each program, interleaved (original, fused, original again; "
              f"the order rotating each round), a sample being the mean of as many consecutive calls as take "
              f"about 2 ms (1 to 100: calls_per_sample in the JSON), after the first (compiling) call and "
              f"{args.warmup} warm-up call(s) of each; one process per library")
    result = {
        "what": "real-model MoE paths (tests/real/cases) on CPU: jax.jit(fn) vs moefuse.jit(fn); "
                "ratio = median original / median fused (above 1: moefuse faster); aa_ratio = median "
                "original / median of the original timed again in a second slot (the noise)",
        "timing": timing,
        "sizes": {n: vars(s) for n, s in SIZES.items() if n in args.sizes},
        **info,
        "rows": rows,
        "skipped": skipped,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    m = info["machine"]
    md = [
        "# Real-model MoE paths on CPU: `jax.jit` vs `moefuse.jit`",
        "",
        f"- device: {m['cpu']}, {m['cores']} cores ({m['arch']}), JAX device `{info['jax_device']}`",
        f"- jax {info['jax']}, jaxlib {info['jaxlib']}, flax {info['flax']}; date {info['date']}",
        f"- load average (1 min) at start / end: {info['load_avg_1min_start_end'][0]:.1f} / "
        f"{info['load_avg_1min_start_end'][1]:.1f} (a shared machine: absolute times are noisy)",
        f"- timing: {timing}; the whole run took {elapsed:.0f} s",
        "- sizes: " + "; ".join(f"{n}: {s}" for n, s in SIZES.items() if n in args.sizes),
        "- ratio = median jax.jit ms / median moefuse.jit ms: above 1, moefuse is faster",
        "- A/A ratio = median jax.jit ms / median of the same jax.jit program timed in a second slot of "
        "each round: its distance from 1 is the timing noise of that row (a ratio orig/fused as far "
        "from 1 is not a measured difference)",
        "",
        text,
        "",
        "Each row's Plan (what was fused and declined, and why) is in the JSON file next to this one.",
        "",
    ]
    md_path.write_text("\n".join(md))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
