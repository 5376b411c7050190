"""CPU timing of `moe_ffn` on capacity sites (token dropping): the sorted XLA schedule vs the slots one.

The sorted schedule (impl "xla") runs only the live rows but pays a fixed cost (sorting, the loop
over experts); the slots schedule (impl "slots") runs every capacity slot, empty ones included, as
capacity originals do. Which is faster depends on the size (fixed costs) and on the slots per
assignment (E * G * C / (T * k): empty slots cost rows). This is the measurement behind the `moe`
CPU row "slots" (`kernels/moe/__init__.py`, `SLOTS_WORK`). SwiGLU experts, f32, a softmax top-k
router on random logits (balanced loads), token-major priority; both implementations `jax.jit`-compiled
in one process and timed in alternating rounds (median). Results go to
benchmarks/results/capacity_cpu.json with the machine, JAX version and date::

    python benchmarks/capacity_cpu.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from host import cpu_model  # benchmarks/ is this script's directory

from moefuse.kernels.moe import MoeParams, moe_ffn

CASES = (  # (T, D, F, E, k, C): each size at 0.5, 1, 2 and 4 slots per assignment
    *((32, 32, 64, 8, 2, c) for c in (4, 8, 16, 32)),
    *((128, 128, 256, 16, 2, c) for c in (8, 16, 32, 64)),
    *((256, 256, 512, 16, 2, c) for c in (16, 32, 64, 128)),
)
IMPLS = ("xla", "slots")


def time_case(t: int, d: int, f: int, e: int, k: int, c: int, runs: int) -> dict:
    p = MoeParams(num_experts=e, k=k, capacity=c, capacity_order="token_major")
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (t, d))
    weights, ids = jax.lax.top_k(jax.nn.softmax(jax.random.normal(keys[1], (t, e))), k)
    w_gate, w_up = (jax.random.normal(kk, (e, d, f)) * d**-0.5 for kk in keys[2:4])
    w_down = jax.random.normal(keys[4], (e, f, d)) * f**-0.5
    args = (x, weights, ids.astype(jnp.int32), w_gate, w_up, w_down)
    fns = {
        impl: jax.jit(lambda x, w, i, wg, wu, wd, impl=impl: moe_ffn(x, w, i, (wg, wu), wd, p, impl=impl))
        for impl in IMPLS
    }
    for fn in fns.values():
        for _ in range(2):
            jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for _ in range(runs):
        for impl, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[impl].append(time.perf_counter() - start)
    ms = {impl: statistics.median(v) * 1e3 for impl, v in times.items()}
    return {
        "T": t, "D": d, "F": f, "E": e, "k": k, "C": c,
        "slots_per_assignment": e * c / (t * k),
        "slot_work_log2": (e * c * d * f).bit_length() - 1,
        "median_ms": ms,
        "ratio_xla_over_slots": ms["xla"] / ms["slots"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed rounds per case (default 30)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "capacity_cpu.json")
    args = parser.parse_args()
    rows = []
    for case in CASES:
        row = time_case(*case, runs=args.runs)
        rows.append(row)
        print(
            "T={T} D={D} F={F} E={E} k={k} C={C}: slots/assignment {slots_per_assignment:.2f}, "
            "xla {xla:.3f} ms, slots {slots:.3f} ms, xla/slots {ratio_xla_over_slots:.2f}".format(
                **row, **row["median_ms"]
            ),
            flush=True,
        )
    meta = {
        "date": datetime.date.today().isoformat(),
        "jax": jax.__version__,
        "device": f"{cpu_model() or platform.processor()}, {os.cpu_count()} cores, JAX device "
        f"{jax.devices()[0].platform}",
        "load_average_1min": os.getloadavg()[0],
        "timing": f"median of {args.runs} interleaved calls after 2 warm-up calls",
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
