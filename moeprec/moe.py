"""MoE: the Mixture-of-Experts layer (SPEC 4), torchtitan-shaped.

forward reads top to bottom: router -> reorder -> experts -> combine (+ shared experts).

Precision: the router's gate GEMM runs in `args.router_dtype` (a PrecisionConfig given to MoE
overrides it); scores and the combine are fp32; the experts compute in their parameters' dtype.
After `quantize_("mxfp4" | "fp8")` the routed experts run through `moeprec.fused_moe` with the
PrecisionConfig's activation-dtype policy (inference).

Host syncs: none in this module's GPU forward (argsort, gathers, grouped GEMM offsets and the
combine stay on device). Shapes never depend on routing, so `torch.compile(fullgraph=True)`
does not recompile when per-expert counts change.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from moeprec._validation import check_choice, check_floating
from moeprec.args import MoEArgs
from moeprec.experts import GroupedExperts
from moeprec.precision import PrecisionConfig
from moeprec.reorder import combine_expert_outputs, gather_tokens, reorder_tokens
from moeprec.routing.balance import router_z_loss, switch_aux_loss, update_expert_bias
from moeprec.routing.topk_router import RouterOutput, TokenChoiceTopKRouter

__all__ = ["MoE"]


class MoE(nn.Module):
    """Token-choice top-k MoE layer: `x [..., dim] -> [..., dim]`.

    Attributes: `router`, `experts` (GroupedExperts), `shared_experts` (a one-expert
    GroupedExperts of width `hidden_dim * num_shared_experts`, or None), buffers `expert_bias`
    (fp32 [E], when `args.load_balance_coeff` is set, else None) and `tokens_per_expert` (fp32 [E],
    the T*k assignments counted in training mode), `aux_loss` (the weighted switch + z losses of
    the last training forward, or None).
    """

    def __init__(
        self, args: MoEArgs, dim: int, hidden_dim: int, precision: PrecisionConfig | None = None
    ) -> None:
        super().__init__()
        if not isinstance(args, MoEArgs):
            raise TypeError(f"args: expected a MoEArgs, got {type(args).__name__}")
        if precision is not None and not isinstance(precision, PrecisionConfig):
            raise TypeError(f"precision: expected a PrecisionConfig or None, got {type(precision).__name__}")
        self.args = args
        self.precision = precision
        self.dim = dim
        self.hidden_dim = hidden_dim
        router_dtype = args.router_dtype if precision is None else precision.router_dtype
        self.router = TokenChoiceTopKRouter(
            dim,
            args.num_experts,
            args.top_k,
            score_func=args.score_func,
            route_norm=args.route_norm,
            route_scale=args.route_scale,
            router_dtype=router_dtype,
            num_expert_groups=args.num_expert_groups,
            num_limited_groups=args.num_limited_groups,
            gate_bias=args.gate_bias,
        )
        mlp = dict(
            activation=args.activation,
            gate_mode=args.gate_mode,
            bias=args.mlp_bias,
            swiglu_alpha=args.swiglu_alpha,
            swiglu_limit=args.swiglu_limit,
        )
        self.experts = GroupedExperts(dim, hidden_dim, args.num_experts, **mlp)
        self.shared_experts = (
            GroupedExperts(dim, hidden_dim * args.num_shared_experts, 1, **mlp)
            if args.num_shared_experts > 0
            else None
        )
        if args.load_balance_coeff is not None:
            self.register_buffer("expert_bias", torch.zeros(args.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None
        # Not persistent: it holds the counts since the last `update_expert_bias` (one step).
        self.register_buffer(
            "tokens_per_expert", torch.zeros(args.num_experts, dtype=torch.float32), persistent=False
        )
        self.aux_loss: torch.Tensor | None = None

    # Balancing state stays fp32 whatever `.to(dtype)` / `.bfloat16()` does to the model: the
    # bias update needs fp32 resolution and counts above 256 are not exact in bf16.
    _FP32_BUFFERS = ("expert_bias", "tokens_per_expert")

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in self._FP32_BUFFERS:
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    def __deepcopy__(self, memo):
        # `aux_loss` is a non-leaf tensor of the last forward's graph, which deepcopy refuses;
        # a copy (EMA model, checkpoint) starts without one, as after construction.
        aux_loss, self.aux_loss = self.aux_loss, None
        try:
            cls = type(self)
            clone = cls.__new__(cls)
            memo[id(self)] = clone
            clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        finally:
            self.aux_loss = aux_loss
        return clone

    @property
    def quant(self) -> str:
        """"none" (trainable GroupedExperts) or the expert weights' format after quantize_."""
        return self.experts.quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_floating("x", x)
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape [..., {self.dim}] (dim), got {tuple(x.shape)}")
        tokens = x.reshape(-1, self.dim)

        routed = self.router.route(tokens, self.expert_bias)
        if self.training:
            self._record_routing(routed)
        else:
            self.aux_loss = None
        if self.quant == "none":
            out = self._routed_experts(tokens, routed)
        else:
            out = self._routed_experts_quantized(tokens, routed)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens).to(out.dtype)
        return out.to(x.dtype).view(x.shape)

    def _routed_experts(self, tokens: torch.Tensor, routed: RouterOutput) -> torch.Tensor:
        """reorder -> grouped experts -> combine (fp32 [T, D])."""
        score_before = self.args.score_before_experts
        reordered = reorder_tokens(routed.top_scores, routed.selected_experts)
        expert_in = gather_tokens(tokens, reordered)
        if score_before:
            scaled = expert_in.to(reordered.scores.dtype) * reordered.scores.unsqueeze(-1)
            expert_in = scaled.to(tokens.dtype)
        # the router's counts cover all T*k rows: no uncounted rows to zero
        expert_out = self.experts(expert_in, routed.num_tokens_per_expert, zero_uncounted_rows=False)
        return combine_expert_outputs(expert_out, reordered, routed.top_scores, score_before)

    def _routed_experts_quantized(self, tokens: torch.Tensor, routed: RouterOutput) -> torch.Tensor:
        from moeprec.fused_moe_op import fused_moe

        e = self.experts
        return fused_moe(
            tokens,
            e.w1,
            e.w2,
            routed.top_scores.float(),
            routed.selected_experts,
            activation=e.activation,
            gate_mode=e.gate_mode,
            swiglu_alpha=e.swiglu_alpha,
            swiglu_limit=e.swiglu_limit,
            quant=e.quant,
            w1_scale=e.w1_scale,
            w2_scale=e.w2_scale,
            bias1=e.b1,
            bias2=e.b2,
            apply_router_weight_on_input=self.args.score_before_experts,
            precision=self.precision,
            check_topk_ids=False,  # the router's own ids: always in range, and no host sync
        )

    def _record_routing(self, routed: RouterOutput) -> None:
        """Training bookkeeping: per-expert counts for the bias update, and the aux losses."""
        with torch.no_grad():
            self.tokens_per_expert.add_(routed.num_tokens_per_expert.to(self.tokens_per_expert.dtype))
        a = self.args
        loss = None
        if a.aux_loss_coeff > 0:
            loss = a.aux_loss_coeff * switch_aux_loss(
                routed.scores, routed.selected_experts, a.num_experts, a.top_k
            )
        if a.z_loss_coeff > 0:
            z = a.z_loss_coeff * router_z_loss(routed.logits)
            loss = z if loss is None else loss + z
        self.aux_loss = loss

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """After the optimizer step: move `expert_bias` toward balance, reset the counts."""
        if self.expert_bias is not None:
            update_expert_bias(self.expert_bias, self.tokens_per_expert, self.args.load_balance_coeff)
        self.tokens_per_expert.zero_()

    @torch.no_grad()
    def quantize_(self, quant: str, scale_mode: str = "rceil") -> MoE:
        """Quantize the routed experts' weights ("mxfp4" | "fp8"); forward then uses fused_moe.

        Inference only (the quantized weights are buffers). Router and shared experts keep their
        dtype.
        """
        check_choice("quant", quant, ("mxfp4", "fp8"))
        self.experts.quantize_(quant, scale_mode)
        return self

    def init_weights(self, init_std: float = 0.02) -> None:
        self.router.init_weights(init_std)
        self.experts.init_weights(init_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(init_std)
        with torch.no_grad():
            if self.expert_bias is not None:
                self.expert_bias.zero_()
            self.tokens_per_expert.zero_()

    def extra_repr(self) -> str:
        rd = self.router.router_dtype
        return f"dim={self.dim}, hidden_dim={self.hidden_dim}, router_dtype={rd}, quant={self.quant!r}"
