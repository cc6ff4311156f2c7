"""gpt-oss checkpoint interop on a small synthetic checkpoint written with safetensors."""

import json

import pytest
import torch

pytest.importorskip("safetensors")
from safetensors.torch import load_file, save_file  # noqa: E402

from moeprec.activations import gated_activation  # noqa: E402
from moeprec.formats.mxfp4 import dequantize_mxfp4, quantize_mxfp4  # noqa: E402
from moeprec.integrations.gpt_oss import (  # noqa: E402
    MXFP4Experts,
    from_gpt_oss,
    gpt_oss_expert_names,
    load_gpt_oss_experts,
    save_gpt_oss_experts,
    to_gpt_oss,
)

E, H, I = 3, 64, 96  # noqa: E741


def gpt_oss_decode(blocks, scales):
    """The gpt-oss layout written out independently: byte j of block g holds elements 2j (low
    nibble) and 2j+1 (high nibble) of that block; value = E2M1[code] * 2^(scale - 127)."""
    lut = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    lo, hi = lut[(blocks & 0xF).long()], lut[(blocks >> 4).long()]
    vals = torch.stack([lo, hi], dim=-1).flatten(-2)  # [..., G, 32]
    vals = vals * torch.exp2(scales.float() - 127).unsqueeze(-1)
    return vals.flatten(-2)


