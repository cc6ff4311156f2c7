"""fused_moe's expert weight layout per quant, checked in one place.

w1 [E, 2I, H], w2 [E, H, I] (row-major over the output dim); quant "mxfp4" packs two E2M1
values per byte along the last dim (H/2, I/2) with one uint8 E8M0 scale per MX_BLOCK values
(H/32, I/32); quant "fp8" stores float8_e4m3fn with one fp32 scale per output row ([E, 2I],
[E, H]). bias1 [E, 2I], bias2 [E, H]. fused_moe, GroupedExperts.load_quantized_ and the gpt-oss
converter all read this layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moeprec._validation import check_tensor
from moeprec.formats.mxfp4 import MX_BLOCK

WEIGHT_DTYPES = {
    "none": (torch.bfloat16, torch.float16, torch.float32),
    "mxfp4": (torch.uint8,),
    "fp8": (torch.float8_e4m3fn,),
}


def check_mxfp4_sizes(*sizes: tuple[str, int]) -> None:
    """Each (name, size) must be a multiple of MX_BLOCK (one E8M0 scale per block)."""
    for name, size in sizes:
        if size % MX_BLOCK:
            raise ValueError(f"quant='mxfp4': expected {name} to be a multiple of {MX_BLOCK}, got {size}")


def check_expert_weights(
    quant: str,
    w1: torch.Tensor,
    w1_scale: torch.Tensor | None,
    w2: torch.Tensor,
    w2_scale: torch.Tensor | None,
    bias1: torch.Tensor | None = None,
    bias2: torch.Tensor | None = None,
    *,
    dims: tuple[int, int, int] | None = None,
    hidden_size: int | None = None,
    device: torch.device | None = None,
    bias_dtypes: Sequence[torch.dtype] | None = None,
    size_names: tuple[str, str] = ("the hidden size", "the intermediate size"),
    bias_names: tuple[str, str] = ("bias1", "bias2"),
) -> tuple[int, int, int]:
    """Check expert weights (quant "none", "mxfp4" or "fp8") against the layout above.

    Returns (E, I, H). `dims` = (E, I, H) pins every size (a module that owns them); otherwise E
    and 2I come from w1, H from `hidden_size` or else from w1's last dim. `device` (when given)
    is required of every tensor; biases are optional; `size_names` name H and I in the
    multiple-of-MX_BLOCK error, `bias_names` the biases, as the caller calls them.
    """
    w_dtypes = WEIGHT_DTYPES[quant]
    if dims is not None:
        E, I, H = dims
        two_i = 2 * I
    else:
        check_tensor("w1", w1, ndim=3, dtypes=w_dtypes, device=device)
        E, two_i = w1.shape[0], w1.shape[1]
        if E == 0:
            raise ValueError(f"w1: expected at least one expert, got shape {tuple(w1.shape)}")
        if two_i == 0 or two_i % 2:
            raise ValueError(
                f"w1: expected an even, non-zero dim 1 (2 * intermediate), got shape {tuple(w1.shape)}"
            )
        I = two_i // 2
        H = hidden_size if hidden_size is not None else w1.shape[2] * (2 if quant == "mxfp4" else 1)
    if quant == "mxfp4":
        check_mxfp4_sizes((size_names[0], H), (size_names[1], I))
        u8 = (torch.uint8,)
        check_tensor("w1", w1, shape=(E, two_i, H // 2), dtypes=w_dtypes, device=device)
        check_tensor("w2", w2, shape=(E, H, I // 2), dtypes=w_dtypes, device=device)
        check_tensor("w1_scale", w1_scale, shape=(E, two_i, H // MX_BLOCK), dtypes=u8, device=device)
        check_tensor("w2_scale", w2_scale, shape=(E, H, I // MX_BLOCK), dtypes=u8, device=device)
    else:
        check_tensor("w1", w1, shape=(E, two_i, H), dtypes=w_dtypes, device=device)
        check_tensor("w2", w2, shape=(E, H, I), dtypes=w_dtypes, device=device)
        if quant == "fp8":
            f32 = (torch.float32,)
            check_tensor("w1_scale", w1_scale, shape=(E, two_i), dtypes=f32, device=device)
            check_tensor("w2_scale", w2_scale, shape=(E, H), dtypes=f32, device=device)
        else:
            if w1.dtype != w2.dtype:
                raise TypeError(f"w2: expected dtype {w1.dtype} (as w1), got {w2.dtype}")
            for name, scale in (("w1_scale", w1_scale), ("w2_scale", w2_scale)):
                if scale is not None:
                    raise ValueError(f"{name}: expected None with quant='none', got a tensor")
    check_tensor(bias_names[0], bias1, shape=(E, two_i), dtypes=bias_dtypes, device=device, optional=True)
    check_tensor(bias_names[1], bias2, shape=(E, H), dtypes=bias_dtypes, device=device, optional=True)
    return E, I, H
