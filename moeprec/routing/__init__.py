"""Routing: the precision-controlled gate GEMM, the token-choice top-k router, load balancing."""

from moeprec.routing.balance import router_z_loss, switch_aux_loss, update_expert_bias
from moeprec.routing.gate import RouterGateLinear, RouterGatingLinearFunction, router_gating_linear
from moeprec.routing.topk_router import RouterOutput, TokenChoiceTopKRouter

__all__ = [
    "RouterGateLinear",
    "RouterGatingLinearFunction",
    "RouterOutput",
    "TokenChoiceTopKRouter",
    "router_gating_linear",
    "router_z_loss",
    "switch_aux_loss",
    "update_expert_bias",
]
