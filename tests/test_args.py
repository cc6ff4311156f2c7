"""MoEArgs defaults, validation and from_hf_config on the four HF families (SPEC 4)."""

import dataclasses

import pytest
import torch

from moeprec import MoEArgs, TokenChoiceTopKRouter
from moeprec.args import hf_family, hf_moe_dims

transformers = pytest.importorskip("transformers")

SPEC_DEFAULTS = dict(
    num_experts=8, num_shared_experts=0, top_k=1, score_func="softmax", route_norm=False,
    route_scale=1.0, score_before_experts=False, num_expert_groups=None, num_limited_groups=None,
    load_balance_coeff=None, aux_loss_coeff=0.0, z_loss_coeff=0.0, router_dtype=None,
    activation="silu", gate_mode="separated", swiglu_alpha=1.702, swiglu_limit=7.0, mlp_bias=False,
)


def test_defaults_are_the_spec_ones():
    args = MoEArgs()
    for name, want in SPEC_DEFAULTS.items():
        assert getattr(args, name) == want, name
    assert dataclasses.is_dataclass(args)
    assert args.gate_bias is False  # the one field beyond SPEC 4's list


def test_router_dtype_is_normalized():
    assert MoEArgs(router_dtype="fp32").router_dtype is torch.float32
    assert MoEArgs(router_dtype=torch.float64).router_dtype is torch.float64


@pytest.mark.parametrize(
    "kw, exc, words",
    [
        (dict(router_dtype="bf16"), ValueError, ["moe_router_dtype", "bf16"]),
        (dict(top_k=9), ValueError, ["top_k", "9"]),
        (dict(score_func="tanh"), ValueError, ["score_func", "tanh"]),
        (dict(activation="gelu"), ValueError, ["activation", "gelu"]),
        (dict(gate_mode="mixed"), ValueError, ["gate_mode", "mixed"]),
        (dict(num_expert_groups=3, num_limited_groups=1), ValueError, ["num_expert_groups", "3"]),
        (dict(num_expert_groups=4, num_limited_groups=5), ValueError, ["num_limited_groups", "5"]),
        (dict(num_shared_experts=-1), ValueError, ["num_shared_experts", "-1"]),
        (dict(route_scale=None), TypeError, ["route_scale", "None"]),
        (dict(mlp_bias="no"), TypeError, ["mlp_bias", "no"]),
    ],
)
def test_bad_args(kw, exc, words):
    with pytest.raises(exc) as info:
        MoEArgs(**kw)
    for w in words:
        assert w in str(info.value)


def _configs():
    t = transformers
    return {
        "qwen3_moe": t.Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=24, num_experts=16,
                                      num_experts_per_tok=4, norm_topk_prob=True),
        "mixtral": t.MixtralConfig(hidden_size=32, intermediate_size=40, num_local_experts=8,
                                   num_experts_per_tok=2),
        "gpt_oss": t.GptOssConfig(hidden_size=32, intermediate_size=48, num_local_experts=8,
                                  num_experts_per_tok=4, swiglu_limit=5.0),
        "deepseek_v3": t.DeepseekV3Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16,
                                          num_experts_per_tok=4, n_group=4, topk_group=2,
                                          n_shared_experts=2, routed_scaling_factor=2.5),
    }


EXPECTED = {
    "qwen3_moe": dict(num_experts=16, top_k=4, score_func="softmax", route_norm=True),
    "mixtral": dict(num_experts=8, top_k=2, score_func="softmax", route_norm=True),
    "gpt_oss": dict(num_experts=8, top_k=4, route_norm=True, activation="swiglu_oai",
                    gate_mode="interleaved", swiglu_limit=5.0, swiglu_alpha=1.702, mlp_bias=True,
                    gate_bias=True),
    "deepseek_v3": dict(num_experts=16, top_k=4, score_func="sigmoid", route_norm=True,
                        route_scale=2.5, num_expert_groups=4, num_limited_groups=2,
                        num_shared_experts=2, load_balance_coeff=1e-3),
}
DIMS = {"qwen3_moe": (32, 24), "mixtral": (32, 40), "gpt_oss": (32, 48), "deepseek_v3": (32, 16)}


@pytest.mark.parametrize("family", list(EXPECTED))
@pytest.mark.parametrize("as_dict", [False, True])
def test_from_hf_config(family, as_dict):
    cfg = _configs()[family]
    if as_dict:
        cfg = cfg.to_dict()
    args = MoEArgs.from_hf_config(cfg, router_dtype="fp32")
    assert args.router_dtype is torch.float32
    for name, want in EXPECTED[family].items():
        assert getattr(args, name) == want, name
    defaults = MoEArgs()
    for name in ("score_before_experts", "z_loss_coeff", "aux_loss_coeff"):
        assert getattr(args, name) == getattr(defaults, name)
    assert hf_moe_dims(cfg) == DIMS[family]
    assert hf_family(cfg) == family


