"""Which activation dtype a quantized expert GEMM runs with (SPEC 1.2).

For MXFP4 weights, small batches are memory-bound: the weights dominate the traffic and bf16
activations cost nothing extra while avoiding a second rounding. Past a crossover token count the
GEMMs become compute-bound and the low-precision activation path (fp8 on Hopper and CPU, fp4 on
GPUs with FP4 tensor cores) wins. The crossover ("bound") is measured per device and stored as
data in `moeprec/configs/act_dtype_bounds.json`.

Resolution order (first that applies wins):
1. an explicit `act_dtype` argument of `fused_moe` (not "auto");
2. force-bf16: env `MOEPREC_FORCE_BF16_ACT` truthy, or `PrecisionConfig.force_bf16_act`
   (every quantized path, mxfp4 and fp8; with quant "none" the answer is bf16 anyway);
3. `PrecisionConfig.act_dtype` when not "auto", on quantized paths (mxfp4, fp8) only: the config
   is the policy of quantized experts, so unquantized weights (quant "none") keep bf16;
4. per quant: "none" -> bf16, "fp8" -> fp8, "mxfp4" -> bf16 below the bound, else the device's
   fast path. The bound is env `MOEPREC_BF16_FP8_BOUND` if set, else
   `PrecisionConfig.bf16_fp8_bound` if set, else the per-device default.

Environment variables are read at every call (never cached), so a deployment can change them
between calls.
"""

from __future__ import annotations

import functools
import json
import os
from importlib import resources
from typing import Any

import torch

from moeprec._validation import check_choice, check_positive_int
from moeprec.activations import ACTIVATIONS, GATE_MODES

QUANTS = ("none", "mxfp4", "fp8")
ACT_DTYPES = ("bf16", "fp8", "fp4")
ACT_DTYPE_CHOICES = ("auto",) + ACT_DTYPES

ENV_FORCE_BF16 = "MOEPREC_FORCE_BF16_ACT"
ENV_BOUND = "MOEPREC_BF16_FP8_BOUND"
FALLBACK_BOUND = 512

_TRUTHY = ("1", "true", "yes", "on")
_FALSY = ("0", "false", "no", "off")


def env_flag(name: str) -> bool | None:
    """The boolean env var `name`: None when unset; accepted values 1/0/true/false/yes/no/on/off."""
    raw = os.environ.get(name)
    if raw is None:
        return None
    value = raw.strip().lower()
    if value in _TRUTHY:
        return True
    if value in _FALSY:
        return False
    raise ValueError(
        f"{name}: expected one of 1/0/true/false/yes/no/on/off (any case), got {raw!r}"
    )


def _env_bound() -> int | None:
    raw = os.environ.get(ENV_BOUND)
    if raw is None:
        return None
    value = raw.strip()
    # int() would accept "+5", "1_000" and " 5"; only plain decimal digits are a token count.
    if not value.isascii() or not value.isdigit():
        raise ValueError(f"{ENV_BOUND}: expected a non-negative integer, got {raw!r}")
    return int(value)


@functools.lru_cache(maxsize=1)
def _bounds_table() -> dict[str, int]:
    # Data, not code: re-measured per device by the tuning scripts. Loaded once (the file is
    # part of the package; only env vars must be re-read at every call).
    text = resources.files("moeprec").joinpath("configs/act_dtype_bounds.json").read_text()
    table = json.loads(text)
    out = {}
    for key, value in table.items():
        if key.startswith("_"):  # "_comment" and other metadata
            continue
        check_positive_int(f"act_dtype_bounds.json[{key!r}]", value, allow_zero=True)
        out[key] = value
    return out


def _cuda_device(device: Any) -> torch.device | None:
    """The CUDA device that `device` names, or None for the CPU policy."""
    if device is None:
        return None
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, (str, int)) and not isinstance(device, bool):
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ValueError(f"device: expected a device name such as 'cpu' or 'cuda:0', got {device!r}") from None
    else:
        raise TypeError(
            f"device: expected a torch.device, a device string, an int or None, got "
            f"{type(device).__name__} {device!r}"
        )
    if dev.type != "cuda":
        return None
    if not torch.cuda.is_available():
        raise ValueError(f"device: expected an available device, got {device!r} but CUDA is not available")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def device_default_bound(device: Any = None) -> int:
    """The measured bf16->low-precision crossover for `device` (512 where none is known)."""
    table = _bounds_table()
    dev = _cuda_device(device)
    name = "cpu" if dev is None else torch.cuda.get_device_name(dev)
    return table.get(name, table.get("default", FALLBACK_BOUND))


