"""`moeprec demo`: what the precision knobs change, shown on a model-sized example.

`run` walks through SECTIONS in order; each section is a function (args, DemoContext) -> None
that prints its own part. A later feature adds its part by appending a function to SECTIONS.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from moeprec.cli._common import error_metrics, format_table, parse_device  # as `moeprec report`
from moeprec.cli.presets import PRESETS
from moeprec.routing.diagnostics import topk_set_flip_rate


@dataclass
class DemoContext:
    """What sections share: the device, a seed, and results earlier sections left for later ones."""

    device: torch.device
    seed: int
    results: dict[str, Any] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)

    def generator(self) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.seed)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (GPU when present)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens for the router section (default 4096; 512 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layer", choices=sorted(LAYERS), default="qwen3-30b-a3b",
                        help="routing of the MoE layer section (default qwen3-30b-a3b)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny layer dims, fewer tokens (same routing and tables)")


def _router_tokens(args: argparse.Namespace) -> int:
    if args.tokens is not None:
        return args.tokens
    return 512 if getattr(args, "quick", False) else 4096


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int = 3) -> tuple[Any, float]:
    """(result, median milliseconds) of fn() after one warm-up call."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return out, statistics.median(times)


def router_precision(args: argparse.Namespace, ctx: DemoContext) -> None:
    """Route the same tokens with a bf16, an fp32 and an fp64 router gate (Qwen3-30B-A3B shape)."""
    from moeprec import TokenChoiceTopKRouter

    qwen = PRESETS["qwen3-30b-a3b"]
    dim, num_experts, top_k = qwen.hidden, qwen.experts, qwen.top_k
    tokens = _router_tokens(args)
    print(f"== Router precision: Qwen3-30B-A3B router shape (D={dim}, E={num_experts}, top-{top_k}), "
          f"{tokens} tokens, bf16 model, {ctx.device} ==")
    gen = ctx.generator()
    # Unit-variance hidden states (post-RMSNorm scale) and std-0.02 gate weights: logits of
    # std ~0.9, where the 8th and 9th best experts are often closer than bf16's resolution.
    x = torch.randn(tokens, dim, generator=gen).to(ctx.device, torch.bfloat16)
    weight = (torch.randn(num_experts, dim, generator=gen) * 0.02).to(torch.bfloat16)

    outs, times = {}, {}
    for label, router_dtype in (("bf16 (None)", None), ("fp32", "fp32"), ("fp64", "fp64")):
        router = TokenChoiceTopKRouter(dim, num_experts, top_k, router_dtype=router_dtype)
        router = router.to(ctx.device, torch.bfloat16)
        with torch.no_grad():
            router.gate.weight.copy_(weight)
            outs[label], times[label] = _timed(lambda r=router: r.route(x), ctx.device)

    ref = outs["fp64"]
    rows = []
    for label, out in outs.items():
        flips = topk_set_flip_rate(out.selected_experts, ref.selected_experts)
        score_err = (out.scores.double() - ref.scores).abs().max().item()
        logit_err = (out.logits.double() - ref.logits).abs().max().item()
        rows.append([
            label, str(out.logits.dtype).replace("torch.", ""), f"{flips * 100:.2f}%",
            f"{logit_err:.2e}", f"{score_err:.2e}", f"{times[label]:.1f}",
        ])
        ctx.results.setdefault("router_flip_rate", {})[label] = flips
    print(format_table(
        ["router dtype", "logits", "top-k set flips vs fp64", "max logit err", "max score err",
         "time ms"], rows))
    print("Same bf16 inputs and weights in every row: only the gate GEMM's output precision differs.\n"
          "bf16 logits keep 8 significant bits, so near-tied experts swap; the fp32 router's logits\n"
          "differ from fp64 only by summation order (set router_dtype / PrecisionConfig.moe_router_dtype).")
    if ctx.device.type != "cuda":
        print("Times: CPU runs the upcast reference; on CUDA the fp32 router runs bf16 tensor-core\n"
              "GEMMs with fp32 output (see benchmarks/bench_router.py).")
    print()


# ------------------------------------------------------------------------- MoE layer end to end


