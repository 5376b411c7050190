"""MoE spellings through jax.jit and moefuse.jit side by side, on CPU.

Each spelling is an unmodified MoE block (router + experts + combine) at a small realistic scale;
both versions run in one process, interleaved, and the median times and their ratio go to
benchmarks/results/spellings_cpu.json with the machine, JAX version and date::

    python benchmarks/spellings_cpu.py            # T=256 D=256 F=512, (E=32, k=2) and (E=64, k=4)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import moefuse


def router(x, wr, k):
    probs = jax.nn.softmax(x @ wr, axis=-1)
    w, ids = jax.lax.top_k(probs, k)
    return w / w.sum(-1, keepdims=True), ids


def dense(k: int) -> Callable:
    def block(x, wr, wg, wu, wd):
        w, ids = router(x, wr, k)
        g = jnp.einsum("td,edf->tef", x, wg)
        u = jnp.einsum("td,edf->tef", x, wu)
        out = jnp.einsum("tef,efd->ted", jax.nn.silu(g) * u, wd)
        combine = jnp.sum(jax.nn.one_hot(ids, wr.shape[1]) * w[..., None], axis=1)
        return jnp.einsum("ted,te->td", out, combine)

    return block


def gather(k: int) -> Callable:
    def block(x, wr, wg, wu, wd):
        w, ids = router(x, wr, k)
        g = jnp.einsum("td,tkdf->tkf", x, wg[ids])
        u = jnp.einsum("td,tkdf->tkf", x, wu[ids])
        out = jnp.einsum("tkf,tkfd->tkd", jax.nn.silu(g) * u, wd[ids])
        return jnp.einsum("tkd,tk->td", out, w)

    return block


SPELLINGS = {"dense": dense, "gather": gather}


def inputs(t: int, d: int, f: int, e: int, seed: int = 0) -> tuple:
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    # a skewed router: a few experts get most tokens (realistic, not uniform)
    skew = jnp.log(1.0 / jnp.arange(1, e + 1)) * 2.0
    wr = jax.random.normal(keys[0], (d, e)) * d**-0.5 + skew[None, :] / d
    x = jax.random.normal(keys[1], (t, d)) + 1.0
    wg = jax.random.normal(keys[2], (e, d, f)) * d**-0.5
    wu = jax.random.normal(keys[3], (e, d, f)) * d**-0.5
    wd = jax.random.normal(keys[4], (e, f, d)) * f**-0.5
    return x, wr, wg, wu, wd


def median_ms(fns: dict[str, Callable], args: tuple, repeats: int) -> dict[str, float]:
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "spellings_cpu.json"))
    args = ap.parse_args()
    rows = []
    for e, k in ((32, 2), (64, 4)):
        data = inputs(256, 256, 512, e)
        for name, make in SPELLINGS.items():
            fn = make(k)
            plan = moefuse.plan(fn, *data)
            ops = sorted(s.op for s in plan.fused)
            ref, got = jax.jit(fn)(*data), moefuse.jit(fn)(*data)
            err = float(np.max(np.abs(np.asarray(ref) - np.asarray(got))))
            t = median_ms({"jax.jit": jax.jit(fn), "moefuse.jit": moefuse.jit(fn)}, data, args.repeats)
            row = {
                "spelling": name,
                "E": e,
                "k": k,
                "fused": ops,
                "max_abs_diff": err,
                "jax_ms": t["jax.jit"],
                "moefuse_ms": t["moefuse.jit"],
                "speedup": t["jax.jit"] / t["moefuse.jit"],
                "flop_ratio": e / k if name == "dense" else None,
            }
            rows.append(row)
            print(
                f"{name:<8} E={e:<3} k={k}  fused={','.join(ops) or '-':<10} jax {row['jax_ms']:8.2f} ms  "
                f"moefuse {row['moefuse_ms']:8.2f} ms  speedup {row['speedup']:5.2f}x  "
                f"(FLOP ratio {row['flop_ratio'] or '-'})  max|diff| {err:.2e}"
            )
    result = {
        "what": "MoE spellings, jax.jit vs moefuse.jit, T=256 D=256 F=512 f32 SwiGLU, skewed routing",
        "rows": rows,
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "machine": f"{platform.machine()} python {platform.python_version()}",
        "date": datetime.date.today().isoformat(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