def synthetic_gpt_oss_layer(layer, gen):
    """gpt-oss tensors for one layer, built directly in gpt-oss's own layout."""
    n = gpt_oss_expert_names(layer)
    w1 = torch.randn(E, 2 * I, H, generator=gen)
    w2 = torch.randn(E, H, I, generator=gen)
    p1, s1 = quantize_mxfp4(w1, backend="torch")
    p2, s2 = quantize_mxfp4(w2, backend="torch")
    return {
        n["w1"]: p1.reshape(E, 2 * I, H // 32, 16),
        n["w1_scale"]: s1,
        n["bias1"]: torch.randn(E, 2 * I, generator=gen).bfloat16(),
        n["w2"]: p2.reshape(E, H, I // 32, 16),
        n["w2_scale"]: s2,
        n["bias2"]: torch.randn(E, H, generator=gen).bfloat16(),
    }


@pytest.fixture
def checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(5)
    tensors = {**synthetic_gpt_oss_layer(0, gen), **synthetic_gpt_oss_layer(1, gen)}
    tensors["model.embed_tokens.weight"] = torch.randn(10, H).bfloat16()  # an unrelated tensor
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def test_names_and_shapes_follow_gpt_oss():
    n = gpt_oss_expert_names(7)
    assert n["w1"] == "model.layers.7.mlp.experts.gate_up_proj_blocks"
    assert n["w1_scale"] == "model.layers.7.mlp.experts.gate_up_proj_scales"
    assert n["bias1"] == "model.layers.7.mlp.experts.gate_up_proj_bias"
    assert n["w2"] == "model.layers.7.mlp.experts.down_proj_blocks"
    assert n["w2_scale"] == "model.layers.7.mlp.experts.down_proj_scales"
    assert n["bias2"] == "model.layers.7.mlp.experts.down_proj_bias"


def test_load_interleaved_decodes_like_gpt_oss(checkpoint):
    path, tensors = checkpoint
    n = gpt_oss_expert_names(1)
    ex = load_gpt_oss_experts(path, layer=1)
    assert ex.gate_mode == "interleaved"
    assert ex.w1.shape == (E, 2 * I, H // 2) and ex.w1_scale.shape == (E, 2 * I, H // 32)
    assert ex.w2.shape == (E, H, I // 2) and ex.w2_scale.shape == (E, H, I // 32)
    assert ex.bias1.dtype == ex.bias2.dtype == torch.float32
    assert torch.equal(
        dequantize_mxfp4(ex.w1, ex.w1_scale, torch.float32), gpt_oss_decode(tensors[n["w1"]], tensors[n["w1_scale"]])
    )
    assert torch.equal(
        dequantize_mxfp4(ex.w2, ex.w2_scale, torch.float32), gpt_oss_decode(tensors[n["w2"]], tensors[n["w2_scale"]])
    )
    assert torch.equal(ex.bias1, tensors[n["bias1"]].float())


def test_separated_rows_give_the_same_expert(checkpoint):
    path, _ = checkpoint
    inter = load_gpt_oss_experts(path, layer=0, gate_mode="interleaved")
    sep = load_gpt_oss_experts(path, layer=0, gate_mode="separated")
    assert sep.gate_mode == "separated"
    x = torch.randn(5, H)
    for e in range(E):
        outs = []
        for ex in (inter, sep):
            w1 = dequantize_mxfp4(ex.w1[e], ex.w1_scale[e], torch.float32)
            h = x @ w1.T + ex.bias1[e]
            outs.append(gated_activation(h, "swiglu_oai", ex.gate_mode))
        assert torch.equal(outs[0], outs[1])
    # the gate rows of the separated layout are the even rows of gpt-oss's
    assert torch.equal(sep.w1[:, :I], inter.w1[:, 0::2]) and torch.equal(sep.w1[:, I:], inter.w1[:, 1::2])
    assert torch.equal(sep.w1_scale[:, I:], inter.w1_scale[:, 1::2])
    assert torch.equal(sep.bias1[:, :I], inter.bias1[:, 0::2])
    assert torch.equal(sep.w2, inter.w2) and torch.equal(sep.bias2, inter.bias2)


@pytest.mark.parametrize("gate_mode", ["interleaved", "separated"])
def test_round_trip_bytes(checkpoint, tmp_path, gate_mode):
    path, tensors = checkpoint
    ex = load_gpt_oss_experts(path, layer=1, gate_mode=gate_mode)
    out = to_gpt_oss(ex, layer=1)
    for name, t in out.items():
        assert t.dtype == tensors[name].dtype and torch.equal(t, tensors[name]), name
    save_gpt_oss_experts(tmp_path / "again.safetensors", {1: ex})
    back = load_file(str(tmp_path / "again.safetensors"))
    assert set(back) == set(out) and all(torch.equal(back[k], out[k]) for k in out)


def test_sharded_directory_with_index(checkpoint, tmp_path):
    _, tensors = checkpoint
    names = sorted(tensors)
    shard_a = {k: tensors[k] for k in names[::2]}
    shard_b = {k: tensors[k] for k in names[1::2]}
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file(shard_a, str(d / "model-00001-of-00002.safetensors"))
    save_file(shard_b, str(d / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in shard_a}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in shard_b})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ex = load_gpt_oss_experts(d, layer=0, gate_mode="separated")
    ref = from_gpt_oss(tensors, layer=0, gate_mode="separated")
    for f in ("w1", "w1_scale", "w2", "w2_scale", "bias1", "bias2"):
        assert torch.equal(getattr(ex, f), getattr(ref, f)), f


def test_without_bias_and_kwargs(checkpoint):
    _, tensors = checkpoint
    n = gpt_oss_expert_names(0)
    no_bias = {k: v for k, v in tensors.items() if k not in (n["bias1"], n["bias2"])}
    ex = from_gpt_oss(no_bias, layer=0)
    assert ex.bias1 is None and ex.bias2 is None
    kw = ex.fused_moe_kwargs()
    assert kw["quant"] == "mxfp4" and kw["gate_mode"] == "interleaved" and kw["activation"] == "swiglu_oai"
    assert set(to_gpt_oss(ex, 0)) == {n["w1"], n["w1_scale"], n["w2"], n["w2_scale"]}


def test_bad_input(checkpoint, tmp_path):
    _, tensors = checkpoint
    n = gpt_oss_expert_names(0)
    with pytest.raises(ValueError, match="missing"):
        from_gpt_oss({k: v for k, v in tensors.items() if k != n["w2"]}, layer=0)
    with pytest.raises(ValueError, match="gate_mode"):
        from_gpt_oss(tensors, layer=0, gate_mode="paired")
    bad = dict(tensors)
    bad[n["w1_scale"]] = tensors[n["w1_scale"]][:, :, :1]
    with pytest.raises(ValueError, match="scales"):
        from_gpt_oss(bad, layer=0)
    bad = dict(tensors)
    bad[n["w1"]] = tensors[n["w1"]].reshape(E, 2 * I, H // 64, 32)
    with pytest.raises(ValueError, match="gate_up_proj_blocks"):
        from_gpt_oss(bad, layer=0)
    bad = dict(tensors)
    bad[n["bias1"]] = tensors[n["bias1"]][:, :5]
    with pytest.raises(ValueError, match="bias1"):
        from_gpt_oss(bad, layer=0)
    with pytest.raises(ValueError, match="path"):
        load_gpt_oss_experts(tmp_path / "nothing_here", layer=0)
    with pytest.raises(ValueError, match="layer"):
        gpt_oss_expert_names(-1)
    ex = from_gpt_oss(tensors, layer=0)
    with pytest.raises(ValueError, match="w2"):
        to_gpt_oss(MXFP4Experts(ex.w1, ex.w1_scale, ex.w2[:, :4], ex.w2_scale[:, :4]), layer=0)
