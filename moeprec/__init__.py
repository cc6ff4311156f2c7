"""moeprec: Mixture-of-Experts layers whose numeric precision is a deliberate, documented choice.

The public API is re-exported here. Names resolve lazily (PEP 562) so that `import moeprec`
stays cheap and never imports optional dependencies such as Triton or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # precision knobs (SPEC 1)
    "parse_router_dtype": "moeprec.precision",
    "PrecisionConfig": "moeprec.precision",
    "select_act_dtype": "moeprec.act_policy",
    # router (SPEC 2)
    "RouterGatingLinearFunction": "moeprec.routing.gate",
    "router_gating_linear": "moeprec.routing.gate",
    "RouterGateLinear": "moeprec.routing.gate",
    "TokenChoiceTopKRouter": "moeprec.routing.topk_router",
    "RouterOutput": "moeprec.routing.topk_router",
    "update_expert_bias": "moeprec.routing.balance",
    "switch_aux_loss": "moeprec.routing.balance",
    "router_z_loss": "moeprec.routing.balance",
    # number formats (SPEC 3)
    "quantize_mxfp4": "moeprec.formats.mxfp4",
    "dequantize_mxfp4": "moeprec.formats.mxfp4",
    "quantize_fp8": "moeprec.formats.fp8",
    # experts and the fused op (SPEC 4)
    "moe_align_block_size": "moeprec.dispatch",
    "fused_moe": "moeprec.fused_moe_op",
    "GroupedExperts": "moeprec.experts",
    "MoE": "moeprec.moe",
    "MoEArgs": "moeprec.args",
}

# subpackages reachable as attributes (moeprec.parallel.expert_parallel) without an explicit import
_SUBPACKAGES = ("formats", "integrations", "parallel", "routing")

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"moeprec.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moeprec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