def test_from_hf_config_raw_json_dicts_without_model_type():
    # config.json spellings: Qwen3 uses "num_experts"; model_type missing -> inferred from keys
    qwen = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                norm_topk_prob=True)
    assert MoEArgs.from_hf_config(qwen).num_experts == 128 and hf_family(qwen) == "qwen3_moe"
    ds = dict(hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256,
              num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1,
              routed_scaling_factor=2.5, scoring_func="sigmoid", norm_topk_prob=True)
    args = MoEArgs.from_hf_config(ds)
    assert (args.num_experts, args.num_expert_groups, args.route_scale) == (256, 8, 2.5)
    mix = dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2)
    assert hf_family(mix) == "mixtral" and hf_moe_dims(mix) == (4096, 14336)
    oss = dict(hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4,
               swiglu_limit=7.0)
    assert MoEArgs.from_hf_config(oss).activation == "swiglu_oai"


def test_aux_loss_follows_output_router_logits():
    cfg = dict(model_type="mixtral", num_local_experts=8, num_experts_per_tok=2,
               router_aux_loss_coef=0.02, output_router_logits=True)
    assert MoEArgs.from_hf_config(cfg).aux_loss_coeff == 0.02
    cfg["output_router_logits"] = False
    assert MoEArgs.from_hf_config(cfg).aux_loss_coeff == 0.0


def test_deepseek_single_group_is_no_grouping():
    cfg = dict(model_type="deepseek_v3", n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1)
    args = MoEArgs.from_hf_config(cfg)
    assert args.num_expert_groups is None and args.num_limited_groups is None


@pytest.mark.parametrize(
    "cfg, exc, words",
    [
        ([1, 2], TypeError, ["cfg", "list"]),
        (dict(model_type="llama", hidden_size=8), ValueError, ["cfg", "llama"]),
        (dict(model_type="deepseek_v2", n_routed_experts=64, num_experts_per_tok=6), ValueError, ["cfg", "deepseek_v2"]),
        (dict(hidden_size=8), ValueError, ["cfg", "None"]),
        (dict(model_type="mixtral", num_local_experts=8), ValueError, ["cfg", "num_experts_per_tok"]),
    ],
)
def test_from_hf_config_bad_input(cfg, exc, words):
    with pytest.raises(exc) as info:
        MoEArgs.from_hf_config(cfg)
    for w in words:
        assert w in str(info.value)


# ------------------------------------------------ routing parity with the transformers routers


def _hf_router(family, cfg):
    mods = {
        "qwen3_moe": ("qwen3_moe", "Qwen3MoeTopKRouter"),
        "mixtral": ("mixtral", "MixtralTopKRouter"),
        "gpt_oss": ("gpt_oss", "GptOssTopKRouter"),
        "deepseek_v3": ("deepseek_v3", "DeepseekV3TopkRouter"),
    }
    module, name = mods[family]
    import importlib

    cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name, None)
    if cls is None:
        pytest.skip(f"this transformers has no {name}")
    return cls(cfg)


@pytest.mark.parametrize("family", list(EXPECTED))
def test_routing_matches_transformers(family):
    cfg = _configs()[family]
    args = MoEArgs.from_hf_config(cfg, router_dtype="fp32")
    dim, _ = hf_moe_dims(cfg)
    ours = TokenChoiceTopKRouter(
        dim, args.num_experts, args.top_k, args.score_func, args.route_norm, args.route_scale,
        args.router_dtype, args.num_expert_groups, args.num_limited_groups, args.gate_bias,
    )
    hf = _hf_router(family, cfg)
    with torch.no_grad():
        hf.weight.normal_(0, 0.3)
        ours.gate.weight.copy_(hf.weight)
        if args.gate_bias:
            hf.bias.normal_(0, 0.3)
            ours.gate.bias.copy_(hf.bias)
        bias = None
        if family == "deepseek_v3":
            hf.e_score_correction_bias.normal_(0, 0.05)
            bias = hf.e_score_correction_bias.clone()
    x = torch.randn(64, dim)
    _, hf_weights, hf_idx = hf(x)
    out = ours.route(x, expert_bias=bias)
    # compare per token as {expert: weight}, independent of the order top-k returns them in
    order_ours = out.selected_experts.argsort(dim=-1)
    order_hf = hf_idx.argsort(dim=-1)
    assert torch.equal(out.selected_experts.gather(1, order_ours), hf_idx.gather(1, order_hf))
    torch.testing.assert_close(
        out.top_scores.gather(1, order_ours), hf_weights.float().gather(1, order_hf), rtol=1e-5, atol=1e-6
    )
