"""Non-finite values through the Triton fused MoE match the torch reference, on every path.

A NaN or +-Inf in one token, or a NaN weight (bf16 element, fp8 channel scale, 0xFF E8M0 block),
must give exactly the reference's NaN/Inf pattern: no clamp or max in a kernel may turn NaN into a
bound, and nothing may leak into other tokens (SPEC 6): the finite rows equal (within rounding)
the Triton output on clean inputs, whose accuracy test_fused_moe_triton.py checks.
"""

import pytest
import torch

from moeprec.fused_moe_op import fused_moe, fused_moe_torch
from tests._metrics import assert_close_aiter
from tests.test_fused_moe import _TRITON_DEVICE, E, M, _on, _on_dict, make_case

# numpy (the interpreter) warns on the NaN/Inf arithmetic these cases are made of
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

PATHS = [(q, a) for q in ("none", "mxfp4", "fp8") for a in ("bf16", "fp8", "fp4")]


def _same_nonfinite(got: torch.Tensor, want: torch.Tensor, clean: torch.Tensor) -> None:
    """Same NaN positions and signed Inf positions as the reference; finite rows as if clean."""
    got, want = got.float(), want.float()
    assert torch.equal(got.isnan(), want.isnan()), (got.isnan().sum(1), want.isnan().sum(1))
    assert torch.equal(got.isinf() & (got > 0), want.isinf() & (want > 0))
    assert torch.equal(got.isinf() & (got < 0), want.isinf() & (want < 0))
    rows = torch.isfinite(want).all(dim=1)
    assert 0 < int(rows.sum()) < rows.numel()
    assert_close_aiter(got[rows], clean.float()[rows])


def _triton(x, tw, ids, wkw, **kw):
    """The Triton output (CUDA tensors when present, else the interpreter), on the CPU."""
    dev = _TRITON_DEVICE
    tx, ttw, tids = _on(dev, x, tw, ids)
    return fused_moe(tx, topk_weights=ttw, topk_ids=tids, backend="triton",
                     **_on_dict(dev, wkw), **kw).cpu()


def _both(x, tw, ids, wkw, **kw):
    """(triton output, reference output)."""
    return _triton(x, tw, ids, wkw, **kw), fused_moe_torch(x, topk_weights=tw, topk_ids=ids, **wkw, **kw)


@pytest.mark.parametrize("activation", ["silu", "swiglu_oai"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("quant,act_dtype", PATHS)
def test_nonfinite_token_matches_reference(quant, act_dtype, value, activation):
    x, _, _, wkw, tw, ids, _, _ = make_case(quant)
    kw = dict(quant=quant, act_dtype=act_dtype, activation=activation)
    clean = _triton(x, tw, ids, wkw, **kw)
    x = x.clone()
    x[2, 5] = value
    got, want = _both(x, tw, ids, wkw, **kw)
    poisoned = ~torch.isfinite(want).all(dim=1)
    assert poisoned[2] and int(poisoned.sum()) == 1  # the case exercises what it claims
    _same_nonfinite(got, want, clean)


def _poison_weight(quant, wkw, name, e, row, col):
    """wkw with one NaN weight in expert e: an element (bf16), a channel scale (fp8) or an E8M0
    block (mxfp4), row `row` of `name`."""
    wkw = dict(wkw)
    if quant == "none":
        w = wkw[name].clone()
        w[e, row, col] = float("nan")
        wkw[name] = w
    elif quant == "fp8":
        s = wkw[name + "_scale"].clone()
        s[e, row] = float("nan")
        wkw[name + "_scale"] = s
    else:
        s = wkw[name + "_scale"].clone()
        s[e, row, col // 32] = 0xFF
        wkw[name + "_scale"] = s
    return wkw


@pytest.mark.parametrize("quant,act_dtype", PATHS)
def test_nan_weight_matches_reference(quant, act_dtype):
    x, _, _, wkw, tw, ids, _, _ = make_case(quant)
    e = int(ids[0, 0])
    routed = (ids == e).any(dim=1)
    assert 0 < int(routed.sum()) < M
    kw = dict(quant=quant, act_dtype=act_dtype)
    clean = _triton(x, tw, ids, wkw, **kw)
    for name, row in (("w1", 3), ("w2", 5)):
        got, want = _both(x, tw, ids, _poison_weight(quant, wkw, name, e, row, 17), **kw)
        assert torch.equal(want.isnan().any(dim=1), routed)
        _same_nonfinite(got, want, clean)
    # the poisoned expert masked off: finite everywhere, on both
    mask = torch.ones(E, dtype=torch.bool)
    mask[e] = False
    got, want = _both(x, tw, ids, _poison_weight(quant, wkw, "w1", e, 3, 17), expert_mask=mask, **kw)
    assert torch.isfinite(want).all() and torch.isfinite(got).all()
