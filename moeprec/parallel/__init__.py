"""Distributed execution of moeprec layers (applied from outside the model, as torchtitan does)."""

from moeprec.parallel.expert_parallel import expert_parallel, is_expert_parallel

__all__ = ["expert_parallel", "is_expert_parallel"]
