"""The kernel selection registry: rows tried in order, reasons for every fallback, forcing, chips.

No hardware is needed: targets are built from device kinds as JAX reports them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import lax

import moefuse
from moefuse import select

F32 = jax.ShapeDtypeStruct((64, 16), jnp.float32)


@pytest.fixture
def toy_rows(monkeypatch):
    """A private op "toy" with three TPU rows, so the test does not depend on the real table."""
    monkeypatch.setattr(select, "_ROWS", list(select.rows()))
    monkeypatch.setattr(select, "_IMPLS", dict(select._IMPLS))
    select.register_impls("toy", ("big", "small", "xla"))
    select.register(
        select.KernelRow("toy", "tpu", "big", chips=("v6e", "v7x"), tiles={"block": 512}, note="wide"),
        select.KernelRow(
            "toy",
            "tpu",
            "small",
            dtypes=("float32",),
            shape="T <= 128",
            when=lambda req: req.inputs[0].shape[0] <= 128,
            fits=lambda req, target: None if req.params.get("ok", True) else "params not supported",
            tiles=lambda req, target: {"block": req.inputs[0].shape[0]},
        ),
        select.KernelRow("toy", "tpu", "xla"),
    )


@pytest.mark.parametrize(
    "platform,kind,chip",
    [
        ("tpu", "TPU v5 lite", "v5e"),
        ("tpu", "TPU v6 lite", "v6e"),
        ("tpu", "TPU7x", "v7x"),
        ("tpu", "TPU v5", "v5p"),
        ("tpu", "TPU v4", "v4"),
        ("gpu", "NVIDIA H100 80GB HBM3", "sm90"),
        ("gpu", "NVIDIA H200", "sm90"),
        ("gpu", "NVIDIA A100-SXM4-40GB", "sm80"),
        ("cuda", "something new", ""),
        ("cpu", "cpu", ""),
    ],
)
def test_chip_from_device_kind(platform, kind, chip):
    assert select.target_for(platform, device_kind=kind).chip == chip


def test_compute_capability_wins_over_the_kind():
    assert select.target_for("gpu", device_kind="NVIDIA H100", compute_capability="8.9").chip == "sm89"


def test_rows_in_order_with_the_reason_for_every_fallback(toy_rows):
    v6e, v5e = (
        select.target_for("tpu", device_kind="TPU v6 lite"),
        select.target_for("tpu", device_kind="TPU v5e"),
    )
    assert select.choose(select.Request("toy", {}, (F32,)), v6e) == select.Choice(
        select.Kernel("big", (("block", 512),))
    )
    got = select.choose(select.Request("toy", {}, (F32,)), v5e)
    assert got.kernel == select.Kernel("small", (("block", 64),))
    assert got.fallbacks == ("big: chip v5e is not one of v6e, v7x",)
    bf16 = jax.ShapeDtypeStruct((64, 16), jnp.bfloat16)
    got = select.choose(select.Request("toy", {}, (bf16,)), v5e)
    assert got.kernel.impl == "xla" and got.fallbacks[1] == "small: dtype bfloat16 is not one of float32"
    big = jax.ShapeDtypeStruct((256, 16), jnp.float32)
    got = select.choose(select.Request("toy", {}, (big,)), v5e)
    assert got.fallbacks[1] == "small: shape is not in class T <= 128"
    got = select.choose(select.Request("toy", {"ok": False}, (F32,)), v5e)
    assert got.fallbacks[1] == "small: params not supported"


def test_forced_kernel_first_then_the_table(toy_rows):
    forced = select.target_for("tpu", device_kind="TPU v6 lite", kernels={"toy": "small"})
    assert select.choose(select.Request("toy", {}, (F32,)), forced).kernel.impl == "small"
    got = select.choose(select.Request("toy", {"ok": False}, (F32,)), forced)
    assert got.kernel.impl == "big" and got.fallbacks == ("forced small (tpu): params not supported",)


def test_unknown_forced_names_list_the_valid_ones(toy_rows):
    with pytest.raises(ValueError, match="unknown implementation 'fast' for 'toy'; valid: big, small, xla"):
        select.target_for("tpu", kernels={"toy": "fast"})
    with pytest.raises(ValueError, match="unknown op 'nope'; valid ops: .*toy"):
        moefuse.jit(lambda x: x, kernels={"nope": "xla"})
    with pytest.raises(ValueError, match="platform must be one of tpu, gpu, cpu"):
        moefuse.jit(lambda x: x, platform="quantum")


def test_interpret_reaches_only_accelerator_kernels(toy_rows):
    target = select.target_for("tpu", device_kind="TPU v6 lite", interpret=True)
    assert select.choose(select.Request("toy", {}, (F32,)), target).kernel.interpret
    cpu = select.target_for("cpu", interpret=True)
    assert not select.choose(select.Request("route", {}, (F32,)), cpu).kernel.interpret


def test_table_prints_every_row_in_order(toy_rows):
    text = select.format_table()
    toy = [ln for ln in text.splitlines() if ln.startswith("| `toy`")]
    assert toy == [
        "| `toy` | tpu | v6e, v7x | any | any | big | block=512 | first choice | wide |",
        "| `toy` | tpu | any | float32 | T <= 128 | small | <lambda> | fallback |  |",
        "| `toy` | tpu | any | any | any | xla |  | fallback |  |",
    ]


def _mixtral(x, gate):
    w, i = lax.top_k(jax.nn.softmax(x @ gate, axis=-1), 2)
    return w / w.sum(-1, keepdims=True), i


ARGS = (jax.ShapeDtypeStruct((8, 32), jnp.float32), jax.ShapeDtypeStruct((32, 16), jnp.float32))


def test_jit_plan_follows_the_options():
    (site,) = moefuse.jit(_mixtral).plan(*ARGS).fused
    assert site.kernel == "xla" and site.fallbacks == ()
    plan = moefuse.jit(_mixtral, platform="tpu").plan(*ARGS)
    assert plan.platform == "tpu" and len(plan.fused) == 1
    (site,) = moefuse.jit(_mixtral, platform="gpu", kernels={"route": "xla"}).plan(*ARGS).fused
    assert site.kernel == "xla"


def test_chip_comes_from_the_abstract_mesh():
    mesh = jax.sharding.AbstractMesh(
        (), (), abstract_device=jax.sharding.AbstractDevice(device_kind="TPU7x", num_cores=1, platform="tpu")
    )
    with jax.sharding.use_abstract_mesh(mesh):
        plan = moefuse.jit(_mixtral).plan(*ARGS)
    assert (plan.platform, plan.chip) == ("tpu", "v7x")
