"""The router's normal form: logits from anywhere, and near misses declined for what they mean.

The router zoo (test_router_zoo.py) checks that every spelling fuses exactly and every near miss
stays unfused; this file checks that a near miss is declined for the reason that makes it one
(not by accident of spelling), and that logits need no gate matmul in sight::

    plan = moefuse.plan(attention_topk, x, wq, wk)
    plan.declined[0].reason   # "... a product of two activations of the same tokens ..."
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import moefuse
from tests.zoo import near_misses, routers

# near miss -> what its decline must say (the meaning that makes it not a router)
NEAR_MISS_REASONS = {
    "nm_lm_topk_sampling": "looks like vocabulary sampling",
    "nm_top_p_sampling": "looks like vocabulary sampling",
    "nm_attention_topk_keys": "each batch element has its own candidates",
    "nm_attention_one_sequence": "product of two activations of the same tokens",
    "nm_token_similarity_topk": "product of two activations of the same tokens",
    "nm_knn_retrieval": "product of two activations",
    "nm_expert_choice": "expert-choice routing",
    "nm_softmax_over_tokens": "not the expert axis",
    "nm_strided_groups": "not by a choice of consecutive expert groups",
    "nm_strided_groups_per_group_layout": "not by a choice of consecutive expert groups",
    "nm_group_mask_per_expert_flags": "not by a choice of consecutive expert groups",
    "nm_group_mask_clip_floor": "not by a choice of consecutive expert groups",
    "nm_group_score_max_plus_min_masked": "group scores are not top-2 sums or maxima",
    "nm_group_score_sum_of_sorted_three": "group scores are not top-2 sums or maxima",
    "nm_topk_sorts_all_candidates": "a sort, not a choice of experts",
    "nm_topk_sorts_all_classes_then_gathers": "a sort, not a choice of experts",
    "nm_argsort_sigmoid": "a sort ranks NaNs and the two zeros unlike top_k",
    "nm_argsort_descending_logits": "ids are the same only for softmax scores",
    "nm_topk_sae": "without a softmax",
    "nm_topk_distill_loss": "distillation or sampling",
    "nm_shard_map_raw_topk": "nor where the body's caller computes it",
    "nm_shard_map_softmax_over_tokens": "nor where the body's caller computes it",
}


@pytest.mark.parametrize("name", sorted(NEAR_MISS_REASONS))
def test_near_miss_is_declined_for_its_meaning(name):
    case = getattr(near_misses, f"make_{name}")()
    plan = moefuse.plan(case.fn, *case.args)
    assert not plan.fused, str(plan)
    reasons = [d.reason for d in plan.declined if d.op == "route"]
    assert any(NEAR_MISS_REASONS[name] in r for r in reasons), reasons


NO_GATE_IN_SIGHT = [
    "f1_sharded_named_logits",
    "f1_shard_map_logits",
    "f1_temperature_logits",
    "f3_reduce_sum_logits",
]


@pytest.mark.parametrize("name", NO_GATE_IN_SIGHT)
def test_logits_need_no_gate_matmul(name):
    case = getattr(routers, f"make_{name}")()
    fused = [s for s in moefuse.plan(case.fn, *case.args).fused if s.op == "route"]
    assert len(fused) == 1 and fused[0].params["k"] == case.expect["k"]


def test_l1_renorm_is_a_renorm_only_of_nonnegative_weights():
    """w / norm(w, 1) is w / sum(w) for w >= 0 only: after a negative scale it stays outside the route."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tests.zoo import normal

    x, w = normal(400, (16, 32)), normal(401, (32, 8), scale=32**-0.5)

    def router(x, w):
        vals, ids = jax.lax.top_k(jax.nn.softmax(x @ w, axis=-1), 2)
        flipped = vals * -2.0
        return flipped / jnp.linalg.norm(flipped, ord=1, axis=-1, keepdims=True), ids

    (site,) = moefuse.plan(router, x, w).fused
    assert [tuple(s) for s in site.params["post"]] == [("scale", -2.0)]
    got, want = moefuse.jit(router)(x, w), jax.jit(router)(x, w)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-6)


