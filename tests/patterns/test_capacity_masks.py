"""Unit tests of the capacity mask interpreter (`patterns/capacity_masks.py`) on small spellings.

Each test interprets one value of a tiny program over [B, S] tokens whose k = 2 ids come from a top_k
of [B, S, E] logits, and checks what the interpreter says it holds at an assignment (or why it
declines).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from moefuse import idioms
from moefuse.patterns.capacity_masks import Ctx, Reject, interpret
from moefuse.rewrite import inline_jits
from moefuse.view import View
from tests.zoo import normal

B, S, E, K, C = 2, 4, 4, 2, 3
LOGITS = normal(5000, (B, S, E))


def _interpret(spelling):
    """(value, ctx) of spelling(logits), for ids = top_k(logits, K)[1] over tokens [B, S]."""
    closed = inline_jits(jax.make_jaxpr(spelling)(LOGITS))
    view = View(closed)
    ctx = Ctx(tok=(B, S), num_e=E)
    return interpret(view, closed.jaxpr.outvars[0], ctx), ctx


def _ids(logits):
    return jax.lax.top_k(logits, K)[1]


def _repeating_ids(logits):
    """[B, S, 2] ids that may name one expert twice (two argmaxes of different scores)."""
    second = jnp.argmax(logits * jnp.linspace(1.0, 0.5, E), axis=-1)
    return jnp.concatenate([jnp.argmax(logits, axis=-1)[..., None], second[..., None]], axis=-1)


def _flat_counts(ids):
    """(mask [B, S, K, E], flat mask [B, S*K, E], its cumsum over the flat axis)."""
    mask = jax.nn.one_hot(ids, E, dtype=jnp.int32)
    flat = mask.reshape(B, S * K, E)
    return mask, flat, jnp.cumsum(flat, axis=1)


def test_position_counted_on_the_flattened_mask_is_token_major():
    def spelling(logits):
        _, flat, count = _flat_counts(_ids(logits))
        return (flat * count).reshape(B, S, K, E)  # the product taken in the flat layout

    v, ctx = _interpret(spelling)
    assert (v.labels, v.on, v.off) == (("t0", "t1", "K", "E"), ("p", 1.0), ("c", 0.0))
    assert ctx.orders == {"token_major"}


def test_reshape_other_than_flattening_tokens_and_k_declines():
    def spelling(logits):
        _, _, count = _flat_counts(_ids(logits))
        return count.reshape(B, K, S, E)  # splits the flat axis k-major: not the order it was counted in

    with pytest.raises(Reject, match="reshaped other than by flattening"):
        _interpret(spelling)


def test_weights_scattered_to_experts_are_weights_times_masks_summed_over_k():
    def spelling(logits):
        w, ids = jax.lax.top_k(logits, K)
        return jnp.zeros((B, S, E)).at[jnp.arange(B)[:, None, None], jnp.arange(S)[:, None], ids].set(w)

    v, _ = _interpret(spelling)
    assert (v.labels, v.on, v.off, v.ksum) == (("t0", "t1", "E"), ("c", 1.0), ("c", 0.0), True)
    ((_, w_labels),) = v.weights
    assert w_labels == ("t0", "t1", "K")


def test_weights_scattered_by_ids_that_may_repeat_decline():
    def spelling(logits):
        ids = _repeating_ids(logits)
        w = jnp.take_along_axis(logits, ids, axis=-1)
        return jnp.zeros((B, S, E)).at[jnp.arange(B)[:, None, None], jnp.arange(S)[:, None], ids].set(w)

    with pytest.raises(Reject, match="may repeat an expert"):
        _interpret(spelling)


def _kept_position_plus_one(ids):
    """MaxText's sum over k of the masked inclusive count, times the keep bit: p + 1 if kept, else 0."""
    mask, flat, count = _flat_counts(ids)
    keep = jnp.sum(mask * (count.reshape(B, S, K, E) <= C), axis=2)
    return jnp.sum((flat * count).reshape(B, S, K, E), axis=2) * keep


def test_one_hot_of_position_plus_one_cut_by_one_slot_is_the_slot_indicator():
    v, ctx = _interpret(lambda logits: jax.nn.one_hot(_kept_position_plus_one(_ids(logits)), C + 1)[..., 1:])
    assert (v.labels, v.on, v.off, v.ksum) == (("t0", "t1", "E", "C"), ("d",), ("c", 0.0), True)
    assert (ctx.cdims, ctx.caps) == ({C}, {C})
    assert all(not 0 <= z < C for z in ctx.outside)  # elsewhere (0, one below slot 0) is cut off


def test_one_hot_of_position_plus_one_keeps_its_shift_until_cut():
    v, ctx = _interpret(lambda logits: jax.nn.one_hot(_kept_position_plus_one(_ids(logits)), C + 1))
    assert v.labels[-1] == ("C", 1) and ctx.cdims == set()


def test_one_hot_of_position_plus_one_cut_at_the_end_declines():
    with pytest.raises(Reject, match="a slice of mask values"):
        _interpret(lambda logits: jax.nn.one_hot(_kept_position_plus_one(_ids(logits)), C + 1)[..., :C])


def test_sum_over_k_of_values_nonzero_at_other_experts_declines():
    def spelling(logits):
        _, _, count = _flat_counts(_ids(logits))
        return jnp.sum(count.reshape(B, S, K, E), axis=2)  # adds the other choice's count at each expert

    with pytest.raises(Reject, match="not 0 at the choices' other experts"):
        _interpret(spelling)


@pytest.mark.parametrize("contract", ["reduce_sum", "einsum"])
def test_sum_over_k_of_ids_that_may_repeat_declines(contract):
    def spelling(logits):
        mask = jax.nn.one_hot(_repeating_ids(logits), E)
        if contract == "einsum":
            return jnp.einsum("bsk,bske->bse", jax.nn.softmax(logits[..., :K]), mask)
        return mask.sum(axis=2)

    with pytest.raises(Reject, match="may repeat an expert within a token"):
        _interpret(spelling)


def test_distinct_along_last_holds_for_top_k_ids_only():
    def both(logits):
        return _ids(logits), _repeating_ids(logits)

    closed = inline_jits(jax.make_jaxpr(both)(LOGITS))
    view = View(closed)
    top_k_ids, stacked = closed.jaxpr.outvars
    assert idioms.distinct_along_last(view, top_k_ids)
    assert not idioms.distinct_along_last(view, stacked)
