"""Token-choice top-k router (SPEC 2), torchtitan-compatible, with a precision-controlled gate.

Reading order: logits = gate(x) in the router dtype -> scores (softmax | sigmoid) in fp32 (fp64
for an fp64 router) -> selection on scores (+ expert_bias), optionally limited to the best expert
groups -> top scores gathered from the un-biased scores -> route_norm -> route_scale -> counts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from moeprec._validation import (
    check_bool,
    check_choice,
    check_floating,
    check_positive_int,
    check_real,
    check_tensor,
)
from moeprec.init import trunc_normal_
from moeprec.routing.balance import count_tokens_per_expert
from moeprec.routing.gate import RouterGateLinear

SCORE_FUNCS = ("softmax", "sigmoid")


class RouterOutput(NamedTuple):
    top_scores: torch.Tensor  # [T, k] fp32 (fp64 for an fp64 router), after norm and scale
    selected_experts: torch.Tensor  # [T, k] int64
    num_tokens_per_expert: torch.Tensor  # [E] int64
    scores: torch.Tensor  # [T, E] softmax | sigmoid of the logits, un-biased
    logits: torch.Tensor  # [T, E] in the router dtype (the model dtype when it is None)


def check_expert_groups(num_experts: int, top_k: int, groups: int | None, limited: int | None) -> None:
    if groups is None and limited is None:
        return
    if groups is None:
        raise ValueError(
            f"num_expert_groups: expected an int when num_limited_groups is set, got None "
            f"(num_limited_groups={limited})"
        )
    if limited is None:
        raise ValueError(
            f"num_limited_groups: expected an int when num_expert_groups is set, got None "
            f"(num_expert_groups={groups})"
        )
    check_positive_int("num_expert_groups", groups)
    check_positive_int("num_limited_groups", limited)
    if num_experts % groups:
        raise ValueError(
            f"num_expert_groups: expected a divisor of num_experts={num_experts}, got {groups}"
        )
    if limited > groups:
        raise ValueError(
            f"num_limited_groups: expected at most num_expert_groups={groups}, got {limited}"
        )
    if top_k > limited * (num_experts // groups):
        raise ValueError(
            f"top_k: expected at most num_limited_groups * experts per group = "
            f"{limited * (num_experts // groups)}, got {top_k}"
        )


def limit_to_top_groups(scores: torch.Tensor, num_groups: int, num_kept: int) -> torch.Tensor:
    """Selection scores with experts outside the `num_kept` best groups set to -inf.

    A group's score is the sum of its top-2 expert scores (its one score for groups of one).
    """
    t, e = scores.shape
    grouped = scores.view(t, num_groups, e // num_groups)
    group_scores = grouped.topk(min(2, e // num_groups), dim=-1).values.sum(dim=-1)
    kept = group_scores.topk(num_kept, dim=-1).indices  # [T, num_kept]
    keep = torch.zeros(t, num_groups, dtype=torch.bool, device=scores.device)
    keep.scatter_(1, kept, True)
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(t, e)


class TokenChoiceTopKRouter(nn.Module):
    """Each token picks its top_k experts; the gate GEMM runs in `router_dtype`."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        score_func: str = "softmax",
        route_norm: bool = False,
        route_scale: float = 1.0,
        router_dtype: Any = None,
        num_expert_groups: int | None = None,
        num_limited_groups: int | None = None,
        gate_bias: bool = False,
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_experts", num_experts)
        check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k: expected at most num_experts={num_experts}, got {top_k}")
        check_choice("score_func", score_func, SCORE_FUNCS)
        check_bool("route_norm", route_norm)
        check_real("route_scale", route_scale)
        check_bool("gate_bias", gate_bias)
        check_expert_groups(num_experts, top_k, num_expert_groups, num_limited_groups)
        self.dim = dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.score_func = score_func
        self.route_norm = route_norm
        self.route_scale = float(route_scale)
        self.num_expert_groups = num_expert_groups
        self.num_limited_groups = num_limited_groups
        self.gate = RouterGateLinear(dim, num_experts, bias=gate_bias, router_dtype=router_dtype)

    @property
    def router_dtype(self) -> torch.dtype | None:
        return self.gate.router_dtype

    def init_weights(self, init_std: float) -> None:
        trunc_normal_(self.gate.weight, std=init_std)  # in fp32: see moeprec.init
        if self.gate.bias is not None:
            nn.init.zeros_(self.gate.bias)

    def route(self, x: torch.Tensor, expert_bias: torch.Tensor | None = None) -> RouterOutput:
        """Route x [T, D]; see RouterOutput for what comes back."""
        check_floating("x", x)
        check_tensor("x", x, shape=(None, self.dim), device=self.gate.weight.device)
        if expert_bias is not None:
            check_floating("expert_bias", expert_bias)
            check_tensor("expert_bias", expert_bias, shape=(self.num_experts,), device=x.device)

        logits = self.gate(x)
        # Scores in fp32 at least: the softmax of bf16 logits would round them again.
        score_dtype = torch.float64 if self.router_dtype == torch.float64 else torch.float32
        if self.score_func == "softmax":
            scores = F.softmax(logits.to(score_dtype), dim=-1)
        else:
            scores = torch.sigmoid(logits.to(score_dtype))

        # The bias steers selection only; the weights the experts get stay the un-biased scores.
        choice = scores if expert_bias is None else scores + expert_bias.to(score_dtype)
        if self.num_expert_groups is not None:
            choice = limit_to_top_groups(choice, self.num_expert_groups, self.num_limited_groups)
        selected = torch.topk(choice, self.top_k, dim=-1).indices
        top_scores = scores.gather(-1, selected)

        if self.route_norm:
            top_scores = top_scores / (top_scores.sum(dim=-1, keepdim=True) + 1e-20)
        top_scores = top_scores * self.route_scale
        counts = count_tokens_per_expert(selected, self.num_experts)
        return RouterOutput(top_scores, selected, counts, scores, logits)

    def forward(
        self, x: torch.Tensor, expert_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(top_scores [T, k], selected_experts [T, k] int64, num_tokens_per_expert [E] int64)."""
        out = self.route(x, expert_bias)
        return out.top_scores, out.selected_experts, out.num_tokens_per_expert

    def extra_repr(self) -> str:
        groups = ""
        if self.num_expert_groups is not None:
            groups = f", groups={self.num_limited_groups}/{self.num_expert_groups}"
        return (
            f"top_k={self.top_k}, score_func={self.score_func}, route_norm={self.route_norm}, "
            f"route_scale={self.route_scale}{groups}"
        )
