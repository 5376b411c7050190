"""The compile tier's configurations in the main suite: every selection-table row's `examples` trace, and
lower for their platform with `jax.export` (TPU: Mosaic custom calls; GPU: Triton ones), in the main
venv with no libtpu nor CUDA plugin. What only a compiler finds (VMEM or shared memory overflow, Mosaic
layout limits) is for compile_kernels.py / compile_kernels_cuda.py (tests/compile/README.md)."""

from __future__ import annotations

import re

import jax
import pytest
from jax import export
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from moefuse import select
from tests.compile.harness import KNOWN_FAILURES

ROWS = [row for row in select.rows() if row.examples is not None]
CASES = [
    pytest.param(row, label, fn, args, id=f"{row.op}/{row.impl}/{label}")
    for row in ROWS
    for label, fn, args in row.examples()
]
CUSTOM_CALL = {"tpu": "tpu_custom_call", "gpu": "__gpu$xla.gpu.triton"}
TPU = AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")


def _lower(platform: str, fn, args) -> str:
    if platform == "tpu":
        with use_abstract_mesh(AbstractMesh((), (), abstract_device=TPU)):  # kernels that read tpu_info
            return export.export(jax.jit(fn), platforms=("tpu",))(*args).mlir_module()
    check = export.DisabledSafetyCheck.custom_call(CUSTOM_CALL["gpu"])
    return export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=[check])(*args).mlir_module()


def test_every_pallas_row_has_examples():
    assert {(r.op, r.impl) for r in ROWS} == {
        (r.op, r.impl) for r in select.rows() if r.impl.startswith("pallas_")
    }


@pytest.mark.parametrize("row, label, fn, args", CASES)
def test_example_traces_and_lowers(row, label, fn, args):
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in args)
    jax.eval_shape(fn, *args)
    known = KNOWN_FAILURES[row.platform].get((f"{row.op}/{row.impl}", label))
    if known:
        with pytest.raises(Exception, match=re.escape(known[0])):
            _lower(row.platform, fn, args)
        pytest.xfail(known[1])
    assert CUSTOM_CALL[row.platform] in _lower(row.platform, fn, args)
