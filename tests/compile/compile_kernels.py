"""Deviceless compile of every Pallas kernel configuration in the selection table, per TPU chip.

Strongest evidence without an accelerator: libtpu runs the real Mosaic passes (layout inference,
VMEM allocation, LLO) for each chip. Every registered `select.KernelRow` of platform "tpu" with
`examples` is compiled for v5e, v6e and v7x topologies; any op package that registers examples
joins. Needs libtpu, in its own venv (not the main test venv; tests/compile/README.md)::

    python tests/compile/setup_venv.py tpu                  # jax[tpu] at the main venv's JAX version
    ~/.cache/moefuse-compile/tpu/bin/python tests/compile/compile_kernels.py [v5e v6e v7x]

moefuse is imported from this checkout (tests/compile/harness.py), not from the venv; no TPU and no
environment variables are needed (JAX_PLATFORMS defaults to cpu here, and the TPU_* variables that
silence libtpu's warnings are set). Prints one line per (chip, row, configuration) and exits non-zero
when any compile fails.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu compiles for a topology; no TPU backend to start
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")  # silences libtpu's stderr noise
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import KNOWN_FAILURES, chosen_targets, compile_rows, print_versions, use_checkout  # noqa: E402

use_checkout()

import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

TOPOLOGIES = {"v5e": "v5e:2x2", "v6e": "v6e:2x2", "v7x": "tpu7x:2x2x1"}


def targets(chips):
    for chip in chips:
        topo = topologies.get_topology_desc(topology_name=TOPOLOGIES[chip], platform="tpu")
        yield chip, chip, Mesh(np.array(topo.devices[:1]), ("x",))


def main(argv: list[str] | None = None) -> int:
    chips = chosen_targets(__doc__, TOPOLOGIES, "chips", argv)
    print_versions("jax", "jaxlib", "libtpu")
    return compile_rows("tpu", targets(chips), KNOWN_FAILURES["tpu"])


if __name__ == "__main__":
    sys.exit(main())
