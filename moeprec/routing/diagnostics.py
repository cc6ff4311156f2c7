"""Routing diagnostics: how often two routers choose different experts."""

from __future__ import annotations

import torch

from moeprec._validation import check_tensor


def topk_set_flip_rate(ids_a: torch.Tensor, ids_b: torch.Tensor) -> float:
    """Fraction of tokens whose top-k expert SET differs between ids_a and ids_b ([T, k] each).

    The order within a token's k experts is ignored; 0.0 for T == 0.
    """
    check_tensor("ids_a", ids_a, ndim=2)
    check_tensor("ids_b", ids_b, shape=tuple(ids_a.shape))
    if ids_a.shape[0] == 0:
        return 0.0
    differ = (ids_a.sort(dim=-1).values != ids_b.sort(dim=-1).values).any(dim=-1)
    return differ.float().mean().item()