@dataclass(frozen=True)
class LayerPreset:
    """An HF-style config of a real model, with the dims shrunk so that the CPU demo is quick."""

    title: str
    hf_config: dict[str, Any]
    scale: str  # how the dims relate to the real model's, for the heading
    quick_dims: tuple[int, int]  # (hidden_size, expert intermediate size) under --quick


# HF config keys of the expert intermediate size and the expert count, per model_type.
_HF_KEYS = {"qwen3_moe": ("moe_intermediate_size", "num_experts"),
            "gpt_oss": ("intermediate_size", "num_local_experts")}


def _layer_preset(model: str, title: str, model_type: str, shrink: int, quick_dims: tuple[int, int],
                  **hf_extra: Any) -> LayerPreset:
    """PRESETS[model] as an HF config of `model_type`, hidden and intermediate sizes / `shrink`."""
    s = PRESETS[model]
    inter_key, experts_key = _HF_KEYS[model_type]
    cfg = {"model_type": model_type, "hidden_size": s.hidden // shrink, inter_key: s.intermediate // shrink,
           experts_key: s.experts, "num_experts_per_tok": s.top_k, **hf_extra}
    return LayerPreset(title, cfg, f"1/{shrink} of {s.hidden} / {s.intermediate}", quick_dims)


# Routing (experts, top-k, score function, aux loss) is the real model's; only the widths are
# cut, to multiples of 32 so the experts can be quantized to MXFP4.
LAYERS: dict[str, LayerPreset] = {
    "qwen3-30b-a3b": _layer_preset(
        "qwen3-30b-a3b", "Qwen3-30B-A3B-like", "qwen3_moe", 8, (64, 32),
        norm_topk_prob=True, router_aux_loss_coef=0.001, output_router_logits=True,
    ),
    "gpt-oss-20b": _layer_preset(
        "gpt-oss-20b", "gpt-oss-20b-like", "gpt_oss", 10, (64, 64),
        router_aux_loss_coef=0.9, output_router_logits=True, swiglu_limit=7.0,
    ),
}

_ACTS = ("bf16", "fp8", "fp4")


