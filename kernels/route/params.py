"""Bound parameters of the fused `route` op (hashable, so they can be static arguments).

Example, the Ling-2.6 router (256 experts, top-8, 8 groups keep 4, sigmoid, x2.5)::

    RouteParams(num_experts=256, k=8, score="sigmoid", selection_bias=True,
                n_group=8, topk_group=4, group_score="top2_sum", group_fill=0.0,
                weights_from="scores", post=(("renorm", 1e-20), ("scale", 2.5)))
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Score = Literal["softmax", "sigmoid", "none"]
Order = Literal["score_then_topk", "topk_then_score"]
GroupScore = Literal["top2_sum", "max"]
WeightsFrom = Literal["selection", "scores"]
# Post-processing steps applied to the k weights, in order:
#   ("renorm", eps)     w = w / (sum(w, -1) + eps)        (eps 0.0: plain w / sum(w))
#   ("renorm_max", eps) w = w / max(sum(w, -1), eps)      (a sum clamped away from zero)
#   ("scale", factor)   w = w * factor
#   ("expert_scale",)   w = w * expert_scale[ids]        (expert_scale is an input [E])
PostStep = tuple


@dataclasses.dataclass(frozen=True)
class RouteParams:
    """Everything that determines the result of one router.

    Semantics (see `reference.route_reference`), for logits L of shape [..., E]:
      order == "score_then_topk":
        s = score(L) over the last axis (softmax / sigmoid / identity), in L's dtype
        sel = s + bias            if selection_bias (bias [E] used for selection only)
        group-limited when n_group > 1: groups are E // n_group consecutive experts;
          group score = sum of top-2 of sel in the group ("top2_sum") or max ("max");
          the topk_group best groups are kept (top_k over group scores, ties to lower index);
          sel of experts in other groups is replaced by group_fill
        _, ids = top_k(sel, k)     (ties to the lower index, as lax.top_k)
        w = top_k values of sel if weights_from == "selection" else s gathered at ids
      order == "topk_then_score":   (score "softmax" or "sigmoid")
        v, ids = top_k(L, k);  w = softmax(v) over the k axis, or sigmoid(v) (elementwise, so equal to
        sigmoid(L) gathered at ids: Llama4)
      then each step in `post`, in order; outputs (w, ids int32[..., k]) and, when
      expose_scores, s as a third output.
    """

    num_experts: int
    k: int
    score: Score = "softmax"
    order: Order = "score_then_topk"
    selection_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    group_score: GroupScore = "top2_sum"
    group_fill: float = float("-inf")
    weights_from: WeightsFrom = "selection"
    post: tuple[PostStep, ...] = ()
    expose_scores: bool = False

    def __post_init__(self) -> None:
        if self.k < 1 or self.k > self.num_experts:
            raise ValueError(f"k={self.k} must be in [1, num_experts={self.num_experts}]")
        if self.order == "topk_then_score" and self.score not in ("softmax", "sigmoid"):
            raise ValueError("order='topk_then_score' needs score='softmax' or 'sigmoid'")
        if self.n_group > 1:
            if self.num_experts % self.n_group:
                raise ValueError(f"num_experts={self.num_experts} not divisible by n_group={self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        for step in self.post:
            if step[0] not in ("renorm", "renorm_max", "scale", "expert_scale"):
                raise ValueError(f"unknown post step {step!r}")

    @property
    def uses_expert_scale(self) -> bool:
        return any(step[0] == "expert_scale" for step in self.post)

    def describe(self) -> dict:
        """The parameters as plain data, for Plan.params."""
        d = dataclasses.asdict(self)
        d["post"] = [list(s) for s in self.post]
        if self.n_group == 1:  # no groups: how groups would be scored and filled does not matter
            del d["group_score"], d["group_fill"]
        return d

    @classmethod
    def from_plan(cls, described: dict) -> RouteParams:
        """The RouteParams that `describe` turned into `described` (e.g. a selection Request's params)."""
        d = dict(described)
        d["post"] = tuple(tuple(step) for step in d.get("post", ()))
        return cls(**d)