@pytest.mark.parametrize("name", ["f1_shard_map_probs_as_given", "f1_remat_in_shard_map_sigmoid_as_given"])
def test_scores_made_outside_a_body_are_named_in_the_plan(name):
    """A top-k of scores the caller of a shard_map computed is routed as given, and the Plan says
    where the scores came from (the softmax / sigmoid line in this file)."""
    case = getattr(routers, f"make_{name}")()
    (site,) = [s for s in moefuse.plan(case.fn, *case.args).fused if s.op == "route"]
    kind = "softmax" if "probs" in name else "sigmoid"
    assert site.params["score"] == "none" and site.path.startswith("shard_map")
    (note,) = site.notes
    assert note.startswith(f"the scores are a {kind} (tests/zoo/routers.py:"), note


def _top_k_then_gathered(scores_of):
    import jax
    import jax.numpy as jnp
    from jax import lax

    def router(x, w):
        logits = x @ w
        _, ids = lax.top_k(logits, 2)
        return jnp.take_along_axis(scores_of(logits), ids, axis=-1), ids

    x = jnp.asarray(jax.random.normal(jax.random.key(0), (16, 32)))
    w = jnp.asarray(jax.random.normal(jax.random.key(1), (32, 8)))
    return router, (x, w)


def test_sigmoid_gathered_at_the_logits_own_top_k_is_the_sigmoid_of_the_top_k_values():
    import jax

    fn, args = _top_k_then_gathered(jax.nn.sigmoid)
    plan = moefuse.plan(fn, *args)
    (site,) = plan.fused
    assert (site.params["order"], site.params["score"]) == ("topk_then_score", "sigmoid"), str(plan)
    for got, want in zip(moefuse.jit(fn)(*args), jax.jit(fn)(*args)):
        assert (got == want).all()  # ids and weights bit for bit


def test_sigmoid_of_other_values_gathered_at_the_top_k_ids_is_not_a_router():
    import jax

    fn, args = _top_k_then_gathered(lambda logits: jax.nn.sigmoid(2.0 * logits))
    plan = moefuse.plan(fn, *args)
    assert plan.fused == [] and "no routing weights" in plan.declined[0].reason, str(plan)


GROUP_OF_TWO_SCORES = {
    "top_k": lambda g: lax.top_k(g, 2)[0].sum(-1),
    "sort_last_two": lambda g: jnp.sort(g, axis=-1)[..., -2:].sum(-1),  # no slice left: the whole axis
    "sort": lambda g: jnp.sort(g, axis=-1).sum(-1),
    "sum": lambda g: g.sum(-1),
    "columns": lambda g: g[..., 0] + g[..., 1],
}


@pytest.mark.parametrize("spelling", sorted(GROUP_OF_TWO_SCORES))
def test_a_group_of_two_experts_is_its_own_top_two(spelling):
    """Groups of two experts: their top-2 sum is the sum of both, sorted or not (v0 + v1 is exact in
    either order), so each spelling is the same group-limited router (Ling, E / n_group = 2)."""
    num_tokens, num_experts, n_group, topk_group, k = 16, 8, 4, 2, 2
    logits = jax.random.normal(jax.random.key(3), (num_tokens, num_experts))
    bias = jax.random.normal(jax.random.key(4), (num_experts,)) * 0.1

    def router(logits, bias):
        s = jax.nn.sigmoid(logits)
        biased = s + bias
        gscore = GROUP_OF_TWO_SCORES[spelling](biased.reshape(num_tokens, n_group, -1))
        gsel = lax.top_k(gscore, topk_group)[1]
        keep = jnp.repeat((gsel[:, :, None] == jnp.arange(n_group)).any(axis=1), num_experts // n_group, -1)
        ids = lax.top_k(jnp.where(keep, biased, -jnp.inf), k)[1]
        w = jnp.take_along_axis(s, ids, axis=-1)
        return w / (w.sum(-1, keepdims=True) + 1e-20) * 2.5, ids

    (site,) = moefuse.plan(router, logits, bias).fused
    assert site.params["group_score"] == "top2_sum"
    assert (site.params["n_group"], site.params["topk_group"]) == (n_group, topk_group)
    got, want = moefuse.jit(router, verify=True)(logits, bias), jax.jit(router)(logits, bias)
    np.testing.assert_array_equal(got[1], want[1])
