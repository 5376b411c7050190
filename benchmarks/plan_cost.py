"""Cost of `moefuse.plan` on a 64-layer unrolled MoE model versus compiling it with jax.jit.

Both are measured in one process, on the same model and arguments, and written to
benchmarks/results/plan_cost.json with the machine, JAX version and date::

    python benchmarks/plan_cost.py --layers 64
    venv312/bin/python benchmarks/plan_cost.py --out benchmarks/results/plan_cost_jax0.12.json

(the second from a Python 3.12 venv with the newest JAX, whose compile is faster, so the ratio is higher).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import moefuse


def build(layers: int, tokens: int, d: int, f: int, e: int, k: int):
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    params = {
        "gate": jax.random.normal(keys[0], (layers, d, e)) * d**-0.5,
        "bias": jnp.zeros((layers, e)),
        "w_in": jax.random.normal(keys[1], (layers, e, d, f)) * d**-0.5,
        "w_out": jax.random.normal(keys[2], (layers, e, f, d)) * f**-0.5,
    }
    x = jax.random.normal(keys[3], (tokens, d))

    def layer(p, i, h):
        s = jax.nn.sigmoid(h @ p["gate"][i])
        ids = jax.lax.top_k(s + p["bias"][i], k)[1]
        wts = jnp.take_along_axis(s, ids, axis=-1)
        wts = wts / (wts.sum(-1, keepdims=True) + 1e-20) * 2.5
        combine = jnp.zeros((h.shape[0], e)).at[jnp.arange(h.shape[0])[:, None], ids].set(wts)
        hidden = jax.nn.silu(jnp.einsum("td,edf->tef", h, p["w_in"][i]))
        return h + jnp.einsum("tef,efd,te->td", hidden, p["w_out"][i], combine)

    def model(p, h):
        for i in range(layers):  # unrolled, as many inference stacks are
            h = layer(p, i, h)
        return h

    return model, params, x


def timed_interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each of `fns`, the calls interleaved (one of each per round), each after
    `jax.clear_caches()` (outside the timed part), so a change in machine load hits all alike."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            jax.clear_caches()
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "plan_cost.json"))
    args = ap.parse_args()
    model, params, x = build(args.layers, tokens=64, d=64, f=128, e=16, k=4)
    plan = moefuse.plan(model, params, x)
    assert sum(s.op == "route" for s in plan.fused) == args.layers, str(plan)
    got = timed_interleaved(
        {
            "plan": lambda: moefuse.plan(model, params, x),
            "compile": lambda: jax.jit(model).lower(params, x).compile(),
            "trace": lambda: jax.make_jaxpr(model)(params, x),
        },
        args.repeats,
    )
    plan_s, compile_s, trace_s = got["plan"], got["compile"], got["trace"]
    result = {
        "what": f"moefuse.plan vs jax.jit(...).lower(...).compile() on a {args.layers}-layer unrolled MoE",
        "layers": args.layers,
        "fused_sites": {op: sum(s.op == op for s in plan.fused) for op in sorted({s.op for s in plan.fused})},
        "plan_s_median": statistics.median(plan_s),
        "make_jaxpr_s_median": statistics.median(trace_s),
        "lower_compile_s_median": statistics.median(compile_s),
        "plan_over_compile": statistics.median(plan_s) / statistics.median(compile_s),
        "timing": f"median of {args.repeats} interleaved rounds, caches cleared before each call",
        "samples_s": got,
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "machine": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}",
        "date": datetime.date.today().isoformat(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
