"""Deviceless compile of every Pallas kernel configuration in the selection table, per TPU chip.

Strongest evidence without an accelerator: libtpu runs the real Mosaic passes (layout inference,
VMEM allocation, LLO) for each chip. Every registered `select.KernelRow` of platform "tpu" with
`examples` is compiled for v5e, v6e and v7x topologies; any op package that registers examples
joins. Needs libtpu, in its own venv (not the main test venv)::

    python3 -m venv .venv-tpu && .venv-tpu/bin/pip install -e . "jax[tpu]==0.10.2"   # the main venv's JAX
    export TPU_ACCELERATOR_TYPE=v5litepod-4 TPU_WORKER_HOSTNAMES=localhost          # silences libtpu
    .venv-tpu/bin/python tests/compile/compile_kernels.py

Prints one line per (chip, row, configuration) and exits non-zero when any compile fails.
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moefuse import select

TOPOLOGIES = {"v5e": "v5e:2x2", "v6e": "v6e:2x2", "v7x": "tpu7x:2x2x1"}


def main() -> int:
    failures = 0
    for chip, name in TOPOLOGIES.items():
        mesh = Mesh(
            np.array(topologies.get_topology_desc(topology_name=name, platform="tpu").devices[:1]), ("x",)
        )
        sharding = NamedSharding(mesh, P())
        for row in select.rows(platform="tpu"):
            if row.examples is None or (row.chips and chip not in row.chips):
                continue
            for label, fn, args in row.examples():
                start = time.perf_counter()
                try:
                    with jax.set_mesh(mesh):
                        jax.jit(fn).lower(
                            *[jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
                        ).compile()
                    status = "ok"
                except Exception as e:  # noqa: BLE001 - report every configuration, then fail
                    failures += 1
                    status = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                print(
                    f"{chip} {row.op}/{row.impl} {label}: {status} ({time.perf_counter() - start:.1f}s)",
                    flush=True,
                )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
