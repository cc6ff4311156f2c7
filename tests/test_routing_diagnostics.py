import pytest
import torch

from moeprec.routing.diagnostics import topk_set_flip_rate


def test_flip_rate_ignores_order_within_a_token_and_counts_set_changes():
    a = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 0], [1, 2, 3]])
    b = torch.tensor([[2, 0, 1], [3, 4, 6], [6, 7, 0], [3, 2, 1]])  # only token 1's set differs
    assert topk_set_flip_rate(a, b) == 0.25
    assert topk_set_flip_rate(a, a.flip(-1)) == 0.0
    assert topk_set_flip_rate(a[:0], b[:0]) == 0.0


def test_flip_rate_checks_its_arguments():
    with pytest.raises(ValueError, match="ids_b"):
        topk_set_flip_rate(torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="ids_a"):
        topk_set_flip_rate(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
