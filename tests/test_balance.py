"""update_expert_bias, switch_aux_loss, router_z_loss on hand-computed cases (SPEC 2)."""

import math

import pytest
import torch

from moeprec import router_z_loss, switch_aux_loss, update_expert_bias


def test_update_expert_bias_balanced_mean():
    bias = torch.tensor([0.5, 0.0, -0.5, 1.0])
    same = update_expert_bias(bias, torch.tensor([4, 0, 2, 2]), 0.1)
    # mean 2: sign(mean - counts) = [-1, 1, 0, 0]; its mean is 0, so delta = 0.1 * that
    assert same is bias
    torch.testing.assert_close(bias, torch.tensor([0.4, 0.1, -0.5, 1.0]))


def test_update_expert_bias_recentres_delta():
    bias = torch.zeros(4)
    update_expert_bias(bias, torch.tensor([3, 1, 1, 1]), 0.2)
    # mean 1.5: sign = [-1, 1, 1, 1], mean 0.5 -> delta = 0.2 * [-1.5, 0.5, 0.5, 0.5]
    torch.testing.assert_close(bias, torch.tensor([-0.3, 0.1, 0.1, 0.1]))
    assert abs(bias.sum().item()) < 1e-6  # the update never shifts all biases together


def test_update_expert_bias_no_grad_and_float_counts():
    bias = torch.zeros(3, requires_grad=True)
    update_expert_bias(bias, torch.tensor([1.0, 2.0, 3.0]), 1.0)
    torch.testing.assert_close(bias.detach(), torch.tensor([1.0, 0.0, -1.0]))


@pytest.mark.parametrize(
    "args, exc, words",
    [
        ((torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4), 0.1), TypeError, ["expert_bias", "bfloat16"]),
        ((torch.zeros(4), torch.zeros(5), 0.1), ValueError, ["tokens_per_expert", "5"]),
        ((torch.zeros(4, 1), torch.zeros(4), 0.1), ValueError, ["expert_bias", "1-D"]),
        ((torch.zeros(4), torch.zeros(4), "0.1"), TypeError, ["coeff", "str"]),
    ],
)
def test_update_expert_bias_bad_input(args, exc, words):
    with pytest.raises(exc) as info:
        update_expert_bias(*args)
    for w in words:
        assert w in str(info.value)


def test_switch_aux_loss_hand_case():
    scores = torch.tensor([[0.75, 0.25], [0.5, 0.5]], requires_grad=True)
    selected = torch.tensor([[0], [0]])
    loss = switch_aux_loss(scores, selected, num_experts=2, top_k=1)
    # f = [1, 0], P = [0.625, 0.375] -> 2 * 0.625
    torch.testing.assert_close(loss, torch.tensor(1.25))
    loss.backward()
    # d/dscores[t, i] = E * f_i / T: only through P
    torch.testing.assert_close(scores.grad, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


def test_switch_aux_loss_top_k_and_uniform_minimum():
    scores = torch.full((4, 4), 0.25)
    selected = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    torch.testing.assert_close(switch_aux_loss(scores, selected, 4, 2), torch.tensor(1.0))
    skewed = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]])
    # f = [.5, .5, 0, 0], P = [.4, .4, .1, .1] -> 4 * (.5 * .4 + .5 * .4) = 1.6
    scores2 = torch.tensor([[0.4, 0.4, 0.1, 0.1]] * 4)
    torch.testing.assert_close(switch_aux_loss(scores2, skewed, 4, 2), torch.tensor(4 * 0.4))


def test_switch_aux_loss_empty_and_bad_input():
    assert switch_aux_loss(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.int64), 4, 2) == 0
    with pytest.raises(ValueError, match="num_experts"):
        switch_aux_loss(torch.zeros(3, 4), torch.zeros(3, 2, dtype=torch.int64), 5, 2)
    with pytest.raises(ValueError, match="selected_experts"):
        switch_aux_loss(torch.zeros(3, 4), torch.zeros(3, 3, dtype=torch.int64), 4, 2)


def test_router_z_loss_hand_case():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    want = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(want))
    # bf16 logits: computed in fp32
    out = router_z_loss(logits.bfloat16())
    assert out.dtype == torch.float32
    # N-D logits: mean over every token
    torch.testing.assert_close(router_z_loss(logits.view(1, 2, 2)), torch.tensor(want))
    assert router_z_loss(logits.double()).dtype == torch.float64


def test_router_z_loss_bad_input():
    with pytest.raises(TypeError, match="logits"):
        router_z_loss(torch.ones(2, 3, dtype=torch.int64))


@pytest.mark.parametrize("bad", [-1, 4, 7])
def test_switch_aux_loss_rejects_expert_ids_out_of_range(bad):
    # SPEC 6: ids outside [0, E) used to fail inside bincount/broadcasting (RuntimeError) on CPU
    # and would index out of bounds in the device scatter-add.
    selected = torch.tensor([[0, 1], [2, bad]])
    with pytest.raises(ValueError, match="selected_experts") as info:
        switch_aux_loss(torch.rand(2, 4), selected, 4, 2)
    assert str(bad) in str(info.value)


def test_switch_aux_loss_rejects_float_expert_ids():
    with pytest.raises(TypeError, match="selected_experts"):
        switch_aux_loss(torch.rand(2, 4), torch.zeros(2, 2), 4, 2)


def test_switch_aux_loss_bf16_scores_computed_in_fp32():
    # f_i = 257 / 514 is not representable after counting in bf16 (257 -> 256)
    t = 257
    scores = torch.rand(t, 4).softmax(-1)
    selected = torch.tensor([[0, 1]] * t)
    want = switch_aux_loss(scores.bfloat16().float(), selected, 4, 2)
    got = switch_aux_loss(scores.bfloat16(), selected, 4, 2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
