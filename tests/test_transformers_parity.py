"""moeprec.MoE loaded from Hugging Face transformers MoE blocks gives their outputs (fp32, tight)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moeprec import MoE, MoEArgs  # noqa: E402
from moeprec.integrations.transformers import (  # noqa: E402
    convert_hf_moe_state_dict,
    load_hf_moe_block,
    moe_args_from_hf,
    moe_from_hf,
)

H, I = 32, 16


def _qwen3(norm_topk_prob):
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=8, num_experts_per_tok=2,
                         norm_topk_prob=norm_topk_prob)
    return Qwen3MoeSparseMoeBlock(cfg), cfg


def _mixtral():
    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=4, num_experts_per_tok=2)
    return MixtralSparseMoeBlock(cfg), cfg


def _gpt_oss():
    from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    cfg = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=4, num_experts_per_tok=2)
    return GptOssMLP(cfg), cfg


def _deepseek_v3():
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=8, num_experts_per_tok=2,
                           n_group=4, topk_group=2, n_shared_experts=1)
    return DeepseekV3MoE(cfg), cfg


BLOCKS = {
    "qwen3_moe": lambda: _qwen3(False),
    "qwen3_moe_norm": lambda: _qwen3(True),
    "mixtral": _mixtral,
    "gpt_oss": _gpt_oss,
    "deepseek_v3": _deepseek_v3,
}


def _randomize(block, std=0.3):
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, std)
        for name, b in block.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.05)
    return block


def _hf_forward(block, x):
    out = block(x)
    return out[0] if isinstance(out, tuple) else out  # GptOssMLP returns (out, router_scores)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_matches_hf_block(name):
    block, cfg = BLOCKS[name]()
    _randomize(block).eval()
    # scale the inputs so the gpt-oss SwiGLU clamps (limit 7) are reached for some units
    x = torch.randn(3, 5, H) * (4.0 if name == "gpt_oss" else 1.0)
    with torch.no_grad():
        want = _hf_forward(block, x)
        moe = moe_from_hf(block, cfg).eval()
        got = moe(x)
    assert isinstance(moe, MoE) and got.shape == want.shape
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if name == "gpt_oss":
        a, b = moe.experts, block.experts
        h = torch.einsum("th,ehi->eti", x.reshape(-1, H), b.gate_up_proj) + b.gate_up_proj_bias[:, None]
        assert (h[..., 0::2] > 7).any(), "test inputs never reach the gate clamp"
        assert a.gate_mode == "interleaved" and a.activation == "swiglu_oai"


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_matches_hf_block_gradients(name):
    block, cfg = BLOCKS[name]()
    _randomize(block)
    moe = moe_from_hf(block, cfg)
    x = torch.randn(2, 6, H)
    g = torch.randn(2, 6, H)
    _hf_forward(block, x).backward(g)
    moe(x).backward(g)
    want = convert_hf_moe_state_dict({k: p.grad for k, p in block.named_parameters()})
    assert want.keys() == dict(moe.named_parameters()).keys()
    for key, grad in want.items():
        torch.testing.assert_close(dict(moe.named_parameters())[key].grad, grad, rtol=1e-4, atol=1e-5, msg=key)


def test_args_from_config():
    _, cfg = _gpt_oss()
    args, dim, hidden = moe_args_from_hf(cfg)
    assert (dim, hidden) == (H, I)
    assert args.activation == "swiglu_oai" and args.gate_mode == "interleaved" and args.mlp_bias
    _, cfg = _qwen3(True)
    args, _, _ = moe_args_from_hf(cfg, router_dtype="fp32")
    assert args.route_norm and args.router_dtype == torch.float32 and args.num_experts == 8


def test_transformers4_module_list_layout():
    """Per-expert nn.Linear lists (transformers 4.x Mixtral names) convert to the same weights."""
    block, cfg = _mixtral()
    _randomize(block)
    sd = {"gate.weight": block.gate.weight.detach()}
    for e in range(4):
        gate, up = block.experts.gate_up_proj[e].detach().chunk(2)
        sd[f"experts.{e}.w1.weight"] = gate
        sd[f"experts.{e}.w3.weight"] = up
        sd[f"experts.{e}.w2.weight"] = block.experts.down_proj[e].detach()
    conv = convert_hf_moe_state_dict(sd)
    torch.testing.assert_close(conv["experts.w1"], block.experts.gate_up_proj.detach())
    torch.testing.assert_close(conv["experts.w2"], block.experts.down_proj.detach())


def test_bf16_block_keeps_dtype_and_fp32_buffers():
    block, cfg = _deepseek_v3()
    _randomize(block)
    block = block.to(torch.bfloat16)
    moe = moe_from_hf(block, cfg, router_dtype="fp32")
    assert moe.experts.w1.dtype == torch.bfloat16
    assert moe.expert_bias.dtype == torch.float32 and moe.tokens_per_expert.dtype == torch.float32
    assert moe.router.gate.router_dtype == torch.float32


def test_bad_input():
    block, cfg = _qwen3(False)
    with pytest.raises(ValueError, match="hf_block"):
        load_hf_moe_block(MoE(MoEArgs(num_experts=4, top_k=2), H, I), block)  # 4 experts vs 8
    with pytest.raises(TypeError, match="moe"):
        load_hf_moe_block(block, block)
    with pytest.raises(ValueError, match="hf_block"):
        convert_hf_moe_state_dict({"mlp.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="family"):
        convert_hf_moe_state_dict({"gate.weight": torch.zeros(1)}, family="llama")


@pytest.mark.parametrize(
    "sd, missing",
    [
        ({"router.weight": torch.zeros(2, 2)}, "router.bias"),
        ({"gate.weight": torch.zeros(2, 2)}, "experts.gate_up_proj"),
    ],
)
def test_incomplete_block_names_the_missing_tensor(sd, missing):
    # used to be a bare KeyError
    with pytest.raises(ValueError, match="hf_block") as info:
        convert_hf_moe_state_dict(sd)
    assert repr(missing) in str(info.value)


def test_moe_from_hf_bad_block():
    _, cfg = _qwen3(False)
    with pytest.raises(TypeError, match="hf_block"):
        moe_from_hf({"gate.weight": torch.zeros(1)}, cfg)  # used to be AttributeError
    with pytest.raises(ValueError, match="hf_block"):
        moe_from_hf(torch.nn.Module(), cfg)  # no parameters: used to be StopIteration
