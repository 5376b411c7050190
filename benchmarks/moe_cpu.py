"""CPU timing of the fused `moe_ffn` op: dense all-experts einsum vs the reference vs the XLA impl.

Each case runs SwiGLU experts (f32) on T tokens routed with a skewed, Zipf-like expert popularity
(p_e proportional to 1 / rank^s over a random permutation of the experts; each token draws k
distinct experts by Gumbel-top-k, so popular experts get several times the mean load, as real
routers do). All implementations are `jax.jit`-compiled in one process and timed in alternating
rounds (median over all runs, after warm-up). Each row records the expert loads and what the XLA
schedule did with them (its C0, loop blocks, and whether it ran the capacity pass). Results go to
benchmarks/results/moe_cpu.json with the machine, JAX version and date::

    python benchmarks/moe_cpu.py                 # the issue-3 cases at Zipf s = 2, 1, 0, forward only
    python benchmarks/moe_cpu.py --grad          # also time jax.grad of each (forward + backward)
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
import numpy as np
from host import cpu_model  # benchmarks/ is this script's directory

from moefuse.kernels.moe import MoeParams, moe_ffn, schedule, xla

CASES = (  # (T, D, F, E, k)
    (256, 256, 512, 32, 2),
    (256, 256, 512, 64, 4),
)


def zipf_routing(t: int, e: int, k: int, s: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(weights [T, k] float32 summing to 1 per token, ids [T, k] int32), skewed over experts."""
    rng = np.random.default_rng(seed)
    log_p = -s * np.log(np.arange(1, e + 1))[rng.permutation(e)]
    scores = log_p + rng.gumbel(size=(t, e))
    ids = np.argsort(-scores, axis=1)[:, :k]
    top = np.take_along_axis(scores, ids, axis=1)
    w = np.exp(top - top.max(axis=1, keepdims=True))
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32), ids.astype(np.int32)


def dense_moe(x, weights, ids, w_gate, w_up, w_down):
    """The dense all-experts spelling: every expert on every token, combined by scattered weights."""
    t, e = x.shape[0], w_gate.shape[0]
    combine = jnp.zeros((t, e), x.dtype).at[jnp.arange(t)[:, None], ids].add(weights)
    h = jax.nn.silu(jnp.einsum("td,edf->tef", x, w_gate)) * jnp.einsum("td,edf->tef", x, w_up)
    y = jnp.einsum("tef,efd->ted", h, w_down)
    return jnp.einsum("ted,te->td", y, combine)


