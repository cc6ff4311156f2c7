"""Hugging Face transformers MoE blocks -> moeprec.MoE (same outputs, weights copied).

Supported blocks (transformers 5 layouts, and the per-expert module lists of transformers 4):

| family      | HF block                 | router            | experts (HF -> moeprec)                        |
|-------------|--------------------------|-------------------|------------------------------------------------|
| qwen3_moe   | Qwen3MoeSparseMoeBlock   | `gate.weight`     | gate_up_proj [E, 2I, H] -> w1 (gate rows first) |
| mixtral     | MixtralSparseMoeBlock    | `gate.weight`     | same as Qwen3-MoE (4.x: w1=gate, w3=up, w2)     |
| gpt_oss     | GptOssMLP                | `router.{weight,bias}` | gate_up_proj [E, H, 2I] -> w1 = transpose, interleaved rows; down_proj [E, I, H] -> w2 = transpose; biases |
| deepseek_v3 | DeepseekV3MoE            | `gate.weight`, `gate.e_score_correction_bias` -> expert_bias | as Qwen3-MoE, plus shared_experts MLP |

Routing maps onto MoEArgs (see `MoEArgs.from_hf_config`): Qwen3 `norm_topk_prob` is route_norm;
Mixtral's softmax-then-renormalize and gpt-oss's softmax over the top-k logits both equal a
softmax over all experts followed by route_norm. HF's DeepSeek-V3 gate is fp32: build with
`router_dtype="fp32"` for bf16 models.

    from moeprec.integrations.transformers import moe_from_hf
    moe = moe_from_hf(model.model.layers[i].mlp, model.config)   # same dtype/device as the block

gpt-oss's MXFP4 checkpoint tensors (`*_blocks`, `*_scales`) are read by
`moeprec.integrations.gpt_oss`; this module takes a dense (dequantized) block.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from moeprec.args import MoEArgs, hf_family, hf_moe_dims
from moeprec.moe import MoE
from moeprec.precision import PrecisionConfig

__all__ = ["moe_args_from_hf", "moe_from_hf", "load_hf_moe_block", "convert_hf_moe_state_dict", "hf_block_family"]

_FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3")
# transformers 4 per-expert names of (gate, up, down) projections
_LEGACY_EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def moe_args_from_hf(config: Any, router_dtype: Any = None) -> tuple[MoEArgs, int, int]:
    """(MoEArgs, dim, hidden_dim) of an HF MoE config (a transformers config or a dict)."""
    dim, hidden = hf_moe_dims(config)
    return MoEArgs.from_hf_config(config, router_dtype=router_dtype), dim, hidden


def hf_block_family(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The family of an HF MoE block, from the names of its tensors."""
    if "router.weight" in state_dict:
        return "gpt_oss"
    if "gate.e_score_correction_bias" in state_dict:
        return "deepseek_v3"
    if "gate.weight" in state_dict:
        return "qwen3_moe"  # Mixtral's tensors are named and laid out alike
    raise ValueError(
        "hf_block: expected a Qwen3-MoE, Mixtral, gpt-oss or DeepSeek-V3 MoE block (tensors "
        f"'gate.weight' or 'router.weight'), got tensors {sorted(state_dict)[:8]}"
    )