def _progress(ctx: DemoContext, msg: str) -> None:
    """A progress line on stderr (the tables go to stdout)."""
    print(f"[demo {time.perf_counter() - ctx.t0:5.1f}s] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _env(values: dict[str, str | None]) -> Iterator[None]:
    """Set (or unset, for None) env vars for the duration of a block, then restore them."""
    def apply(env: dict[str, str | None]) -> None:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    saved = {k: os.environ.get(k) for k in values}
    try:
        apply(values)
        yield
    finally:
        apply(saved)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run a block on one CPU thread (no-op on GPU), then restore the thread count.

    The CPU reference of a 128-expert layer is thousands of small ops: OpenMP's fork/join costs
    more than it saves on them, and on a busy machine 2 threads ran the layer section 4x slower
    than 1 (measured).
    """
    if device.type != "cpu":
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return error_metrics(out, ref)["rel_l2"]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.0f}x" if b > 0 else "infinitely"


def _same_sets(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of tokens whose top-k expert SETS agree."""
    return 1.0 - topk_set_flip_rate(a, b)


def _build_layers(args: argparse.Namespace, ctx: DemoContext):
    """(preset, MoEArgs, dims, fp32 reference MoE, bf16 MoE): same weights, bf16-representable."""
    from moeprec import MoE, MoEArgs, PrecisionConfig
    from moeprec.args import hf_moe_dims

    preset = LAYERS[args.layer]
    cfg = dict(preset.hf_config)
    if args.quick:
        dim, hidden = preset.quick_dims
        cfg["hidden_size"] = dim
        cfg["moe_intermediate_size" if "moe_intermediate_size" in cfg else "intermediate_size"] = hidden
    moe_args = MoEArgs.from_hf_config(cfg)
    dim, hidden = hf_moe_dims(cfg)
    precision = PrecisionConfig(moe_router_dtype="fp32")
    # init_weights draws from the global RNG: fork it so the demo neither depends on nor
    # disturbs the caller's random state; build on CPU so every device gets the same weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        ref = MoE(moe_args, dim, hidden, precision=precision)
        ref.init_weights()
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if name.endswith(("b1", "b2")) or name.endswith("gate.bias"):
                    p.normal_(0.0, 0.02)  # init_weights zeroes biases: give the bias path signal
                # bf16-representable fp32 weights: the fp32 and bf16 layers hold the SAME
                # numbers, so every difference below is compute precision or quantization.
                p.copy_(p.bfloat16().float())
    ref = ref.to(ctx.device).eval()
    bf16 = copy.deepcopy(ref).to(torch.bfloat16)
    return preset, moe_args, (dim, hidden), ref, bf16


def _with_router(layer, router_dtype):
    """A copy of `layer` (same weights) whose router GEMM runs in `router_dtype`."""
    from moeprec import MoE, PrecisionConfig

    p = dataclasses.replace(layer.precision, moe_router_dtype=router_dtype)
    twin = MoE(layer.args, layer.dim, layer.hidden_dim, precision=p)
    twin = twin.to(device=layer.tokens_per_expert.device, dtype=layer.router.gate.weight.dtype)
    twin.load_state_dict(layer.state_dict())
    return twin.train(layer.training)


def _layer_forward(ref, bf16, x):
    """Forward of the fp32 layer and two bf16 layers (fp32 / bf16 router): routing and error."""
    bf16_router = _with_router(bf16, None)
    rows, res = [], {}
    with torch.no_grad():
        ref_out = ref(x.float())
        ref_sel = ref.router.route(x.float(), ref.expert_bias).selected_experts
        for label, layer in (
            ("fp32 reference", ref),
            ('bf16, moe_router_dtype="fp32"', bf16),
            ("bf16, moe_router_dtype=None", bf16_router),
        ):
            xin = x.float() if layer is ref else x
            out = layer(xin)
            routed = layer.router.route(xin, layer.expert_bias)
            same = _same_sets(routed.selected_experts, ref_sel)
            err = _rel_l2(out, ref_out)
            res[label] = {"same_topk": same, "rel_l2": err, "logits": str(routed.logits.dtype)}
            rows.append([label, str(routed.logits.dtype).replace("torch.", ""),
                         f"{same * 100:.2f}%", f"{err:.2e}"])
    print(format_table(["layer", "router logits", "top-k sets = fp32 layer's", "rel L2 err vs fp32"], rows))
    return res


def _train_step(layer, x):
    """One forward + backward on a toy loss (mean square of the output) plus the aux loss."""
    layer.train()
    layer.zero_grad(set_to_none=True)
    layer.tokens_per_expert.zero_()
    out = layer(x)
    loss = out.float().square().mean()
    aux = layer.aux_loss
    if aux is not None:
        loss = loss + aux
    loss.backward()
    return out, aux


def _layer_train(ref, bf16, x, moe_args):
    """A training step of the bf16 layer; gate gradients against the fp32 layer's."""
    t = x.shape[0]
    layers = {"fp32": copy.deepcopy(ref), "bf16/fp32 router": copy.deepcopy(bf16),
              "bf16/bf16 router": _with_router(bf16, None)}
    aux = {}
    for name, layer in layers.items():
        _, loss = _train_step(layer, x.float() if name == "fp32" else x)
        aux[name] = None if loss is None else loss.item()
    ref_grad = layers["fp32"].router.gate.weight.grad
    main = layers["bf16/fp32 router"]
    g = main.router.gate.weight.grad
    counts = main.tokens_per_expert
    with torch.no_grad():
        logits_dtype = main.router.route(x, main.expert_bias).logits.dtype
    grad_err = {k: _rel_l2(v.router.gate.weight.grad, ref_grad) for k, v in layers.items() if k != "fp32"}
    rows = [
        ["model dtype (gate weight)", str(main.router.gate.weight.dtype).replace("torch.", "")],
        ["router logits / scores", str(logits_dtype).replace("torch.", "")],
        ["gate weight grad dtype", str(g.dtype).replace("torch.", "")],
        ["expert w1 grad dtype", str(main.experts.w1.grad.dtype).replace("torch.", "")],
        ["tokens_per_expert: sum (= T*k)", f"{counts.sum().item():.0f} (= {t}*{moe_args.top_k})"],
        ["tokens_per_expert: min / mean / max",
         f"{counts.min().item():.0f} / {counts.mean().item():.1f} / {counts.max().item():.0f}"],
        ["aux loss (switch, coeff " + f"{moe_args.aux_loss_coeff:g})",
         "not configured" if aux["bf16/fp32 router"] is None else f"{aux['bf16/fp32 router']:.4g}"],
        ["gate grad rel err vs fp32 layer: fp32 router", f"{grad_err['bf16/fp32 router']:.2e}"],
        ["gate grad rel err vs fp32 layer: bf16 router", f"{grad_err['bf16/bf16 router']:.2e}"],
    ]
    print(format_table(["training step (bf16 layer, fp32 router)", "value"], rows))
    return {
        "model_dtype": main.router.gate.weight.dtype, "gate_grad_dtype": g.dtype,
        "logits_dtype": logits_dtype, "token_count_sum": counts.sum().item(), "tokens": t,
        "top_k": moe_args.top_k, "aux_loss": aux["bf16/fp32 router"], "gate_grad_err": grad_err,
    }


def _ran(outs: dict[str, torch.Tensor], auto: torch.Tensor) -> str:
    """Which act dtype's output the auto run reproduced: the nearest one, if within 1% (rel L2)."""
    diffs = {a: _rel_l2(auto, o) for a, o in outs.items()}
    best = min(diffs, key=diffs.get)
    # Another batch size may sum in another order and round a few bf16 outputs the other way:
    # that is ~1e-3; distinct act dtypes differ by several percent.
    return best if diffs[best] < 1e-2 else "?"


def _explicit_outputs(layer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The quantized layer's output with each act dtype forced through its PrecisionConfig."""
    base = layer.precision
    outs = {}
    try:
        with torch.no_grad():
            for act in _ACTS:
                layer.precision = dataclasses.replace(base, act_dtype=act)
                outs[act] = layer(x)
    finally:
        layer.precision = base
    return outs


def _quantized_sweep(ctx, bf16, ref, x_all, token_counts, quants):
    """Errors per (weights, act dtype) on all tokens; per token count, the policy's pick and
    which act dtype the layer (act_dtype "auto") actually ran."""
    from moeprec import select_act_dtype

    n = x_all.shape[0]
    with torch.no_grad():
        ref_out = ref(x_all.float())
        dense_err = _rel_l2(bf16(x_all), ref_out)
    layers, explicit, err_rows, res = {}, {}, [], {"errors": {}, "policy": {}}
    err_rows.append(["bf16 (not quantized)", f"{dense_err:.2e}", "-", "-"])
    res["errors"]["none"] = {"bf16": dense_err}
    for quant in quants:
        _progress(ctx, f"layer: {quant} experts: quantize, then {n} tokens with act bf16/fp8/fp4")
        layers[quant] = layer = copy.deepcopy(bf16).eval().quantize_(quant)
        explicit[quant] = _explicit_outputs(layer, x_all)
        errs = {a: _rel_l2(o, ref_out) for a, o in explicit[quant].items()}
        res["errors"][quant] = errs
        err_rows.append([quant] + [f"{errs[a]:.2e}" for a in _ACTS])
    print(format_table([f"experts ({n} tokens): rel L2 err vs fp32", "act bf16", "act fp8", "act fp4"],
                 err_rows))

    pol_rows = []
    for quant, layer in layers.items():
        _progress(ctx, f"layer: {quant} experts, act_dtype auto at {len(token_counts)} token counts")
        for m in token_counts:
            with torch.no_grad():
                auto = layer(x_all[:m])  # the layer's PrecisionConfig: act_dtype "auto"
            policy = select_act_dtype(m, quant=quant, device=ctx.device)
            # Rows are independent (per-token activation scales), so the first m rows of the
            # all-token runs are what each act dtype gives these m tokens.
            ran = _ran({a: o[:m] for a, o in explicit[quant].items()}, auto)
            res["policy"][(quant, m)] = {"policy": policy, "ran": ran,
                                         "auto_error": _rel_l2(auto, ref_out[:m])}
            pol_rows.append([quant, str(m), policy, ran, f"{res['policy'][(quant, m)]['auto_error']:.2e}"])
    print("The layer as built (PrecisionConfig act_dtype \"auto\") at token counts around the bound:")
    print(format_table(["experts", "tokens", "select_act_dtype", "layer ran (act auto)", "rel L2 err"],
                 pol_rows))
    return layers, explicit, res


def _overrides(ctx, layer, x, outs_of):
    """The mxfp4 layer at one token count under the deployment overrides of the policy."""
    from moeprec import select_act_dtype
    from moeprec.act_policy import ENV_BOUND, ENV_FORCE_BF16, resolve_act_dtype

    m = x.shape[0]
    base = layer.precision
    bound_src = f"{ENV_BOUND}={os.environ[ENV_BOUND]}" if ENV_BOUND in os.environ else "device default"
    no_force = {ENV_FORCE_BF16: None}
    no_env = {ENV_FORCE_BF16: None, ENV_BOUND: None}
    cfg_bound = dataclasses.replace(base, bf16_fp8_bound=m + 1)
    cases = [
        (f"as built ({bound_src})", no_force, base),
        (f"{ENV_FORCE_BF16}=1", {ENV_FORCE_BF16: "1"}, base),
        (f"{ENV_BOUND}={m + 1}", {**no_force, ENV_BOUND: str(m + 1)}, base),
        (f"{ENV_BOUND}=0", {**no_force, ENV_BOUND: "0"}, base),
        ("PrecisionConfig(force_bf16_act=True)", no_force,
         dataclasses.replace(base, force_bf16_act=True)),
        (f"PrecisionConfig(bf16_fp8_bound={m + 1})", no_env, cfg_bound),
        (f"PrecisionConfig(bf16_fp8_bound={m + 1}) + {ENV_BOUND}={m}",
         {**no_force, ENV_BOUND: str(m)}, cfg_bound),
    ]
    rows, res = [], {}
    for label, env, precision in cases:
        with _env(env), torch.no_grad():
            if precision is base:
                pick = select_act_dtype(m, quant=layer.quant, device=ctx.device)
            else:  # a config field: what fused_moe resolves from it
                pick = resolve_act_dtype(m, quant=layer.quant, precision=precision, device=ctx.device)
            layer.precision = precision
            try:
                ran = _ran(outs_of, layer(x))
            finally:
                layer.precision = base
        res[label] = {"policy": pick, "ran": ran}
        rows.append([label, pick, ran])
    print(format_table([f"setting ({layer.quant} experts, {m} tokens)", "policy pick", "layer ran"], rows))
    return res


def moe_layer(args: argparse.Namespace, ctx: DemoContext) -> None:
    """MoE layer end to end: fp32 router in bf16 training, then quantized experts and act dtypes."""
    with _one_cpu_thread(ctx.device):
        _moe_layer(args, ctx)


def _moe_layer(args: argparse.Namespace, ctx: DemoContext) -> None:
    from moeprec import select_act_dtype
    from moeprec.act_policy import ENV_BOUND, ENV_FORCE_BF16, device_default_bound

    # The act-dtype bound in force: the env override if set (select_act_dtype validates it
    # first, so a malformed value fails here with its own message), else the device default.
    select_act_dtype(0, quant="mxfp4", device=ctx.device)
    env_bound = os.environ.get(ENV_BOUND)
    bound = int(env_bound) if env_bound is not None else device_default_bound(ctx.device)
    _progress(ctx, "layer: building")
    preset, moe_args, (dim, hidden), ref, bf16 = _build_layers(args, ctx)
    e, k = moe_args.num_experts, moe_args.top_k
    mlp = f"{moe_args.activation}, {moe_args.gate_mode} gate/up" + (", biases" if moe_args.mlp_bias else "")
    scale = "--quick dims" if args.quick else preset.scale
    print(f"== MoE layer end to end: {preset.title} routing (E={e}, top-{k}, {moe_args.score_func}"
          f"{' + renorm' if moe_args.route_norm else ''}), D={dim}, I={hidden} ({scale}), {mlp}, "
          f"{ctx.device} ==")
    print(f'moeprec.MoE(MoEArgs.from_hf_config(<{preset.hf_config["model_type"]} config>), {dim}, '
          f'{hidden}, precision=PrecisionConfig(moe_router_dtype="fp32")), init_weights, seed {ctx.seed}')

    cap = 1024 if args.quick else 4096
    counts = sorted({m for m in (bound // 8, bound - 1, bound, 2 * bound) if 1 <= m <= cap}) or [cap]
    fwd_tokens = 96 if args.quick else 384
    gen = ctx.generator()
    x_all = torch.randn(max(counts + [fwd_tokens]), dim, generator=gen).to(ctx.device, torch.bfloat16)
    x = x_all[:fwd_tokens]

    print(f"\n-- 1. forward, {fwd_tokens} tokens (eval) --")
    _progress(ctx, "layer: forward")
    res: dict[str, Any] = {"forward": _layer_forward(ref, bf16, x)}
    f32, b16 = res["forward"]['bf16, moe_router_dtype="fp32"'], res["forward"]["bf16, moe_router_dtype=None"]
    print(f"Takeaway: in a bf16 model the fp32 router keeps the fp32 layer's expert choices "
          f"({f32['same_topk']:.1%} of tokens);\na bf16 router moves {1 - b16['same_topk']:.1%} of "
          f"tokens to other experts and its output error is {_ratio(b16['rel_l2'], f32['rel_l2'])} larger.")

    print(f"\n-- 2. one training step, {fwd_tokens} tokens: loss = mean(y^2) + aux loss --")
    _progress(ctx, "layer: training step (3 layers, forward + backward)")
    res["train"] = _layer_train(ref, bf16, x, moe_args)
    ge = res["train"]["gate_grad_err"]
    print("Takeaway: the gate GEMM runs in fp32 but its gradient comes back in the model dtype "
          "(bf16), so an optimizer\nsees ordinary bf16 parameters; that gradient is "
          f"{_ratio(ge['bf16/bf16 router'], ge['bf16/fp32 router'])} closer to the fp32 layer's "
          "than a bf16 router's.")

    env_now = ", ".join(f"{n}={os.environ[n]!r}" for n in (ENV_FORCE_BF16, ENV_BOUND) if n in os.environ)
    print(f"\n-- 3. quantized experts (inference), errors vs the fp32 layer; act-dtype bound on "
          f"{ctx.device.type}: {bound} tokens ({'env ' + env_now if env_now else 'device default'}) --")
    layers, explicit, res["quantized"] = _quantized_sweep(ctx, bf16, ref, x_all, counts, ("mxfp4", "fp8"))
    errs = res["quantized"]["errors"]
    mx = {m: v for (q, m), v in res["quantized"]["policy"].items() if q == "mxfp4"}
    lo, hi = min(mx), max(mx)
    print(f"Takeaway: MXFP4 weights cost most of the error; fp8 activations add little on top "
          f"({errs['mxfp4']['bf16']:.1%} -> {errs['mxfp4']['fp8']:.1%}),\nfp4 activations much more "
          f"(-> {errs['mxfp4']['fp4']:.1%}). So the policy keeps bf16 activations below the bound "
          f"(small batches are\nmemory-bound on a GPU: bf16 costs nothing there) and takes the fast "
          f"path from it ({lo} tokens: {mx[lo]['policy']}, {hi}: {mx[hi]['policy']});\nfp4 only on "
          "GPUs with FP4 tensor cores. fp8 experts always run fp8 activations (fp8 x fp8 GEMMs).")

    m = bound if bound in mx else hi
    print("\n-- 4. deployment overrides of the policy (env read at every call) --")
    _progress(ctx, "layer: overrides")
    layer = layers["mxfp4"]
    outs = {a: o[:m] for a, o in explicit["mxfp4"].items()}
    res["overrides"] = _overrides(ctx, layer, x_all[:m], outs)
    res["bound"] = bound
    print(f"Takeaway: {ENV_FORCE_BF16}=1 (or PrecisionConfig.force_bf16_act) pins bf16 activations for every "
          f"batch;\n{ENV_BOUND} moves the crossover per deployment, over PrecisionConfig.bf16_fp8_bound "
          "(last row).\nBoth are read at every call: no restart, no re-import.")
    ctx.results["layer"] = res
    print()


# The demo, in order. Later features append their own section function here.
SECTIONS: list[Callable[[argparse.Namespace, DemoContext], None]] = [router_precision, moe_layer]


def run(args: argparse.Namespace) -> int:
    if _router_tokens(args) < 1:
        raise ValueError(f"--tokens: expected a positive int, got {args.tokens}")
    ctx = DemoContext(device=parse_device(args.device), seed=args.seed)
    for i, section in enumerate(SECTIONS):
        print(f"[{i + 1}/{len(SECTIONS)}] {(section.__doc__ or section.__name__).splitlines()[0]}", flush=True)
        section(args, ctx)
    print(f"demo done in {time.perf_counter() - ctx.t0:.1f} s")
    return 0
