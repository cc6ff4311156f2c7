"""MoEArgs: the dataclass a model hands to `moeprec.MoE` (SPEC 4), and its reader of HF configs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from moeprec._validation import check_bool, check_choice, check_positive_int, check_real
from moeprec.activations import ACTIVATIONS, GATE_MODES, SWIGLU_ALPHA, SWIGLU_LIMIT
from moeprec.precision import parse_router_dtype
from moeprec.routing.topk_router import SCORE_FUNCS, check_expert_groups

# DeepSeek-V3's bias update speed (gamma in the paper) for its aux-loss-free expert bias.
DEEPSEEK_V3_BIAS_UPDATE = 1e-3

HF_FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3")

_MISSING = object()


@dataclass
class MoEArgs:
    """Routing, balancing and expert-MLP settings of one MoE layer (dims are passed to MoE).

    router_dtype accepts what `parse_router_dtype` accepts and is stored as a torch dtype or None.
    gate_bias (beyond SPEC 4's list, default off): a bias in the router's gate, as gpt-oss has.
    """

    num_experts: int = 8
    num_shared_experts: int = 0
    top_k: int = 1
    score_func: str = "softmax"
    route_norm: bool = False
    route_scale: float = 1.0
    score_before_experts: bool = False
    num_expert_groups: int | None = None
    num_limited_groups: int | None = None
    load_balance_coeff: float | None = None
    aux_loss_coeff: float = 0.0
    z_loss_coeff: float = 0.0
    router_dtype: torch.dtype | None = None
    activation: str = "silu"
    gate_mode: str = "separated"
    swiglu_alpha: float = SWIGLU_ALPHA
    swiglu_limit: float = SWIGLU_LIMIT
    mlp_bias: bool = False
    gate_bias: bool = False

    def __post_init__(self) -> None:
        self.router_dtype = parse_router_dtype(self.router_dtype)
        check_positive_int("num_experts", self.num_experts)
        check_positive_int("num_shared_experts", self.num_shared_experts, allow_zero=True)
        check_positive_int("top_k", self.top_k)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: expected at most num_experts={self.num_experts}, got {self.top_k}")
        check_choice("score_func", self.score_func, SCORE_FUNCS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("gate_mode", self.gate_mode, GATE_MODES)
        check_expert_groups(
            self.num_experts, self.top_k, self.num_expert_groups, self.num_limited_groups
        )
        for name in ("route_norm", "score_before_experts", "mlp_bias", "gate_bias"):
            check_bool(name, getattr(self, name))
        check_real("route_scale", self.route_scale)
        check_real("swiglu_alpha", self.swiglu_alpha)
        check_real("swiglu_limit", self.swiglu_limit, positive=True)
        # loss weights and the bias-update speed: a negative one would push away from balance
        for name in ("aux_loss_coeff", "z_loss_coeff"):
            check_real(name, getattr(self, name), non_negative=True)
        if self.load_balance_coeff is not None:
            check_real("load_balance_coeff", self.load_balance_coeff, non_negative=True)

    @classmethod
    def from_hf_config(cls, cfg: Any, router_dtype: Any = None) -> MoEArgs:
        """Read a Qwen3-MoE, Mixtral, gpt-oss or DeepSeek-V3 config (transformers object or dict).

        Dims are not part of MoEArgs: get them with `hf_moe_dims(cfg)`. Only the MoE block is
        read (which layers are MoE layers is the model's business). HF's DeepSeek-V3 gate runs
        in fp32: pass router_dtype="fp32" to match it.
        """
        family = hf_family(cfg)
        num_experts = _get(cfg, "n_routed_experts", "num_experts", "num_local_experts")
        top_k = _get(cfg, "num_experts_per_tok")
        # transformers applies the switch aux loss only when it outputs router logits.
        aux = float(_get(cfg, "router_aux_loss_coef", default=0.0) or 0.0)
        if not _get(cfg, "output_router_logits", default=False):
            aux = 0.0
        common = dict(num_experts=int(num_experts), top_k=int(top_k), router_dtype=router_dtype)
        if family == "qwen3_moe":
            return cls(
                **common,
                score_func="softmax",
                route_norm=bool(_get(cfg, "norm_topk_prob", default=False)),
                aux_loss_coeff=aux,
            )
        if family == "mixtral":
            # Mixtral renormalizes its top-k softmax weights (= softmax over the chosen logits).
            return cls(**common, score_func="softmax", route_norm=True, aux_loss_coeff=aux)
        if family == "gpt_oss":
            # gpt-oss: softmax over the top-k logits (= softmax + route_norm), a biased gate,
            # biased expert MLPs with interleaved gate/up rows and the clamped SwiGLU.
            return cls(
                **common,
                score_func="softmax",
                route_norm=True,
                aux_loss_coeff=aux,
                activation="swiglu_oai",
                gate_mode="interleaved",
                swiglu_alpha=float(_get(cfg, "swiglu_alpha", default=SWIGLU_ALPHA)),
                swiglu_limit=float(_get(cfg, "swiglu_limit", default=SWIGLU_LIMIT)),
                mlp_bias=True,
                gate_bias=True,
            )
        # deepseek_v3: sigmoid scores, aux-loss-free bias (e_score_correction_bias),
        # node-limited routing over expert groups, scaled weights, shared experts.
        n_group = _get(cfg, "n_group", default=None)
        topk_group = _get(cfg, "topk_group", default=None)
        if n_group is None or int(n_group) <= 1:
            n_group = topk_group = None
        return cls(
            **common,
            num_shared_experts=int(_get(cfg, "n_shared_experts", default=0) or 0),
            score_func=_get(cfg, "scoring_func", default="sigmoid"),
            route_norm=bool(_get(cfg, "norm_topk_prob", default=True)),
            route_scale=float(_get(cfg, "routed_scaling_factor", default=1.0)),
            num_expert_groups=None if n_group is None else int(n_group),
            num_limited_groups=None if topk_group is None else int(topk_group),
            load_balance_coeff=DEEPSEEK_V3_BIAS_UPDATE,
        )


def _get(cfg: Any, *names: str, default: Any = _MISSING) -> Any:
    """The first of `names` that `cfg` (a dict or a config object) holds."""
    for name in names:
        if isinstance(cfg, Mapping):
            if name in cfg and cfg[name] is not None:
                return cfg[name]
        else:
            value = getattr(cfg, name, None)
            if value is not None:
                return value
    if default is _MISSING:
        raise ValueError(f"cfg: expected a config with field {' or '.join(names)}, found none")
    return default


def _has(cfg: Any, name: str) -> bool:
    return _get(cfg, name, default=None) is not None


def hf_family(cfg: Any) -> str:
    """One of HF_FAMILIES: the config's `model_type`, or when it has none, what its fields imply."""
    if not isinstance(cfg, Mapping) and not hasattr(cfg, "to_dict"):
        raise TypeError(
            f"cfg: expected a transformers config or a dict, got {type(cfg).__name__}"
        )
    model_type = _get(cfg, "model_type", default=None) or None
    if model_type in HF_FAMILIES:
        return model_type
    if model_type is not None:
        # A family we do not know may route differently under the same field names
        # (DeepSeek-V2 scores groups by their max): refuse rather than guess.
        raise ValueError(f"cfg: expected model_type in {HF_FAMILIES} (or none), got {model_type!r}")
    if _has(cfg, "n_routed_experts"):
        return "deepseek_v3"
    if _has(cfg, "swiglu_limit"):
        return "gpt_oss"
    if _has(cfg, "moe_intermediate_size") or _has(cfg, "num_experts"):
        return "qwen3_moe"
    if _has(cfg, "num_local_experts"):
        return "mixtral"
    raise ValueError(
        f"cfg: expected a config of one of {HF_FAMILIES} (by model_type or its expert fields), "
        f"got model_type={model_type!r}"
    )


def hf_moe_dims(cfg: Any) -> tuple[int, int]:
    """(dim, moe hidden size) of an HF MoE config: hidden_size and the per-expert MLP width."""
    hf_family(cfg)
    dim = int(_get(cfg, "hidden_size"))
    hidden = int(_get(cfg, "moe_intermediate_size", "intermediate_size"))
    return dim, hidden
