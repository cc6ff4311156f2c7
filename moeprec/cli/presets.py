"""MoE shapes of real models, shared by `moeprec report`, `moeprec bench` and `moeprec demo`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    activation: str = "silu"
    gate_mode: str = "separated"
    bias: bool = False
    score_func: str = "softmax"
    num_expert_groups: int | None = None
    num_limited_groups: int | None = None


PRESETS: dict[str, Shape] = {
    "qwen3-30b-a3b": Shape(2048, 768, 128, 8),
    "mixtral-8x7b": Shape(4096, 14336, 8, 2),
    "gpt-oss-20b": Shape(2880, 2880, 32, 4, "swiglu_oai", "interleaved", bias=True),
    "deepseek-v3": Shape(7168, 2048, 256, 8, score_func="sigmoid", num_expert_groups=8,
                         num_limited_groups=4),
}
