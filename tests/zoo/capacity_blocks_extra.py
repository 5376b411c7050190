"""More capacity (token-dropping) MoE blocks, in the spelling of MaxText 0.2.5, and their near misses.

``CAPACITY_BLOCKS_EXTRA`` holds :class:`tests.zoo.moe_blocks.MoECase` makers with the same ``expect`` and
``ref`` conventions as ``tests/zoo/moe_blocks.py`` (so the zoo self-check's per-token numpy reference
and the MoE zoo's fusion test drive them unchanged); ``CAPACITY_NEAR_MISSES_EXTRA`` holds near misses
(family "near-miss") that compute something other than a fused kernel's drop rule.

Example::

    case = make_capacity_maxtext_scattered_weights()
    y = jax.jit(case.fn)(*case.args)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from . import NEAR_MISS, ZooCase, normal
from .moe_blocks import MOE, MoECase, _block_ref, _ffn_ref, _ref, _router_ref, _w, moe_expect

BATCH, SEQ, D_MODEL, D_FF, NUM_EXPERTS, TOP_K = 2, 16, 32, 64, 8, 2
CAPACITY = int(max(math.ceil(SEQ * TOP_K / NUM_EXPERTS) * 1.0, 1.0))  # MaxText's formula, factor 1.0: 4


def _weights_scattered(weights, indices):
    """MaxText's reshape_and_update_weights: [B, S, k] weights written into [B, S, E] zeros."""
    b, s, _ = weights.shape
    dense = jnp.zeros((b, s, NUM_EXPERTS), weights.dtype)
    return dense.at[jnp.arange(b)[:, None, None], jnp.arange(s)[:, None], indices].set(weights)


def _weights_einsum(weights, indices):
    """The same [B, S, E] weights as a sum over k of weight times one-hot mask."""
    return jnp.einsum("bsk,bske->bse", weights, jax.nn.one_hot(indices, NUM_EXPERTS, dtype=weights.dtype))


def _masks(variant):
    """MaxText 0.2.5's generate_masks, or one of its near misses (``variant``)."""

    def generate_masks(top_k_indices, probs):
        b, s, _ = top_k_indices.shape
        expert_mask = jax.nn.one_hot(top_k_indices, num_classes=NUM_EXPERTS, dtype=jnp.int32)
        expert_mask_fused = jnp.reshape(expert_mask, (b, s * TOP_K, NUM_EXPERTS))
        count_fused = jnp.cumsum(expert_mask_fused, axis=1)
        count = jnp.reshape(count_fused, (b, s, TOP_K, NUM_EXPERTS))
        keep = jnp.less(count, CAPACITY) if variant == "lt_count" else jnp.less_equal(count, CAPACITY)
        trunc_expert_mask = expert_mask * keep
        combined_expert_mask = jnp.sum(trunc_expert_mask, axis=2)
        probs = probs * combined_expert_mask
        if variant == "unflattened_product":  # the position taken as mask * count in [B, S, k, E]
            position = expert_mask * count
        elif variant == "unmasked_count_sum":  # counts of the other choice at this expert added in
            position = count
        else:
            position = jnp.reshape(expert_mask_fused * count_fused, (b, s, TOP_K, NUM_EXPERTS))
        combined_position = jnp.sum(position, axis=2) * combined_expert_mask
        slots = jax.nn.one_hot(combined_position, num_classes=CAPACITY + 1, dtype=jnp.int32)
        combine_mask = probs[..., None] * slots
        # cut slot 0 (dropped choices); the near miss cuts the last slot instead (1-based slots kept)
        combine_mask = (
            combine_mask[..., :CAPACITY] if variant == "slots_not_shifted" else combine_mask[..., 1:]
        )
        return combine_mask.astype(bool), combine_mask

    return generate_masks


def _maxtext_block(seed, *, weights="scatter", ids="top_k", variant="ok"):
    """(fn, args, router ref, ffn ref) of a MaxText-0.2.5-style dense_matmul with capacity.

    The router is skewed towards experts 0 and 1 so that they overflow and choices are dropped.
    """
    inputs = normal(seed, (BATCH, SEQ, D_MODEL))
    gate_kernel = _w(seed + 1, (D_MODEL, NUM_EXPERTS), D_MODEL, gain=2.0)
    gate_kernel = gate_kernel.at[:, :2].add(jnp.sign(inputs.mean((0, 1)))[:, None] * 0.5)
    wi_0 = _w(seed + 2, (NUM_EXPERTS, D_MODEL, D_FF), D_MODEL)
    wi_1 = _w(seed + 3, (NUM_EXPERTS, D_MODEL, D_FF), D_MODEL)
    wo = _w(seed + 4, (NUM_EXPERTS, D_FF, D_MODEL), D_FF)
    spread = _weights_scattered if weights == "scatter" else _weights_einsum
    generate_masks = _masks(variant)

    def route(gate_logits):
        if ids == "top_k":
            top_k_weights, top_k_indices = jax.lax.top_k(gate_logits, TOP_K)
        else:  # two argmaxes of different scores: a token may pick one expert twice
            first = jnp.argmax(gate_logits, axis=-1)
            second = jnp.argmax(gate_logits * jnp.linspace(1.0, 0.5, NUM_EXPERTS), axis=-1)
            top_k_indices = jnp.concatenate([first[..., None], second[..., None]], axis=-1)
            top_k_weights = jnp.take_along_axis(gate_logits, top_k_indices, axis=-1)
        return jax.nn.softmax(top_k_weights, axis=-1), top_k_indices

    def dense_matmul(inputs, gate_kernel, wi_0, wi_1, wo):
        top_k_weights, top_k_indices = route(jnp.einsum("bsm,me->bse", inputs, gate_kernel))
        dispatch_mask, combine_mask = generate_masks(top_k_indices, spread(top_k_weights, top_k_indices))
        dispatch = jnp.einsum("BSM,BSEC -> EBCM", inputs, dispatch_mask)
        layer_w0 = jnp.einsum("EBCM,EMH -> EBCH", dispatch, wi_0)
        layer_w1 = jnp.einsum("EBCM,EMH -> EBCH", dispatch, wi_1)
        expert_out = jnp.einsum("EBCH,EHM -> EBCM", jax.nn.silu(layer_w0) * layer_w1, wo)
        return jnp.einsum("EBCM,BSEC -> BSM", expert_out, combine_mask)

    args = (inputs, gate_kernel, wi_0, wi_1, wo)
    return (
        dense_matmul,
        args,
        _router_ref(gate_kernel, TOP_K, order="topk_then_score"),
        _ffn_ref("swiglu", wi_1, wo, wi_0),
    )


