"""Weight initialisation for the MoE modules: the draws are made in fp32 and rounded once.

`nn.init.trunc_normal_` run directly on a bf16 CUDA tensor draws its uniforms in bf16, where about
1 in 500 lands exactly on +-1; erfinv turns those into +-inf and the clamp into the truncation
bounds (+-2, absolute, as torchtitan passes them): weights of 40 standard deviations at
std=0.05, which blow layer outputs up by two orders of magnitude (seen on an H200, torch 2.11).
"""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, std: float, a: float = -2.0, b: float = 2.0) -> torch.Tensor:
    """`nn.init.trunc_normal_(tensor, 0, std, a, b)` drawn in fp32 (on tensor's device, from
    its generator) and copied into tensor in its dtype; in place, returns tensor."""
    if tensor.dtype == torch.float32 or tensor.dtype == torch.float64:
        return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=a, b=b)
    draw = torch.empty(tensor.shape, dtype=torch.float32, device=tensor.device)
    nn.init.trunc_normal_(draw, mean=0.0, std=std, a=a, b=b)
    return tensor.copy_(draw)