def time_all(fns: dict, args: tuple, rounds: int, reps: int) -> dict[str, list[float]]:
    """Seconds per call: `rounds` rounds (order rotating) of, per fn, one untimed call and then `reps`
    timed back-to-back calls (so one fn's memory churn does not land on the next fn's timings)."""
    for f in fns.values():  # compile + warm up
        jax.block_until_ready(f(*args))
        jax.block_until_ready(f(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            jax.block_until_ready(fns[name](*args))
            for _ in range(reps):
                t0 = time.perf_counter()
                jax.block_until_ready(fns[name](*args))
                times[name].append(time.perf_counter() - t0)
    return times


def machine() -> str:
    cpus = f"({os.cpu_count()} cpus) python {platform.python_version()}"
    return f"{platform.machine()} {cpu_model()} {cpus}".strip()


def run_case(t, d, f, e, k, skew, seed, rounds, reps, grad) -> dict:
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (t, d), jnp.float32)
    w_gate = jax.random.normal(keys[1], (e, d, f), jnp.float32) * d**-0.5
    w_up = jax.random.normal(keys[2], (e, d, f), jnp.float32) * d**-0.5
    w_down = jax.random.normal(keys[3], (e, f, d), jnp.float32) * f**-0.5
    weights, ids = (jnp.asarray(a) for a in zipf_routing(t, e, k, skew, seed))
    params = MoeParams(num_experts=e, k=k, activation="swiglu")
    fns = {
        "dense": dense_moe,
        "reference": lambda x, w, i, g, u, dn: moe_ffn(x, w, i, (g, u), dn, params, impl="reference"),
        "xla": lambda x, w, i, g, u, dn: moe_ffn(x, w, i, (g, u), dn, params, impl="xla"),
    }
    if grad:
        for name in list(fns):
            loss = (lambda fn: lambda *a: jnp.sum(fn(*a) ** 2))(fns[name])
            fns[f"{name}+grad"] = jax.grad(loss, argnums=(0, 1, 3, 4, 5))
    fns = {name: jax.jit(fn) for name, fn in fns.items()}
    args = (x, weights, ids, w_gate, w_up, w_down)
    want = fns["dense"](*args)
    err = float(jnp.max(jnp.abs(fns["xla"](*args) - want)) / jnp.max(jnp.abs(want)))
    times = time_all(fns, args, rounds, reps)
    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    counts = np.bincount(np.asarray(ids).ravel(), minlength=e)
    sched = schedule(t, k, e)
    capacity_pass = bool(xla.use_capacity_pass(jnp.asarray(counts), sched))
    row = {
        "T": t, "D": d, "F": f, "E": e, "k": k, "dtype": "float32", "activation": "swiglu",
        "routing": f"zipf s={skew}", "max_load_over_mean": float(counts.max() / counts.mean()),
        "experts_used": int((counts > 0).sum()),
        "experts_in_loop": int((counts > (sched.c0 if capacity_pass else 0)).sum()),
        "schedule": {"C0": sched.c0, "loop_blocks": list(sched.blocks), "capacity_pass": capacity_pass},
        "median_ms": med, "min_ms": {name: min(ts) * 1e3 for name, ts in times.items()},
        "runs": len(times["dense"]), "xla_vs_dense_max_rel_err": err,
        "flop_ratio": e / k, "goal_speedup": e / k / 2,
        "speedup_xla_vs_dense": med["dense"] / med["xla"],
        "speedup_xla_vs_reference": med["reference"] / med["xla"],
    }
    if grad:
        row["speedup_grad_xla_vs_dense"] = med["dense+grad"] / med["xla+grad"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skew", type=float, nargs="+", default=[2.0, 1.0, 0.0], help="Zipf exponents s")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grad", action="store_true", help="also time jax.grad (forward + backward)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_cpu.json"))
    args = ap.parse_args()
    load_start = os.getloadavg()[0]  # other jobs on a shared machine inflate absolute times
    rows = [run_case(*case, s, args.seed, args.rounds, args.reps, args.grad)
            for case in CASES for s in args.skew]
    names = list(rows[0]["median_ms"])
    head = f"{'T':>4} {'D':>4} {'F':>4} {'E':>3} {'k':>2} {'routing':>11} {'max/mean':>8} {'xla':>4} "
    head += " ".join(f"{n + ' ms':>16}" for n in names) + f" {'dense/xla':>9} {'goal':>5} {'ref/xla':>7}"
    print(head)
    for r in rows:
        line = f"{r['T']:>4} {r['D']:>4} {r['F']:>4} {r['E']:>3} {r['k']:>2} {r['routing']:>11} "
        line += f"{r['max_load_over_mean']:>8.1f} {'cap' if r['schedule']['capacity_pass'] else 'loop':>4} "
        line += " ".join(f"{r['median_ms'][n]:>16.2f}" for n in names)
        line += f" {r['speedup_xla_vs_dense']:>9.2f} {r['goal_speedup']:>5.1f}"
        line += f" {r['speedup_xla_vs_reference']:>7.2f}"
        if "speedup_grad_xla_vs_dense" in r:
            line += f"  grad dense/xla {r['speedup_grad_xla_vs_dense']:.2f}"
        print(line)
    result = {
        "what": "moe_ffn on CPU: dense all-experts einsum vs reference vs xla impl, SwiGLU f32, Zipf routing "
                "(s=2: a few hot experts and a long tail; s=0: uniform)",
        "timing": f"median of {rows[0]['runs']} runs per impl ({args.rounds} rotating rounds x {args.reps}, "
                  "each burst after one untimed call) after warm-up, one process, jax.jit",
        "results": rows,
        "load_avg_1min_start_end": [load_start, os.getloadavg()[0]],
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "device": jax.devices()[0].device_kind,
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
