import pytest
import torch
import torch.nn.functional as F

from moeprec.activations import convert_gate_up_order, gated_activation, split_gate_up


def test_separated_and_interleaved_agree_after_reordering():
    h_sep = torch.randn(5, 2 * 6, dtype=torch.float64)
    h_int = convert_gate_up_order(h_sep, "separated", "interleaved", dim=-1)
    assert not torch.equal(h_sep, h_int)
    for act in ("silu", "swiglu_oai"):
        a = gated_activation(h_sep, act, "separated")
        b = gated_activation(h_int, act, "interleaved")
        assert torch.equal(a, b)
    back = convert_gate_up_order(h_int, "interleaved", "separated", dim=-1)
    assert torch.equal(back, h_sep)


def test_weight_row_reorder_matches_column_reorder():
    w = torch.randn(3, 8, 4, dtype=torch.float64)
    x = torch.randn(2, 4, dtype=torch.float64)
    wi = convert_gate_up_order(w, "separated", "interleaved", dim=-2)
    for e in range(3):
        h = x @ w[e].T
        assert torch.equal(convert_gate_up_order(h, "separated", "interleaved", dim=-1), x @ wi[e].T)


def test_silu_and_swiglu_formulas():
    g = torch.tensor([-9.0, -1.0, 0.5, 3.0, 8.0], dtype=torch.float64)
    u = torch.tensor([-9.0, 2.0, -0.5, 1.0, 8.0], dtype=torch.float64)
    h = torch.cat([g, u])
    assert torch.allclose(gated_activation(h, "silu"), F.silu(g) * u)
    gc, uc = g.clamp(max=7.0), u.clamp(-7.0, 7.0)
    want = gc * torch.sigmoid(1.702 * gc) * (uc + 1)
    assert torch.allclose(gated_activation(h, "swiglu_oai"), want)
    # the limit is applied: 8 behaves as 7 on both sides
    assert gated_activation(h, "swiglu_oai")[-1] == 7.0 * torch.sigmoid(torch.tensor(1.702 * 7.0, dtype=torch.float64)) * 8.0


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="gate_mode"):
        split_gate_up(torch.randn(2, 4), "zigzag")
    with pytest.raises(ValueError, match="activation"):
        gated_activation(torch.randn(2, 4), "relu")
    with pytest.raises(ValueError, match="last dim"):
        split_gate_up(torch.randn(2, 5))
