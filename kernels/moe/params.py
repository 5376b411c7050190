"""Bound parameters of the fused `moe_ffn` op (hashable, so they can be static arguments).

Example, GPT-OSS experts (fused interleaved gate/up with biases, clamped SwiGLU, top-4 of 32)::

    MoeParams(num_experts=32, k=4, activation="swiglu_oai", swiglu_alpha=1.702, swiglu_limit=7.0,
              fused_gate_up=True, gate_up_layout="interleaved", has_expert_bias=True)
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp
import numpy as np

Activation = Literal["swiglu", "geglu", "gelu", "relu", "silu", "swiglu_oai"]
GateUpLayout = Literal["concat", "interleaved"]
CapacityOrder = Literal["slot_major", "token_major"]

GLU_ACTIVATIONS = ("swiglu", "geglu", "swiglu_oai")
ACTIVATIONS = (*GLU_ACTIVATIONS, "gelu", "relu", "silu")


def _check_dtype_name(field: str, name: str | None) -> None:
    if name is None:
        return
    try:
        dt = np.dtype(jnp.dtype(name))
    except TypeError as e:
        raise ValueError(f"{field}={name!r} is not a dtype name") from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"{field}={name!r} must be a floating dtype")


@dataclasses.dataclass(frozen=True)
class MoeParams:
    """Everything that determines the result of one routed expert FFN.

    Semantics (see `reference.moe_ffn_reference`), for x [T, D], weights [T, k], ids int32 [T, k]:
      cdt = compute_dtype or x.dtype: x, expert weights and biases (see adt) are cast to cdt; matmuls and the
        activation run in cdt.
      pdt = projection_dtype or cdt: each projection's result dtype (a matmul's preferred_element_type:
        the products of cdt operands rounded to pdt).
      adt = activation_dtype or pdt (only with projection_dtype): each projection's pdt result is cast
        to adt; biases are cast to adt and added there, and the activation runs there. Biases with a
        projection_dtype need an explicit activation_dtype.
      hdt = hidden_dtype or adt (only with projection_dtype): the activation's output is cast to hdt
        before the down projection reads it; that projection multiplies in ddt = result_type(hdt, cdt),
        W_down cast to ddt: f32-accumulated projections with bf16 hidden rows, bf16-rounded
        projections with f32 hidden rows.
      FFN_e(v) = act(v @ W_in[e] + b_in[e]) @ W_down[e] + b_down[e]   (biases iff has_expert_bias)
        GLU activations split the first projection into gate g and up u (separate [E, D, F] arrays,
        or one [E, D, 2F] array when fused_gate_up: "concat" = first F columns gate, next F up;
        "interleaved" = even columns gate, odd columns up):
          swiglu      silu(g) * u
          geglu       gelu(g, approximate=gelu_approximate) * u
          swiglu_oai  g = min(g, limit); u = clip(u, -limit, limit); (u + 1) * g * sigmoid(alpha * g)
        plain MLPs: gelu(a, approximate=gelu_approximate), relu(a), silu(a).
      An assignment (t, j) is live iff 0 <= ids[t, j] < E and, when capacity is set, it is among the
        first `capacity` live assignments to its expert in priority order (counted separately in each
        of `capacity_groups` equal, consecutive token groups):
          slot_major   (j, t) lexicographic: every token's slot 0 first, then slot 1 ... (GShard)
          token_major  (t, j) lexicographic: token 0's slots first, then token 1 ...   (MaxText)
      wdt = weights_dtype or result_type(cdt, weights.dtype)
      out[t] = sum_j where(live[t, j], weights[t, j] * FFN_{ids[t, j]}(x[t]), 0)  in wdt, then cast
        to out_dtype (default x.dtype). A dropped or out-of-range assignment contributes exactly 0,
        whatever its weight.
      weights_on_input (Llama4): the weight scales the token before the expert FFN, and the k outputs
        are summed unweighted:
          v[t, j] = x[t] * weights[t, j]  in sdt = result_type(x.dtype, weights.dtype) (as jnp's
            `x * w` computes it), then cast to cdt
          out[t] = sum_j where(live[t, j], FFN_{ids[t, j]}(v[t, j]).astype(wdt), 0)  in wdt, then cast
            to out_dtype
        For a nonlinear FFN this is not the form above: FFN(w x) != w FFN(x).
    """

    num_experts: int
    k: int
    activation: Activation = "swiglu"
    gelu_approximate: bool = True
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    fused_gate_up: bool = False
    gate_up_layout: GateUpLayout = "concat"
    has_expert_bias: bool = False
    capacity: int | None = None
    capacity_order: CapacityOrder = "slot_major"
    capacity_groups: int = 1
    compute_dtype: str | None = None
    projection_dtype: str | None = None
    activation_dtype: str | None = None
    out_dtype: str | None = None
    hidden_dtype: str | None = None
    weights_dtype: str | None = None
    weights_on_input: bool = False

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} must be >= 1")
        if not 1 <= self.k:
            raise ValueError(f"k={self.k} must be >= 1")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; valid: {list(ACTIVATIONS)}")
        if self.fused_gate_up and not self.is_glu:
            raise ValueError(
                f"fused_gate_up needs a GLU activation {list(GLU_ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.gate_up_layout not in ("concat", "interleaved"):
            raise ValueError(f"unknown gate_up_layout {self.gate_up_layout!r}")
        if self.capacity is not None and self.capacity < 0:
            raise ValueError(f"capacity={self.capacity} must be >= 0 or None")
        if self.capacity_order not in ("slot_major", "token_major"):
            raise ValueError(f"unknown capacity_order {self.capacity_order!r}")
        if self.capacity_groups < 1:
            raise ValueError(f"capacity_groups={self.capacity_groups} must be >= 1")
        _check_dtype_name("compute_dtype", self.compute_dtype)
        _check_dtype_name("weights_dtype", self.weights_dtype)
        _check_dtype_name("projection_dtype", self.projection_dtype)
        _check_dtype_name("activation_dtype", self.activation_dtype)
        _check_dtype_name("out_dtype", self.out_dtype)
        _check_dtype_name("hidden_dtype", self.hidden_dtype)
        for name in ("activation_dtype", "hidden_dtype"):
            if getattr(self, name) is not None and self.projection_dtype is None:
                raise ValueError(f"{name}={getattr(self, name)} needs projection_dtype (without it the "
                                 "activation runs in the compute dtype): set both, or neither")
        if self.projection_dtype is not None and self.has_expert_bias and self.activation_dtype is None:
            raise ValueError("projection_dtype with has_expert_bias needs activation_dtype (the dtype the "
                             "biases are added in)")

    @property
    def is_glu(self) -> bool:
        return self.activation in GLU_ACTIVATIONS

    def describe(self) -> dict:
        """The parameters as plain data, for Plan.params."""
        return dataclasses.asdict(self)
