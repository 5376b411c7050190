"""Deviceless compile of every Pallas GPU kernel configuration in the selection table, per NVIDIA GPU.

The CUDA counterpart of compile_kernels.py: the jax CUDA plugin (`jax-cuda12-plugin`, the same version
as jax; of the nvidia-* wheels only nvcc's, for ptxas and libdevice) compiles for a GPU described by an
XLA `GpuTargetConfigProto` (tests/compile/gpu_specs/, copied from XLA's repository) with no GPU and no
CUDA driver: Pallas -> Triton -> PTX -> cubin, so Triton's lowering and its limits (shared memory per
block, block shapes, operand types) are checked. Every registered `select.KernelRow` of platform "gpu"
with `examples` is compiled for each GPU whose chip ("sm90" ...) the row accepts. Needs the plugin, in
its own venv::

    python tests/compile/setup_venv.py cuda
    ~/.cache/moefuse-compile/cuda/bin/python tests/compile/compile_kernels_cuda.py [h100 h200]

moefuse is imported from this checkout (tests/compile/harness.py), not from the venv. Prints one line
per (GPU, row, configuration) and exits non-zero when any compile fails (harness.KNOWN_FAILURES excepted).

A spec newer than the plugin may carry fields its proto does not have yet (the XLA of jaxlib 0.10.2
has no `collective_memory_granularity`): those are dropped, one at a time as the parser names them,
and the script says which.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no GPU backend to start: the plugin compiles for a topology


def _use_nvcc_wheel() -> str:
    """Point XLA at the ptxas and libdevice of the nvidia-cuda-nvcc-cu12 wheel (XLA would look in
    /usr/local/cuda first), unless XLA_FLAGS already names a CUDA folder. Returns the folder used."""
    flags = os.environ.get("XLA_FLAGS", "")
    given = re.search(r"--xla_gpu_cuda_data_dir=(\S+)", flags)
    if given:
        return given.group(1)
    try:
        spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return "(no nvidia-cuda-nvcc-cu12 wheel: XLA searches /usr/local/cuda ...)"
    folder = list(spec.submodule_search_locations)[0]
    os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_cuda_data_dir={folder}".strip()
    return folder


CUDA_DIR = _use_nvcc_wheel()

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import KNOWN_FAILURES, chosen_targets, compile_rows, print_versions, use_checkout  # noqa: E402

use_checkout()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from moefuse import select  # noqa: E402

SPECS = Path(__file__).resolve().parent / "gpu_specs"
GPUS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}

def _topology_or_log(text: str):
    """(topology, "") or (None, what the C++ text-format parser wrote to stderr)."""
    with tempfile.TemporaryFile() as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            return topologies.get_topology_desc(platform="cuda", target_config=text, topology="1x1x1"), ""
        except jax.errors.JaxRuntimeError:
            pass
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        return None, log.read().decode(errors="replace")


def _drop_field(text: str, line: int) -> tuple[str, str]:
    """text without the field that starts on `line` (1-based; a message field up to its closing brace)."""
    lines = text.splitlines(keepends=True)
    start = end = line - 1
    depth = 0
    for end in range(start, len(lines)):
        depth += lines[end].count("{") - lines[end].count("}")
        if depth <= 0:
            break
    return "".join(lines[:start] + lines[end + 1:]), lines[start].strip()


def topology(spec: Path):
    """The 1x1x1 CUDA topology of the GPU in `spec`, without the fields this plugin does not know."""
    text = spec.read_text()
    for _ in range(50):
        topo, log = _topology_or_log(text)
        if topo is not None:
            return topo
        found = re.search(r"GpuTargetConfigProto: (\d+):\d+: (.*has no field named.*)", log)
        if not found:
            raise RuntimeError(f"{spec.name}: the plugin does not accept this target config:\n{log.strip()}")
        text, dropped = _drop_field(text, int(found.group(1)))
        print(f"{spec.name}: dropped `{dropped}` ({found.group(2).strip()})", flush=True)
    raise RuntimeError(f"{spec.name}: too many fields unknown to this plugin")


def targets(gpus):
    for gpu in gpus:
        topo = topology(SPECS / GPUS[gpu])
        kind = topo.devices[0].device_kind
        chip = select.chip_of("gpu", kind)
        print(f"{gpu}: {kind} ({chip})", flush=True)
        yield gpu, chip, Mesh(np.array(topo.devices[:1]), ("x",))


def main(argv: list[str] | None = None) -> int:
    gpus = chosen_targets(__doc__, GPUS, "gpus", argv)
    print_versions("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "nvidia-cuda-nvcc-cu12")
    print(f"ptxas and libdevice from {CUDA_DIR}", flush=True)
    return compile_rows("gpu", targets(gpus), KNOWN_FAILURES["gpu"])


if __name__ == "__main__":
    sys.exit(main())
