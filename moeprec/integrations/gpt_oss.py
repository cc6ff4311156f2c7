"""gpt-oss checkpoints <-> moeprec's MXFP4 expert layout.

gpt-oss stores each MoE layer's experts as (safetensors names, per layer i):
  model.layers.{i}.mlp.experts.gate_up_proj_blocks  uint8 [E, 2I, H/32, 16]
  model.layers.{i}.mlp.experts.gate_up_proj_scales  uint8 [E, 2I, H/32]   (E8M0)
  model.layers.{i}.mlp.experts.gate_up_proj_bias    [E, 2I]               (bf16)
  model.layers.{i}.mlp.experts.down_proj_blocks     uint8 [E, H, I/32, 16]
  model.layers.{i}.mlp.experts.down_proj_scales     uint8 [E, H, I/32]
  model.layers.{i}.mlp.experts.down_proj_bias       [E, H]
Rows are output features; the gate/up rows are interleaved [g0, u0, g1, u1, ...]; within a
byte the even element sits in the low nibble. That is moeprec's layout with the 16 bytes of each
32-block split into their own dim, so converting is a reshape (plus an optional gate/up row
reorder): w1 [E, 2I, H/2] + w1_scale [E, 2I, H/32], w2 [E, H, I/2] + w2_scale [E, H, I/32],
bias1 [E, 2I] and bias2 [E, H] in fp32.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from moeprec._validation import check_choice, check_positive_int, check_tensor
from moeprec.activations import GATE_MODES, convert_gate_up_order
from moeprec.formats.layout import check_expert_weights
from moeprec.formats.mxfp4 import MX_BLOCK, check_mxfp4_pair

GPT_OSS_GATE_MODE = "interleaved"
_PREFIX = "model.layers.{layer}.mlp.experts."
_BYTES_PER_BLOCK = MX_BLOCK // 2


def gpt_oss_expert_names(layer: int) -> dict[str, str]:
    """moeprec field -> gpt-oss tensor name for one layer."""
    check_positive_int("layer", layer, allow_zero=True)
    p = _PREFIX.format(layer=layer)
    return {
        "w1": p + "gate_up_proj_blocks",
        "w1_scale": p + "gate_up_proj_scales",
        "bias1": p + "gate_up_proj_bias",
        "w2": p + "down_proj_blocks",
        "w2_scale": p + "down_proj_scales",
        "bias2": p + "down_proj_bias",
    }


@dataclass
class MXFP4Experts:
    """One layer's experts in moeprec's layout (the quant="mxfp4" arguments of fused_moe)."""

    w1: torch.Tensor  # uint8 [E, 2I, H/2]
    w1_scale: torch.Tensor  # uint8 [E, 2I, H/32]
    w2: torch.Tensor  # uint8 [E, H, I/2]
    w2_scale: torch.Tensor  # uint8 [E, H, I/32]
    bias1: torch.Tensor | None = None  # fp32 [E, 2I]
    bias2: torch.Tensor | None = None  # fp32 [E, H]
    gate_mode: str = GPT_OSS_GATE_MODE

    def fused_moe_kwargs(self) -> dict:
        """Keyword arguments for fused_moe besides w1/w2 (activation is gpt-oss's)."""
        return {
            "quant": "mxfp4",
            "w1_scale": self.w1_scale,
            "w2_scale": self.w2_scale,
            "bias1": self.bias1,
            "bias2": self.bias2,
            "gate_mode": self.gate_mode,
            "activation": "swiglu_oai",
        }


def blocks_to_packed(blocks: torch.Tensor, name: str = "blocks") -> torch.Tensor:
    """gpt-oss [..., K/32, 16] -> moeprec [..., K/2] (same bytes)."""
    check_tensor(name, blocks, dtypes=(torch.uint8,))
    if blocks.dim() < 2 or blocks.shape[-1] != _BYTES_PER_BLOCK:
        raise ValueError(f"{name}: expected shape [..., K/32, {_BYTES_PER_BLOCK}], got {tuple(blocks.shape)}")
    return blocks.reshape(*blocks.shape[:-2], blocks.shape[-2] * _BYTES_PER_BLOCK)


def packed_to_blocks(packed: torch.Tensor, name: str = "packed") -> torch.Tensor:
    """moeprec [..., K/2] -> gpt-oss [..., K/32, 16] (same bytes)."""
    check_tensor(name, packed, dtypes=(torch.uint8,))
    if packed.dim() < 1 or packed.shape[-1] % _BYTES_PER_BLOCK:
        raise ValueError(
            f"{name}: expected a last dim that is a multiple of {_BYTES_PER_BLOCK}, got {tuple(packed.shape)}"
        )
    return packed.reshape(*packed.shape[:-1], packed.shape[-1] // _BYTES_PER_BLOCK, _BYTES_PER_BLOCK)


def _check_layer(w1, w1_scale, w2, w2_scale, bias1, bias2) -> None:
    # Checked as uint8 views: float4_e2m1fn_x2 weights and float8_e8m0fnu scales (same bytes) pass.
    w1, w1_scale = check_mxfp4_pair(w1, w1_scale)
    w2, w2_scale = check_mxfp4_pair(w2, w2_scale)
    check_expert_weights("mxfp4", w1, w1_scale, w2, w2_scale, bias1, bias2)


def from_gpt_oss(tensors: dict[str, torch.Tensor], layer: int, gate_mode: str = GPT_OSS_GATE_MODE) -> MXFP4Experts:
    """Build moeprec expert weights from a layer's gpt-oss tensors (a name -> tensor mapping).

    gate_mode "interleaved" keeps gpt-oss's row order; "separated" reorders the gate/up rows
    (and their scales and bias) to [gate..., up...].
    """
    check_choice("gate_mode", gate_mode, GATE_MODES)
    names = gpt_oss_expert_names(layer)
    missing = [names[k] for k in ("w1", "w1_scale", "w2", "w2_scale") if names[k] not in tensors]
    if missing:
        raise ValueError(f"tensors: missing gpt-oss expert tensors {missing}")
    w1 = blocks_to_packed(tensors[names["w1"]], names["w1"])
    w2 = blocks_to_packed(tensors[names["w2"]], names["w2"])
    w1_scale, w2_scale = tensors[names["w1_scale"]], tensors[names["w2_scale"]]
    bias1 = tensors.get(names["bias1"])
    bias2 = tensors.get(names["bias2"])
    bias1 = None if bias1 is None else bias1.float()
    bias2 = None if bias2 is None else bias2.float()
    _check_layer(w1, w1_scale, w2, w2_scale, bias1, bias2)
    w1 = convert_gate_up_order(w1, GPT_OSS_GATE_MODE, gate_mode, dim=-2)
    w1_scale = convert_gate_up_order(w1_scale, GPT_OSS_GATE_MODE, gate_mode, dim=-2)
    if bias1 is not None:
        bias1 = convert_gate_up_order(bias1, GPT_OSS_GATE_MODE, gate_mode, dim=-1)
    return MXFP4Experts(w1, w1_scale, w2, w2_scale, bias1, bias2, gate_mode)


def to_gpt_oss(
    experts: MXFP4Experts, layer: int, bias_dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """moeprec expert weights -> the gpt-oss tensors of one layer (gate/up rows interleaved)."""
    ex = experts
    check_choice("experts.gate_mode", ex.gate_mode, GATE_MODES)
    _check_layer(ex.w1, ex.w1_scale, ex.w2, ex.w2_scale, ex.bias1, ex.bias2)
    names = gpt_oss_expert_names(layer)
    w1 = convert_gate_up_order(ex.w1, ex.gate_mode, GPT_OSS_GATE_MODE, dim=-2)
    out = {
        names["w1"]: packed_to_blocks(w1, "w1").contiguous(),
        names["w1_scale"]: convert_gate_up_order(ex.w1_scale, ex.gate_mode, GPT_OSS_GATE_MODE, dim=-2).contiguous(),
        names["w2"]: packed_to_blocks(ex.w2, "w2").contiguous(),
        names["w2_scale"]: ex.w2_scale.contiguous(),
    }
    if ex.bias1 is not None:
        b1 = convert_gate_up_order(ex.bias1, ex.gate_mode, GPT_OSS_GATE_MODE, dim=-1)
        out[names["bias1"]] = b1.to(bias_dtype).contiguous()
    if ex.bias2 is not None:
        out[names["bias2"]] = ex.bias2.to(bias_dtype).contiguous()
    return out


def _shard_files(path: Path, wanted: list[str]) -> dict[Path, list[str]]:
    """Which safetensors file holds each wanted tensor (a file, or a directory with an index)."""
    if path.is_file():
        return {path: wanted}
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files: dict[Path, list[str]] = {}
        for name in wanted:
            if name in weight_map:
                files.setdefault(path / weight_map[name], []).append(name)
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return {single: wanted}
    raise ValueError(f"path: expected a .safetensors file or a checkpoint directory, got {str(path)!r}")


def load_gpt_oss_experts(
    path: str | os.PathLike,
    layer: int,
    gate_mode: str = GPT_OSS_GATE_MODE,
    device: torch.device | str = "cpu",
) -> MXFP4Experts:
    """Read one layer's experts from a gpt-oss checkpoint (file, or directory with
    model.safetensors[.index.json]); only that layer's tensors are read."""
    from safetensors import safe_open  # optional dependency (pip install moeprec[hf])

    check_choice("gate_mode", gate_mode, GATE_MODES)
    names = list(gpt_oss_expert_names(layer).values())
    tensors: dict[str, torch.Tensor] = {}
    for file, wanted in _shard_files(Path(path), names).items():
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            keys = set(f.keys())
            for name in wanted:
                if name in keys:
                    tensors[name] = f.get_tensor(name)
    return from_gpt_oss(tensors, layer, gate_mode)


def save_gpt_oss_experts(path: str | os.PathLike, layers: dict[int, MXFP4Experts]) -> None:
    """Write layers' experts as one gpt-oss-named safetensors file (tests, small exports)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for layer, experts in layers.items():
        tensors.update({k: v.cpu() for k, v in to_gpt_oss(experts, layer).items()})
    save_file(tensors, str(path))