def _stack_legacy_experts(sd: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """transformers 4 `experts.{i}.<proj>.weight` module lists -> (gate_up [E, 2I, H], down [E, H, I])."""
    for gate, up, down in _LEGACY_EXPERT_NAMES:
        ids = sorted(
            int(m.group(1)) for k in sd if (m := re.fullmatch(rf"experts\.(\d+)\.{gate}\.weight", k))
        )
        if ids:
            if ids != list(range(len(ids))):
                raise ValueError(f"hf_block: expected experts numbered 0..E-1, got {ids}")
            w1 = torch.stack([torch.cat([sd[f"experts.{i}.{gate}.weight"], sd[f"experts.{i}.{up}.weight"]]) for i in ids])
            w2 = torch.stack([sd[f"experts.{i}.{down}.weight"] for i in ids])
            return w1, w2
    return None


class _Tensors(dict):
    """A block's state dict whose missing keys are a ValueError naming the tensor (not KeyError)."""

    def __missing__(self, key: str) -> torch.Tensor:
        raise ValueError(
            f"hf_block: expected a tensor {key!r} in the block's state dict, got tensors "
            f"{sorted(self)[:8]}"
        )


def convert_hf_moe_state_dict(state_dict: Mapping[str, torch.Tensor], family: str | None = None) -> dict[str, torch.Tensor]:
    """An HF MoE block's state dict (keys relative to the block) -> moeprec.MoE's keys and layouts."""
    sd = _Tensors(state_dict)
    family = hf_block_family(sd) if family is None else family
    if family not in _FAMILIES:
        raise ValueError(f"family: expected one of {_FAMILIES}, got {family!r}")
    out: dict[str, torch.Tensor] = {}
    if family == "gpt_oss":
        # [E, H, 2I] and [E, I, H]: inputs first (x @ W); moeprec keeps outputs first (x @ W^T).
        out["router.gate.weight"] = sd["router.weight"]
        out["router.gate.bias"] = sd["router.bias"]
        out["experts.w1"] = sd["experts.gate_up_proj"].transpose(1, 2).contiguous()
        out["experts.w2"] = sd["experts.down_proj"].transpose(1, 2).contiguous()
        out["experts.b1"] = sd["experts.gate_up_proj_bias"]
        out["experts.b2"] = sd["experts.down_proj_bias"]
        return out

    out["router.gate.weight"] = sd["gate.weight"]
    legacy = _stack_legacy_experts(sd)
    if legacy is not None:
        out["experts.w1"], out["experts.w2"] = legacy
    else:  # [E, 2I, H] with gate rows first, [E, H, I]: already moeprec's layout
        out["experts.w1"] = sd["experts.gate_up_proj"]
        out["experts.w2"] = sd["experts.down_proj"]
    if family == "deepseek_v3":
        out["expert_bias"] = sd["gate.e_score_correction_bias"].float()
        if "shared_experts.gate_proj.weight" in sd:
            gate_up = torch.cat([sd["shared_experts.gate_proj.weight"], sd["shared_experts.up_proj.weight"]])
            out["shared_experts.w1"] = gate_up.unsqueeze(0)
            out["shared_experts.w2"] = sd["shared_experts.down_proj.weight"].unsqueeze(0)
    return out


@torch.no_grad()
def load_hf_moe_block(moe: MoE, hf_block: nn.Module, family: str | None = None) -> MoE:
    """Copy an HF MoE block's weights into `moe` (in place; shapes must agree). Returns `moe`."""
    if not isinstance(moe, MoE):
        raise TypeError(f"moe: expected a moeprec.MoE, got {type(moe).__name__}")
    if not isinstance(hf_block, nn.Module):
        raise TypeError(f"hf_block: expected a torch.nn.Module, got {type(hf_block).__name__}")
    converted = convert_hf_moe_state_dict(hf_block.state_dict(), family)
    own = moe.state_dict()
    missing = sorted(set(own) - set(converted))
    unexpected = sorted(set(converted) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"hf_block: its tensors do not fit this MoE (missing {missing}, unexpected {unexpected}); "
            "build the MoE with moe_args_from_hf(config)"
        )
    for name, t in converted.items():
        if own[name].shape != t.shape:
            raise ValueError(
                f"hf_block: tensor for {name!r} has shape {tuple(t.shape)}, the MoE expects "
                f"{tuple(own[name].shape)}"
            )
    moe.load_state_dict(converted)
    return moe


def moe_from_hf(
    hf_block: nn.Module,
    config: Any,
    precision: PrecisionConfig | None = None,
    router_dtype: Any = None,
) -> MoE:
    """A moeprec.MoE computing what `hf_block` computes, on its device and in its dtype."""
    if not isinstance(hf_block, nn.Module):
        raise TypeError(f"hf_block: expected a torch.nn.Module, got {type(hf_block).__name__}")
    ref = next(hf_block.parameters(), None)
    if ref is None:
        raise ValueError(f"hf_block: expected an MoE block with parameters, got a {type(hf_block).__name__} with none")
    args, dim, hidden = moe_args_from_hf(config, router_dtype=router_dtype)
    moe = MoE(args, dim, hidden, precision=precision).to(device=ref.device, dtype=ref.dtype)
    return load_hf_moe_block(moe, hf_block, family=hf_family(config))
