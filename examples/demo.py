"""moefuse on a Ling-2.6-style MoE stack: the Plan, a numeric check, and honest timings.

The model in ``ling_moe.py`` knows nothing about moefuse. This script
  1. prints ``moefuse.plan(forward, params, x)``: which routers and MoE blocks were fused, where,
     and with what;
  2. runs ``moefuse.jit(forward)`` and ``jax.jit(forward)`` on the same inputs and checks that the
     outputs agree within f32 tolerance and the expert ids are identical in every layer;
  3. times both (median of several runs after warm-up) and prints the ratio as measured.

Example::

    python examples/demo.py                        # 10-30 s on 2 CPU cores
    MOEFUSE_DISABLE=1 python examples/demo.py      # the same with the pass turned off
    moefuse explain examples/demo.py:target        # the Plan via the command line
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import moefuse

try:
    from ling_moe import DEFAULT_CONFIG, LingConfig, init_params
    from ling_moe import forward as ling_forward
except ImportError:  # imported as examples.demo
    from examples.ling_moe import DEFAULT_CONFIG, LingConfig, init_params
    from examples.ling_moe import forward as ling_forward

# f32 activations, so the check can demand identical expert ids in every layer: in bf16 the fused
# FFN rounds differently from the dense einsums (within one bf16 ulp per block), and a later
# layer's router can then break a near-tie the other way, as with any change of kernel.
CONFIG: LingConfig = dataclasses.replace(DEFAULT_CONFIG, dtype=jnp.float32)


def forward(params: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Ling-style stack at the demo's config (see examples/ling_moe.py)."""
    return ling_forward(params, x, CONFIG)


BATCH, SEQ = 2, 64
WARMUP, RUNS = 2, 20


def make_inputs(abstract: bool = False) -> tuple[Any, Any]:
    """(params, x) for the default config; ShapeDtypeStructs when `abstract`."""
    cfg = CONFIG
    make_params = lambda: init_params(jax.random.key(0), cfg)
    shape = (BATCH, SEQ, cfg.hidden_size)
    if abstract:
        return jax.eval_shape(make_params), jax.ShapeDtypeStruct(shape, cfg.dtype)
    return make_params(), jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(cfg.dtype)


def target() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """For ``moefuse explain examples/demo.py:target``: the model and abstract arguments."""
    return forward, make_inputs(abstract=True)


def _first_call(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """(result, seconds) of a first call, which includes tracing and compiling."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def _median_times(fns: list[Callable[..., Any]], *args: Any) -> list[float]:
    """Median seconds per call of each function: WARMUP calls, then RUNS rounds that call every
    function once (in alternating order, so background load hits all of them alike)."""
    for fn in fns:
        for _ in range(WARMUP):
            jax.block_until_ready(fn(*args))
    times: list[list[float]] = [[] for _ in fns]
    for r in range(RUNS):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[i](*args))
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main() -> int:
    cfg = CONFIG
    disabled = os.environ.get("MOEFUSE_DISABLE", "") not in ("", "0")
    params, x = make_inputs()
    device = jax.devices()[0]
    print(
        f"Ling-style MoE stack: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_experts} "
        f"experts in {cfg.n_group} groups (keep {cfg.topk_group}), top-{cfg.num_experts_per_tok}, "
        f"scale {cfg.routed_scaling_factor}; x {x.dtype}{list(x.shape)}"
    )
    print(
        f"JAX {jax.__version__} on {device.platform} ({device.device_kind})"
        + ("; MOEFUSE_DISABLE is set: the pass is off" if disabled else "")
    )

    print("\n== moefuse.plan(forward, params, x) ==")
    plan = moefuse.plan(forward, params, x)
    print(plan)

    print("\n== numeric check: moefuse.jit(forward) vs jax.jit(forward) ==")
    ref_fn, fused_fn = jax.jit(forward), moefuse.jit(forward)
    (y_ref, ids_ref), first_ref = _first_call(ref_fn, params, x)
    (y_new, ids_new), first_new = _first_call(fused_fn, params, x)
    y_ref32, y_new32 = np.asarray(y_ref, np.float32), np.asarray(y_new, np.float32)
    diff = float(np.max(np.abs(y_ref32 - y_new32)))
    scale = float(np.max(np.abs(y_ref32)))
    tol = 4 * float(jnp.finfo(y_ref.dtype).eps) * max(scale, 1.0)  # a few ulps at the output's scale
    ids_ref, ids_new = np.asarray(ids_ref), np.asarray(ids_new)
    same_layers = [bool(np.array_equal(a, b)) for a, b in zip(ids_ref, ids_new, strict=True)]
    outputs_ok = y_ref.dtype == y_new.dtype and y_ref.shape == y_new.shape and diff <= tol
    ids_ok = ids_ref.dtype == ids_new.dtype and all(same_layers)
    print(
        f"outputs    {y_new.dtype}{list(y_new.shape)}: max |diff| = {diff:.3g} "
        f"(tolerance {tol:.3g}, max |y| = {scale:.3g})  {'OK' if outputs_ok else 'MISMATCH'}"
    )
    n_tokens = ids_ref.shape[1] * ids_ref.shape[2]
    print(
        f"expert ids {ids_new.dtype}{list(ids_new.shape)}: identical in "
        f"{sum(same_layers)}/{len(same_layers)} layers "
        f"({n_tokens} tokens x top-{ids_ref.shape[-1]})  {'OK' if ids_ok else 'MISMATCH'}"
    )
    if not ids_ok:
        for layer, same in enumerate(same_layers):
            if not same:
                n_diff = int(np.sum(np.any(ids_ref[layer] != ids_new[layer], axis=-1)))
                print(f"  layer {layer}: {n_diff} tokens routed differently")

    print(f"\n== timing on {device.platform}: median of {RUNS} interleaved runs after {WARMUP} warm-up ==")
    t_ref, t_new = _median_times([ref_fn, fused_fn], params, x)
    print(f"jax.jit      {t_ref * 1e3:8.2f} ms   (first call incl. compile {first_ref:.2f} s)")
    print(f"moefuse.jit  {t_new * 1e3:8.2f} ms   (first call incl. analysis and compile {first_new:.2f} s)")
    print(f"speedup: {t_ref / t_new:.2f}x (moefuse.jit takes {t_new / t_ref:.2f}x the time of jax.jit)")
    print(
        "note: the model computes every expert on every token; the fused moe op computes only the\n"
        "      routed (token, expert) pairs, here on CPU with an XLA block schedule (`moefuse kernels`\n"
        "      lists what each platform runs)."
    )

    if not disabled and not plan.fused:
        print("\nFAILED: nothing was fused; expected a route and a moe per layer", file=sys.stderr)
        return 1
    if not (outputs_ok and ids_ok):
        print("\nFAILED: moefuse.jit(forward) does not match jax.jit(forward)", file=sys.stderr)
        return 1
    if disabled:
        print(
            "\nOK: results match jax.jit (MOEFUSE_DISABLE is set, so moefuse.jit ran the original program;"
            f"\n    the plan shows the {len(plan.fused)} site(s) it would fuse)"
        )
    else:
        print(f"\nOK: {len(plan.fused)} fused site(s), results match jax.jit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
