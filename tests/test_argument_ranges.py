"""SPEC 6 value ranges of constructor and function arguments: each bad value names its argument."""

import math

import pytest
import torch

import moeprec

NAN, INF = math.nan, math.inf


def _raises(exc, name, fn):
    with pytest.raises(exc) as info:
        fn()
    assert name in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "kw, exc, name",
    [
        (dict(bias=1), TypeError, "bias"),
        (dict(swiglu_alpha="1.7"), TypeError, "swiglu_alpha"),
        (dict(swiglu_alpha=NAN), ValueError, "swiglu_alpha"),
        (dict(swiglu_limit=0.0), ValueError, "swiglu_limit"),
        (dict(swiglu_limit=INF), ValueError, "swiglu_limit"),
    ],
)
def test_grouped_experts(kw, exc, name):
    _raises(exc, name, lambda: moeprec.GroupedExperts(8, 4, 2, **kw))


@pytest.mark.parametrize(
    "kw, exc, name",
    [
        (dict(gate_bias=1), TypeError, "gate_bias"),
        (dict(route_scale=NAN), ValueError, "route_scale"),
        (dict(route_scale=INF), ValueError, "route_scale"),
    ],
)
def test_router(kw, exc, name):
    _raises(exc, name, lambda: moeprec.TokenChoiceTopKRouter(8, 4, 2, **kw))


@pytest.mark.parametrize(
    "args, kw, exc, name",
    [
        ((0, 4), {}, ValueError, "in_features"),
        ((4, 0), {}, ValueError, "out_features"),
        ((4.0, 4), {}, TypeError, "in_features"),
        ((4, 4), dict(bias="x"), TypeError, "bias"),
    ],
)
def test_router_gate_linear(args, kw, exc, name):
    _raises(exc, name, lambda: moeprec.RouterGateLinear(*args, **kw))


@pytest.mark.parametrize(
    "kw, exc, name",
    [
        (dict(swiglu_limit=0.0), ValueError, "swiglu_limit"),
        (dict(swiglu_alpha=INF), ValueError, "swiglu_alpha"),
        (dict(route_scale=NAN), ValueError, "route_scale"),
        (dict(load_balance_coeff=-1e-3), ValueError, "load_balance_coeff"),
        (dict(load_balance_coeff=NAN), ValueError, "load_balance_coeff"),
        (dict(aux_loss_coeff=-0.1), ValueError, "aux_loss_coeff"),
        (dict(z_loss_coeff=INF), ValueError, "z_loss_coeff"),
    ],
)
def test_moe_args(kw, exc, name):
    _raises(exc, name, lambda: moeprec.MoEArgs(**kw))


@pytest.mark.parametrize("coeff", [NAN, INF, -INF])
def test_update_expert_bias_coeff(coeff):
    bias = torch.zeros(4)
    _raises(ValueError, "coeff", lambda: moeprec.update_expert_bias(bias, torch.arange(4), coeff))
    assert torch.equal(bias, torch.zeros(4))  # nothing written


def test_good_values_still_pass():
    moeprec.GroupedExperts(8, 4, 2, bias=True, swiglu_alpha=1, swiglu_limit=7)
    moeprec.TokenChoiceTopKRouter(8, 4, 2, gate_bias=True, route_scale=2)
    moeprec.MoEArgs(load_balance_coeff=0.0, aux_loss_coeff=0.01, route_scale=2.5)
    b = moeprec.update_expert_bias(torch.zeros(4), torch.tensor([4, 0, 0, 0]), 0.5)
    torch.testing.assert_close(b, torch.tensor([-0.75, 0.25, 0.25, 0.25]))