def has_fp4_tensor_cores(device: Any = None) -> bool:
    """FP4 tensor cores exist from compute capability 10 (Blackwell); Hopper and CPU have none."""
    dev = _cuda_device(device)
    if dev is None:
        return False
    major, _ = torch.cuda.get_device_capability(dev)
    return major >= 10


def _config_values(precision: Any) -> tuple[str, bool, int | None]:
    """(act_dtype, force_bf16_act, bf16_fp8_bound) of a PrecisionConfig, or the defaults for None."""
    # Duck-typed: any object with at least one of these attributes works, missing ones take the
    # defaults. An object with none of them (a string, a number) is a mistake, not "no setting".
    if precision is None:
        return "auto", False, None
    if not any(hasattr(precision, f) for f in ("act_dtype", "force_bf16_act", "bf16_fp8_bound")):
        raise TypeError(
            "precision: expected a PrecisionConfig (or an object with act_dtype, force_bf16_act "
            f"or bf16_fp8_bound) or None, got {type(precision).__name__} {precision!r}"
        )
    act = getattr(precision, "act_dtype", "auto")
    force = getattr(precision, "force_bf16_act", False)
    bound = getattr(precision, "bf16_fp8_bound", None)
    check_choice("precision.act_dtype", act, ACT_DTYPE_CHOICES)
    if not isinstance(force, bool):
        raise TypeError(
            f"precision.force_bf16_act: expected a bool, got {type(force).__name__} {force!r}"
        )
    if bound is not None:
        check_positive_int("precision.bf16_fp8_bound", bound, allow_zero=True)
    return act, force, bound


def resolve_act_dtype(
    num_tokens: int,
    *,
    quant: str,
    act_dtype: str = "auto",
    precision: Any = None,
    activation: str = "silu",
    gate_mode: str = "separated",
    device: Any = None,
) -> str:
    """The act dtype `fused_moe` runs with: `act_dtype` and a PrecisionConfig's fields, then the policy.

    Returns one of "bf16" | "fp8" | "fp4". See the module docstring for the order.
    """
    check_positive_int("num_tokens", num_tokens, allow_zero=True)
    check_choice("quant", quant, QUANTS)
    check_choice("act_dtype", act_dtype, ACT_DTYPE_CHOICES)
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("gate_mode", gate_mode, GATE_MODES)

    cfg_act, cfg_force, cfg_bound = _config_values(precision)
    # Both env vars are parsed on every call, whatever path is taken, so a malformed deployment
    # setting fails on the first call instead of at the first large batch.
    env_force = env_flag(ENV_FORCE_BF16)
    env_bound = _env_bound()

    # (1) the caller's explicit choice
    if act_dtype != "auto":
        return act_dtype

    # (2) force-bf16 when the env var (read now) is truthy or the config says so
    if env_force or cfg_force:
        return "bf16"

    # (3) the per-quant rules, with a configured act dtype for quantized experts. SPEC 1.2's order
    # does not list PrecisionConfig.act_dtype: it sits below force-bf16 (the env flag is the
    # deployment's kill switch) and applies to quantized weights only (SPEC 4: the config "sets
    # the act-dtype policy used once the experts are quantized").
    if quant == "none":
        return "bf16"
    if cfg_act != "auto":
        return cfg_act
    if quant == "fp8":
        return "fp8"

    # mxfp4: bf16 below the bound, the device's fast path from it on
    bound = env_bound if env_bound is not None else cfg_bound
    if bound is None:
        bound = device_default_bound(device)
    if num_tokens < bound:
        return "bf16"
    return "fp4" if has_fp4_tensor_cores(device) else "fp8"


def select_act_dtype(
    num_tokens: int,
    *,
    quant: str,
    activation: str = "silu",
    gate_mode: str = "separated",
    device: Any = None,
) -> str:
    """The activation dtype for a quantized expert GEMM over `num_tokens` tokens (SPEC 1.2).

    `quant="none"` -> "bf16"; `"fp8"` -> "fp8"; `"mxfp4"` -> "bf16" when `num_tokens < bound`, else
    "fp8" (Hopper, CPU) or "fp4" (GPUs with FP4 tensor cores). Env `MOEPREC_FORCE_BF16_ACT` forces
    "bf16" on every quantized path; env `MOEPREC_BF16_FP8_BOUND` overrides the per-device bound.
    `device=None` is the CPU policy. `activation` and `gate_mode` are validated; the measured
    bounds do not depend on them today.
    """
    return resolve_act_dtype(
        num_tokens, quant=quant, activation=activation, gate_mode=gate_mode, device=device
    )
