"""Weight initialisation draws in fp32 and rounds once (moeprec.init): no weight of a bf16
module lands on the truncation bounds."""

import pytest
import torch

from moeprec.args import MoEArgs
from moeprec.init import trunc_normal_
from moeprec.moe import MoE

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_draw_is_the_fp32_draw_rounded_once(device):
    torch.manual_seed(3)
    ref = torch.empty(64, 1024, device=device)
    torch.nn.init.trunc_normal_(ref, std=0.05)
    torch.manual_seed(3)
    w = trunc_normal_(torch.empty(64, 1024, device=device, dtype=torch.bfloat16), std=0.05)
    assert w.dtype == torch.bfloat16
    torch.testing.assert_close(w, ref.bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_moe_init_has_no_outlier_weights(device, dtype):
    std = 0.05
    m = MoE(MoEArgs(num_experts=8, top_k=2), 256, 256).to(device, dtype)
    m.init_weights(std)
    for name in ("experts.w1", "experts.w2", "router.gate.weight"):
        w = m.get_parameter(name).float()
        # 2^17+ draws of N(0, std): none past 6 std (p ~ 1e-9 each); the spread is std's
        assert w.abs().max().item() < 6 * std, name
        assert abs(w.std().item() / std - 1) < 0.05, name
