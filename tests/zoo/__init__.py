"""Test zoo of MoE routers (and near misses) written the way different real authors write them.

The zoo is written *blind* with respect to moefuse's matcher: the cases only describe what the
program computes, through ``ZooCase.expect``, never how moefuse should find it.

* ``tests/zoo/routers.py``      -> ``ALL_ROUTERS``  (families "F1".."F5")
* ``tests/zoo/near_misses.py``  -> ``NEAR_MISSES``  (family "near-miss", ``expect == {}``)

Every entry of those lists is a zero-argument ``make_<name>()`` returning a :class:`ZooCase`;
``case.fn(*case.args)`` runs the program (eagerly or under ``jax.jit``).

``expect`` keys (router cases only), exactly these and no others:

``k``               experts chosen per token
``num_experts``     E
``score``           "softmax" | "sigmoid" | "none"  (F2 top-k-then-softmax uses "softmax")
``order``           "score_then_topk" | "topk_then_score"
``n_group``         number of consecutive expert groups (1 if no group-limited routing)
``topk_group``      groups kept per token (1 if no group-limited routing)
``renorm``          bool, an explicit renormalisation of the k weights to sum to 1
                    (for topk_then_score the softmax over k is NOT counted as a renorm)
``scale``           routed scaling factor (float) or None when the weights are not multiplied
``selection_bias``  bool, a per-expert bias added to the scores for selection only
``expert_scale``    bool, a per-expert [E] vector gathered at the chosen ids multiplied into weights

Things the keys above do not capture (logit bias, group-score method "top2_sum" vs "max",
masked_fill value 0.0 vs -inf, ties in the inputs) are described in ``note``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("F1", "F2", "F3", "F4", "F5")
NEAR_MISS = "near-miss"

EXPECT_KEYS = frozenset(
    {
        "k",
        "num_experts",
        "score",
        "order",
        "n_group",
        "topk_group",
        "renorm",
        "scale",
        "selection_bias",
        "expert_scale",
    }
)


@dataclass
class ZooCase:
    """One program of the zoo.

    name:   unique case name (``make_<name>`` builds it)
    fn:     the program; ``fn(*args)`` returns router outputs or a model output using them
    args:   concrete example arguments (small, deterministic)
    family: "F1".."F5" for routers, "near-miss" for programs that must never be fused
    expect: true router parameters (see module docstring); ``{}`` for near misses
    count:  number of routers in the program as traced (unrolled layers count each, a scan
            body counts once); 0 for near misses
    note:   one-line description / reason (for near misses: why it is not a router)
    """

    name: str
    fn: Callable[..., Any]
    args: tuple
    family: str
    expect: dict = field(default_factory=dict)
    count: int = 1
    note: str = ""


def router_expect(
    k: int,
    num_experts: int,
    score: str,
    order: str = "score_then_topk",
    *,
    n_group: int = 1,
    topk_group: int = 1,
    renorm: bool = False,
    scale: float | None = None,
    selection_bias: bool = False,
    expert_scale: bool = False,
) -> dict:
    """Build an ``expect`` dict with exactly the documented keys."""
    return {
        "k": k,
        "num_experts": num_experts,
        "score": score,
        "order": order,
        "n_group": n_group,
        "topk_group": topk_group,
        "renorm": renorm,
        "scale": scale,
        "selection_bias": selection_bias,
        "expert_scale": expert_scale,
    }


def normal(seed: int, shape: tuple[int, ...], dtype: Any = None, scale: float = 1.0, offset: float = 0.0):
    """Deterministic N(offset, scale^2) array from ``jax.random`` with a fixed seed.

    Draws a power-of-two sized pool (so only a handful of shapes are ever compiled eagerly) and
    reshapes it on the host; ``dtype`` defaults to float32 (bfloat16 works via ml_dtypes).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = int(np.prod(shape)) if shape else 1
    pool = max(4096, 1 << (n - 1).bit_length())
    flat = np.asarray(jax.random.normal(jax.random.key(seed), (pool,), jnp.float32))[:n]
    out = (np.float32(offset) + np.float32(scale) * flat).reshape(shape).astype(dtype or np.float32)
    return jnp.asarray(out)


def duplicate(a, axis: int = -1):
    """``concatenate([a, a], axis)`` on the host: builds inputs with bit-exact ties."""
    import jax.numpy as jnp
    import numpy as np

    a = np.asarray(a)
    return jnp.asarray(np.concatenate([a, a], axis=axis))
