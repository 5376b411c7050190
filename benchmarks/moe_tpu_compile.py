"""Compile the Pallas TPU `moe_ffn` kernels for TPU chips without a TPU (deviceless AOT with libtpu).

Run in a venv with `jax[tpu]` of the same JAX version (libtpu from PyPI; no TPU needed)::

    python -m venv .venv-tpu && .venv-tpu/bin/pip install "jax[tpu]==0.10.2"
    .venv-tpu/bin/pip install -e . --no-deps
    .venv-tpu/bin/python benchmarks/moe_tpu_compile.py > benchmarks/results/moe_tpu_compile.json

For every chip and shape class the forward (one fused FFN kernel) and the gradient (gmm, tgmm) are
lowered and compiled with `default_tiles`; the Mosaic passes run, so tiles that overflow VMEM or break
the (8, 128) layout rules fail here. Prints one JSON record per (chip, case, pass) with the tiles,
the compile time and the compiler's memory analysis, or the error's first line.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from moefuse.kernels.moe import MoeParams, moe_ffn, pallas_tpu  # noqa: E402

CHIPS = {"v5e": dict(topology_name="v5e:2x2"),
         "v6e": dict(topology_name="v6e:1x1", chips_per_host_bounds=(1, 1, 1)),
         "v5p": dict(topology_name="v5p:2x2x1"), "v7x": dict(topology_name="tpu7x:2x2x1")}
# (name, T, k, E, D, F, params, dtype)
CASES = [
    # Ling-2.6 layer shapes with 32 of its 256 experts (one device's share under expert parallelism: all
    # 256 experts' weights, 25.8 GB in bf16, exceed one chip's HBM; T is the tokens routed to the device)
    ("ling_decode", 64, 8, 32, 8192, 2048, dict(activation="swiglu"), "bfloat16"),
    ("ling_prefill", 4096, 8, 32, 8192, 2048, dict(activation="swiglu"), "bfloat16"),
    ("mixtral", 2048, 2, 8, 4096, 14336, dict(activation="swiglu"), "bfloat16"),
    ("gpt_oss", 1024, 4, 32, 2880, 2880,
     dict(activation="swiglu_oai", fused_gate_up=True, gate_up_layout="interleaved", has_expert_bias=True),
     "bfloat16"),
    ("small_f32_gelu", 256, 2, 8, 512, 1024, dict(activation="gelu", has_expert_bias=True), "float32"),
    ("odd_f32", 40, 2, 6, 24, 40, dict(activation="geglu", fused_gate_up=True), "float32"),
]


def args_for(t, k, e, d, f, p: MoeParams, dtype, mesh):
    def spec(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, P()))

    f_in = 2 * f if p.fused_gate_up else f
    w_in = spec((e, d, f_in), dtype) if p.fused_gate_up or not p.is_glu else (spec((e, d, f), dtype),) * 2
    b_in = b_down = None
    if p.has_expert_bias:
        b_in = spec((e, f_in), dtype) if p.fused_gate_up or not p.is_glu else (spec((e, f), dtype),) * 2
        b_down = spec((e, d), dtype)
    return (spec((t, d), dtype), spec((t, k), jnp.float32), spec((t, k), jnp.int32), w_in,
            spec((e, f, d), dtype), b_in, b_down)


def main() -> None:
    chips = sys.argv[1:] or list(CHIPS)
    for chip in chips:
        topo = topologies.get_topology_desc(platform="tpu", **CHIPS[chip])
        mesh = Mesh(np.array(topo.devices[:1]), ("x",))
        for name, t, k, e, d, f, kw, dt in CASES:
            p = MoeParams(num_experts=e, k=k, **kw)
            dtype = jnp.dtype(dt)
            args = args_for(t, k, e, d, f, p, dtype, mesh)

            def fwd(x, w, i, wi, wd, bi, bd, p=p):
                return moe_ffn(x, w, i, wi, wd, p, b_in=bi, b_down=bd, impl="pallas_tpu")

            def loss(x, w, wi, wd, bi, bd, i, p=p):
                return jnp.sum(fwd(x, w, i, wi, wd, bi, bd).astype(jnp.float32))

            grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5) if p.has_expert_bias else (0, 1, 2, 3))
            tiles = pallas_tpu.default_tiles(t, k, e, d, f, dtype, p.is_glu)
            for pass_name, fn, fargs in (("forward", fwd, args),
                                         ("gradient", grad, (*args[:2], *args[3:], args[2]))):
                rec = dict(chip=chip, case=name, pass_=pass_name, dtype=dt, tiles=tiles.__dict__,
                           jax=jax.__version__)
                t0 = time.time()
                try:
                    with jax.set_mesh(mesh):
                        compiled = jax.jit(fn).lower(*fargs).compile()
                    mem = compiled.memory_analysis()
                    rec.update(ok=True, compile_s=round(time.time() - t0, 2),
                               temp_bytes=getattr(mem, "temp_size_in_bytes", None))
                except Exception as err:  # noqa: BLE001 - a failed compile is the result being recorded
                    rec.update(ok=False, compile_s=round(time.time() - t0, 2),
                               error=str(err).strip().splitlines()[0][:300])
                print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
