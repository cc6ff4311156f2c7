"""The precision knobs an engine threads down to the MoE layer (SPEC 1).

`PrecisionConfig -> MoEArgs.router_dtype -> MoE -> TokenChoiceTopKRouter -> RouterGateLinear`
carries the router dtype; the act-dtype fields feed `moeprec.act_policy` once experts are quantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moeprec._validation import check_choice, check_positive_int
from moeprec.act_policy import ACT_DTYPE_CHOICES

# Spellings accepted for the router dtype. None means "the model dtype" (plain F.linear).
_ROUTER_DTYPES: dict[Any, torch.dtype] = {
    "fp32": torch.float32,
    "fp64": torch.float64,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
}


def parse_router_dtype(value: Any) -> torch.dtype | None:
    """None | "fp32" | "fp64" | torch.float32 | torch.float64 -> torch dtype (or None)."""
    if value is None:
        return None
    # A dict lookup alone would accept True == 1 style surprises for hashable junk and raise
    # TypeError for unhashable values; check the type first so every bad value is a ValueError.
    if isinstance(value, (str, torch.dtype)) and value in _ROUTER_DTYPES:
        return _ROUTER_DTYPES[value]
    raise ValueError(
        "moe_router_dtype: expected one of None, 'fp32', 'fp64', torch.float32, torch.float64, "
        f"got {value!r}"
    )


@dataclass
class PrecisionConfig:
    """Router dtype (training stability) and activation-dtype policy (quantized inference).

    moe_router_dtype: None (router GEMM in the model dtype), "fp32" or "fp64" (or torch dtypes).
    act_dtype: "auto" (the policy of `select_act_dtype`) or a fixed "bf16" | "fp8" | "fp4" for
        quantized experts (unquantized ones stay bf16); below force-bf16, above the bound.
    bf16_fp8_bound: token count below which quantized paths keep bf16 activations (None: device
        default; env MOEPREC_BF16_FP8_BOUND still overrides it).
    force_bf16_act: bf16 activations for every token count on every quantized path.
    """

    moe_router_dtype: str | torch.dtype | None = "fp32"
    act_dtype: str = "auto"
    bf16_fp8_bound: int | None = None
    force_bf16_act: bool = False

    def __post_init__(self) -> None:
        parse_router_dtype(self.moe_router_dtype)
        check_choice("act_dtype", self.act_dtype, ACT_DTYPE_CHOICES)
        if self.bf16_fp8_bound is not None:
            check_positive_int("bf16_fp8_bound", self.bf16_fp8_bound, allow_zero=True)
        if not isinstance(self.force_bf16_act, bool):
            raise TypeError(
                "force_bf16_act: expected a bool, got "
                f"{type(self.force_bf16_act).__name__} {self.force_bf16_act!r}"
            )

    @property
    def router_dtype(self) -> torch.dtype | None:
        """The router GEMM dtype as a torch dtype (None: the model dtype)."""
        return parse_router_dtype(self.moe_router_dtype)
