"""parse_router_dtype and PrecisionConfig (SPEC 1.1)."""

import pytest
import torch

from moeprec import PrecisionConfig, parse_router_dtype


@pytest.mark.parametrize(
    "value, want",
    [(None, None), ("fp32", torch.float32), ("fp64", torch.float64),
     (torch.float32, torch.float32), (torch.float64, torch.float64)],
)
def test_parse_router_dtype_accepts(value, want):
    assert parse_router_dtype(value) is want


@pytest.mark.parametrize(
    "value", ["bf16", "float32", "FP32", "", torch.bfloat16, torch.float16, 32, 1.0, ["fp32"], True]
)
def test_parse_router_dtype_rejects(value):
    with pytest.raises(ValueError) as info:
        parse_router_dtype(value)
    assert "moe_router_dtype" in str(info.value)
    assert repr(value) in str(info.value)


def test_precision_config_defaults():
    cfg = PrecisionConfig()
    assert (cfg.moe_router_dtype, cfg.act_dtype, cfg.bf16_fp8_bound, cfg.force_bf16_act) == (
        "fp32", "auto", None, False)
    assert cfg.router_dtype is torch.float32


@pytest.mark.parametrize("value, want", [(None, None), ("fp64", torch.float64), (torch.float32, torch.float32)])
def test_precision_config_router_dtype(value, want):
    assert PrecisionConfig(moe_router_dtype=value).router_dtype is want


@pytest.mark.parametrize("act", ["auto", "bf16", "fp8", "fp4"])
def test_precision_config_act_dtypes(act):
    assert PrecisionConfig(act_dtype=act, bf16_fp8_bound=0, force_bf16_act=True).act_dtype == act


@pytest.mark.parametrize(
    "kw, exc, words",
    [
        (dict(moe_router_dtype="bf16"), ValueError, ["moe_router_dtype", "bf16"]),
        (dict(act_dtype="fp16"), ValueError, ["act_dtype", "fp16"]),
        (dict(bf16_fp8_bound=-1), ValueError, ["bf16_fp8_bound", "-1"]),
        (dict(bf16_fp8_bound=1.5), TypeError, ["bf16_fp8_bound", "1.5"]),
        (dict(bf16_fp8_bound=True), TypeError, ["bf16_fp8_bound", "True"]),
        (dict(force_bf16_act="yes"), TypeError, ["force_bf16_act", "yes"]),
    ],
)
def test_precision_config_rejects(kw, exc, words):
    with pytest.raises(exc) as info:
        PrecisionConfig(**kw)
    for w in words:
        assert w in str(info.value)