def _block_case(name, seed, note, **spelling) -> MoECase:
    fn, args, router, ffn = _maxtext_block(seed, **spelling)
    cap = {"capacity": CAPACITY, "groups": BATCH, "order": "token_major"}
    return MoECase(
        name,
        fn,
        args,
        MOE,
        moe_expect(TOP_K, NUM_EXPERTS, "swiglu", "capacity", capacity=CAPACITY),
        note=note,
        ref=_ref(args[0], [_block_ref(router, ffn, capacity=cap)]),
    )


def make_capacity_maxtext_scattered_weights() -> MoECase:
    """MaxText 0.2.5 dense_matmul with capacity: the top-k weights scattered to [B, S, E] first.

    The weights (softmax over the top-k logits) are written into a [B, S, E] zero array with
    ``.at[b, s, ids].set``; the token-major positions are counted on the flattened [B, S*K, E] mask
    (the product with the mask taken there too), kept while the inclusive count is ``<= C``, and the
    slots come from ``one_hot(kept position + 1, C + 1)[..., 1:]`` (dropped choices land in slot 0,
    which is cut off).
    """
    return _block_case(
        "capacity_maxtext_scattered_weights",
        1130,
        "MaxText 0.2.5: weights .at[b, s, ids].set into [B,S,E]; positions on the flat [B,S*K,E] mask; "
        "`<= C` on the inclusive count; one_hot(pos + 1, C + 1)[..., 1:]; skewed router (drops)",
    )


def make_capacity_maxtext_einsum_weights() -> MoECase:
    """The same block with the [B, S, E] weights as an einsum over k and the position taken per choice."""
    return _block_case(
        "capacity_maxtext_einsum_weights",
        1140,
        "MaxText 0.2.5 masks, but weights einsum('bsk,bske->bse') and position mask * count in "
        "[B,S,K,E]; one_hot(pos + 1, C + 1)[..., 1:]; skewed router (drops)",
        weights="einsum",
        variant="unflattened_product",
    )


def _near(name, seed, note, **spelling) -> ZooCase:
    fn, args, _, _ = _maxtext_block(seed, **spelling)
    return ZooCase(name, fn, args, NEAR_MISS, {}, count=0, note=note)


def make_nm_capacity_maxtext_lt_count() -> ZooCase:
    """`count < C` on MaxText's inclusive count: keeps C - 1 choices per expert in C slots."""
    return _near(
        "nm_capacity_maxtext_lt_count",
        1150,
        "the inclusive count compared with `<` keeps only C-1 choices per expert: a kernel with C slots "
        "keeps one more",
        variant="lt_count",
    )


def make_nm_capacity_maxtext_unmasked_count_sum() -> ZooCase:
    """Positions summed over k without the mask: the other choice's count at this expert is added."""
    return _near(
        "nm_capacity_maxtext_unmasked_count_sum",
        1160,
        "position = sum over k of the counts (not masked by the choice's expert): at each expert the "
        "other choice's count is added in, so slots collide",
        variant="unmasked_count_sum",
    )


def make_nm_capacity_maxtext_slots_not_shifted() -> ZooCase:
    """one_hot(kept position + 1, C + 1) cut to its first C slots: the C-th kept choice falls off."""
    return _near(
        "nm_capacity_maxtext_slots_not_shifted",
        1170,
        "1-based slots cut as [..., :C] instead of [..., 1:]: slot 0 unused, each expert's C-th kept "
        "choice dropped from the combine",
        variant="slots_not_shifted",
    )


def make_nm_capacity_maxtext_repeated_ids_scatter() -> ZooCase:
    """ids from two argmaxes may repeat an expert: `.at[].set` keeps one of the two weights."""
    return _near(
        "nm_capacity_maxtext_repeated_ids_scatter",
        1180,
        "a token may pick one expert twice; the scatter keeps one weight where a kernel sums both",
        ids="two_argmax",
    )


def make_nm_capacity_maxtext_repeated_ids_einsum() -> ZooCase:
    """ids from two argmaxes may repeat an expert: sums over k then add two choices' positions."""
    return _near(
        "nm_capacity_maxtext_repeated_ids_einsum",
        1190,
        "a token may pick one expert twice; the sums over k add both choices' weights and positions",
        ids="two_argmax",
        weights="einsum",
    )


CAPACITY_BLOCKS_EXTRA = [make_capacity_maxtext_scattered_weights, make_capacity_maxtext_einsum_weights]
CAPACITY_NEAR_MISSES_EXTRA = [
    make_nm_capacity_maxtext_lt_count,
    make_nm_capacity_maxtext_unmasked_count_sum,
    make_nm_capacity_maxtext_slots_not_shifted,
    make_nm_capacity_maxtext_repeated_ids_scatter,
    make_nm_capacity_maxtext_repeated_ids_einsum,
]
