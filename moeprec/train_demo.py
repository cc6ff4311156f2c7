"""End-to-end training demo: a small Qwen3-MoE-style byte-level LM trained with a bf16 router and
with an fp32 router, from the same initial weights and on the same batches.

Precision scheme (what makes the router comparison meaningful). The model keeps fp32 master
weights and computes in bf16 the way FSDP's `param_dtype=torch.bfloat16` does: every forward
runs on bf16 copies of the parameters (`torch.func.functional_call`), so activations, attention,
expert GEMMs and the router's input and weight are all bf16, and gradients flow back to the fp32
masters that AdamW updates. The only difference between the two runs is `MoEArgs.router_dtype`:
`None` computes the gate GEMM in bf16 (bf16 logits), `torch.float32` upcasts the same bf16 input
and weight and computes the logits in fp32. (Autocast would instead keep the residual stream in
fp32 and hide part of the difference.)

Routing flip rate: at each logged step, inside each MoE layer, the captured bf16 router input is
routed twice with the very weights of that forward: once with a bf16 gate and once with an fp32
gate (same expert bias); the flip rate is the fraction of tokens whose top-k expert SET differs.
It is measured in both runs (in the bf16 run it says how often the bf16 router actually sent a
token elsewhere than an fp32 router would have).

Load balance: DeepSeek-V3 style auxiliary-loss-free balancing (`MoEArgs.load_balance_coeff`,
`MoE.update_expert_bias()` after each optimizer step), so the loss curves contain only the
language-modelling loss. Per layer and logged step we record max/mean tokens per expert and the
coefficient of variation of the counts.

Text: a deterministic, seeded synthetic corpus (arithmetic, a small English grammar, string
reversal and counting), byte-level tokens (vocabulary 256).
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import math
import platform
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from moeprec._validation import check_choice, check_positive_int
from moeprec.args import MoEArgs
from moeprec.moe import MoE
from moeprec.routing.diagnostics import topk_set_flip_rate
from moeprec.routing.gate import router_gating_linear

VOCAB_SIZE = 256  # bytes
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ROUTER_RUNS: dict[str, torch.dtype | None] = {"bf16": None, "fp32": torch.float32}


# --------------------------------------------------------------------------------------------
# configuration


@dataclass
class TrainDemoConfig:
    """Model, data and optimizer settings of one demo configuration."""

    name: str = "short"
    n_layers: int = 2
    dim: int = 64
    n_heads: int = 4
    num_experts: int = 32
    top_k: int = 8
    moe_hidden_dim: int = 32  # per-expert intermediate size (Qwen3-MoE: dim / 2.67)
    seq_len: int = 64
    batch_size: int = 8
    steps: int = 30
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    load_balance_coeff: float | None = 1e-3
    init_std: float = 0.02
    log_every: int = 1
    eval_batches: int = 4
    corpus_chars: int = 200_000
    seed: int = 0
    compute_dtype: str = "bf16"  # parameters' compute copies; masters stay fp32

    def __post_init__(self) -> None:
        for name in ("n_layers", "dim", "n_heads", "num_experts", "top_k", "moe_hidden_dim",
                     "seq_len", "batch_size", "steps", "log_every", "eval_batches",
                     "corpus_chars"):
            check_positive_int(name, getattr(self, name))
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"dim: expected a multiple of n_heads={self.n_heads} with an even head size, "
                f"got {self.dim}"
            )
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: expected <= num_experts={self.num_experts}, got {self.top_k}")
        check_choice("compute_dtype", self.compute_dtype, tuple(_DTYPES))


CONFIGS: dict[str, TrainDemoConfig] = {
    # CPU, a minute or two on 2 cores; the test runs it with fewer steps.
    "short": TrainDemoConfig(name="short", steps=200, log_every=2),
    # One GPU, a few minutes: 4 layers, 64 experts top-8, 16K tokens per step.
    "gpu": TrainDemoConfig(
        name="gpu", n_layers=4, dim=512, n_heads=8, num_experts=64, top_k=8,
        moe_hidden_dim=192, seq_len=512, batch_size=32, steps=600, lr=1.5e-3, warmup_steps=30,
        log_every=10, eval_batches=8, corpus_chars=4_000_000,
    ),
}


def get_config(name: str, **overrides: Any) -> TrainDemoConfig:
    check_choice("config", name, tuple(CONFIGS))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(CONFIGS[name], **overrides)


# --------------------------------------------------------------------------------------------
# data: a seeded synthetic corpus with learnable structure

_NOUNS = ("cat", "dog", "bird", "fox", "horse", "child", "river", "tree", "ship", "stone")
_ADJS = ("red", "small", "old", "quiet", "bright", "green", "tall", "cold")
_VERBS = ("sees", "follows", "finds", "likes", "carries", "watches")
_PREPS = ("near", "under", "behind", "beside")


def _sentence(rng: random.Random) -> str:
    def noun_phrase() -> str:
        det = rng.choice(("the", "a"))
        adj = rng.choice(_ADJS) + " " if rng.random() < 0.6 else ""
        return f"{det} {adj}{rng.choice(_NOUNS)}"

    s = f"{noun_phrase()} {rng.choice(_VERBS)} {noun_phrase()}"
    if rng.random() < 0.5:
        s += f" {rng.choice(_PREPS)} {noun_phrase()}"
    return s + "."


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return f"{a}+{b}={a + b}"
    return f"{max(a, b)}-{min(a, b)}={max(a, b) - min(a, b)}"


def _reverse(rng: random.Random) -> str:
    word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 7)))
    return f"rev {word} = {word[::-1]}"


def _count(rng: random.Random) -> str:
    start, n = rng.randint(0, 50), rng.randint(4, 8)
    return "count " + " ".join(str(start + i) for i in range(n))


_GENERATORS: tuple[Callable[[random.Random], str], ...] = (_sentence, _arithmetic, _reverse, _count)


def synthetic_corpus(num_chars: int, seed: int = 0) -> str:
    """A deterministic ASCII text of `num_chars` characters: one task instance per line."""
    check_positive_int("num_chars", num_chars)
    rng = random.Random(seed)
    lines: list[str] = []
    total = 0
    while total < num_chars:
        line = rng.choice(_GENERATORS)(rng)
        lines.append(line)
        total += len(line) + 1
    return ("\n".join(lines) + "\n")[:num_chars]


def encode(text: str) -> torch.Tensor:
    """Byte-level tokens (int64)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


class BatchSampler:
    """Random windows of seq_len + 1 tokens from a token stream, reproducible from a seed."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int) -> None:
        if tokens.numel() < seq_len + 2:
            raise ValueError(f"tokens: expected more than {seq_len + 1} tokens, got {tokens.numel()}")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, self.tokens.numel() - self.seq_len - 1, (self.batch_size,),
                               generator=self.gen)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        window = self.tokens[idx]
        return window[:, :-1], window[:, 1:]


# --------------------------------------------------------------------------------------------
# model: Qwen3-MoE-style blocks (RMSNorm, causal attention with QK-norm and RoPE, moeprec MoE)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, returned in the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)


def _rope_tables(seq_len: int, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, ...]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, H, S, hd]; rotate pairs (first half, second half) in fp32.
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    s = x.shape[-2]
    c, si = cos[:s], sin[:s]
    return torch.cat([x1 * c - x2 * si, x1 * si + x2 * c], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.wqkv(x).view(b, s, 3, self.n_heads, self.head_dim).unbind(2)
        q = _apply_rope(self.q_norm(q).transpose(1, 2), cos, sin)
        k = _apply_rope(self.k_norm(k).transpose(1, 2), cos, sin)
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    def __init__(self, cfg: TrainDemoConfig, router_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.n_heads)
        self.moe_norm = RMSNorm(cfg.dim)
        args = MoEArgs(
            num_experts=cfg.num_experts, top_k=cfg.top_k, score_func="softmax", route_norm=True,
            load_balance_coeff=cfg.load_balance_coeff, router_dtype=router_dtype,
        )
        self.moe = MoE(args, cfg.dim, cfg.moe_hidden_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.moe(self.moe_norm(x))


class MoELM(nn.Module):
    """Byte-level decoder-only LM with a moeprec MoE in every block."""

    def __init__(self, cfg: TrainDemoConfig, router_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(VOCAB_SIZE, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, router_dtype) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, VOCAB_SIZE, bias=False)
        cos, sin = _rope_tables(cfg.seq_len, cfg.dim // cfg.n_heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, seed: int) -> None:
        """Seeded initialisation; the global RNG state is left as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self._init_weights()

    def _init_weights(self) -> None:
        std = self.cfg.init_std
        nn.init.normal_(self.embed.weight, std=1.0)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.wqkv.weight, std=std)
            # depth-scaled output projections keep the residual stream's scale steady
            nn.init.normal_(blk.attn.wo.weight, std=std / math.sqrt(2 * self.cfg.n_layers))
            blk.moe.init_weights(std)
        nn.init.normal_(self.head.weight, std=self.cfg.dim ** -0.5)

    def moe_layers(self) -> list[nn.Module]:
        return [blk.moe for blk in self.blocks]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for blk in self.blocks:
            h = blk(h, self.rope_cos, self.rope_sin)
        return self.head(self.norm(h))


def build_model(cfg: TrainDemoConfig, router_dtype: torch.dtype | None,
                state_dict: dict[str, torch.Tensor] | None = None) -> MoELM:
    """An fp32-master MoELM; from `state_dict` when given, else freshly initialised from cfg.seed."""
    model = MoELM(cfg, router_dtype)
    if state_dict is None:
        model.init_weights(cfg.seed)
    else:
        model.load_state_dict(state_dict)
    return model


def compute_params(model: MoELM) -> dict[str, torch.Tensor]:
    """Differentiable low-precision copies of the fp32 master parameters, as FSDP's param_dtype."""
    dtype = _DTYPES[model.cfg.compute_dtype]
    return {n: p.to(dtype) for n, p in model.named_parameters()}


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, dtypes, shapes and bytes (same digest = same weights)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def lm_loss(model: MoELM, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-byte cross-entropy, the forward running on the compute copies of the parameters."""
    logits = functional_call(model, compute_params(model), (tokens,))
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# --------------------------------------------------------------------------------------------
# routing diagnostics


def topk_sets(logits: torch.Tensor, top_k: int, expert_bias: torch.Tensor | None) -> torch.Tensor:
    """Sorted top-k expert ids per token [T, k] for softmax routing with an optional bias."""
    scores = torch.softmax(logits.float(), dim=-1)
    if expert_bias is not None:
        scores = scores + expert_bias.float()
    return scores.topk(top_k, dim=-1).indices.sort(dim=-1).values


def flip_rate(x: torch.Tensor, weight: torch.Tensor, top_k: int,
              expert_bias: torch.Tensor | None = None) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Fraction of tokens of x [T, D] whose top-k set differs between a gate computed in x's dtype
    (bf16) and an fp32 gate, same input and weight. Returns (rate, ids_low, ids_fp32)."""
    ids_low = topk_sets(router_gating_linear(x, weight, None), top_k, expert_bias)
    ids_fp32 = topk_sets(router_gating_linear(x, weight, torch.float32), top_k, expert_bias)
    return topk_set_flip_rate(ids_low, ids_fp32), ids_low, ids_fp32


def load_stats(selected: torch.Tensor, num_experts: int) -> dict[str, float]:
    """max/mean tokens per expert, coefficient of variation, fraction of idle experts."""
    counts = torch.bincount(selected.flatten().cpu(), minlength=num_experts).double()
    mean = counts.mean().item()
    return {
        "max_over_mean": counts.max().item() / mean if mean > 0 else 0.0,
        "cv": counts.std(unbiased=False).item() / mean if mean > 0 else 0.0,
        "idle_frac": (counts == 0).double().mean().item(),
    }


class RoutingProbe:
    """Forward pre-hooks on every MoE layer that, when armed, record flip rate and load stats."""

    def __init__(self, model: MoELM, router_dtype: torch.dtype | None) -> None:
        self.router_dtype = router_dtype
        self.armed = False
        self.records: list[dict[str, float]] = []
        self.handles = [
            moe.register_forward_pre_hook(self._hook) for moe in model.moe_layers()
        ]

    def _hook(self, moe: nn.Module, inputs: tuple[Any, ...]) -> None:
        if not self.armed:
            return
        with torch.no_grad():
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            # the weight in use in this forward (the bf16 copy under functional_call)
            weight = moe.router.gate.weight.detach()
            bias = getattr(moe, "expert_bias", None)
            rate, ids_low, ids_fp32 = flip_rate(x, weight, moe.router.top_k, bias)
            actual = ids_low if self.router_dtype is None else ids_fp32
            rec = {"flip_rate": rate}
            rec.update(load_stats(actual, moe.router.num_experts))
            self.records.append(rec)

    def pop(self) -> list[dict[str, float]]:
        out, self.records = self.records, []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------------------------
# training


def _lr_at(step: int, cfg: TrainDemoConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_run(
    cfg: TrainDemoConfig,
    router_dtype: torch.dtype | None,
    init_state: dict[str, torch.Tensor],
    train_tokens: torch.Tensor,
    val_tokens: torch.Tensor,
    device: torch.device,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train one model from init_state; returns per-step losses, routing stats and timings."""
    model = build_model(cfg, router_dtype, init_state).to(device).train()
    init_digest = state_digest(model.state_dict())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    probe = RoutingProbe(model, router_dtype)
    sampler = BatchSampler(train_tokens, cfg.seq_len, cfg.batch_size, seed=cfg.seed + 1)
    losses: list[float] = []
    logged: dict[str, list] = {"step": [], "flip_rate": [], "flip_rate_per_layer": [],
                               "max_over_mean": [], "cv": [], "idle_frac": []}
    _sync(device)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        tokens, targets = (t.to(device) for t in sampler.next())
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        log_now = step % cfg.log_every == 0 or step == cfg.steps - 1
        probe.armed = log_now
        loss = lm_loss(model, tokens, targets)
        probe.armed = False
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if cfg.load_balance_coeff is not None:
            for moe in model.moe_layers():
                moe.update_expert_bias()
        losses.append(loss.item())
        if step == 0:  # steady-state throughput leaves out the first step (allocator, kernels)
            _sync(device)
            t1 = time.perf_counter()
        if log_now:
            recs = probe.pop()
            logged["step"].append(step)
            per_layer = [r["flip_rate"] for r in recs]
            logged["flip_rate_per_layer"].append(per_layer)
            logged["flip_rate"].append(sum(per_layer) / len(per_layer))
            for key in ("max_over_mean", "cv", "idle_frac"):
                logged[key].append([r[key] for r in recs])
            if progress is not None:
                ms = (time.perf_counter() - t0) * 1e3 / (step + 1)
                progress(f"step {step + 1:>5}/{cfg.steps}  loss {losses[-1]:.4f}  "
                         f"flip {logged['flip_rate'][-1]:.4f}  "
                         f"max/mean {max(logged['max_over_mean'][-1]):.2f}  {ms:.0f} ms/step")
    _sync(device)
    t_end = time.perf_counter()
    elapsed = t_end - t0
    tokens_per_step = cfg.batch_size * cfg.seq_len
    if cfg.steps > 1:
        steady = (cfg.steps - 1) * tokens_per_step / (t_end - t1)
    else:
        steady = tokens_per_step / elapsed
    probe.remove()
    val_loss = evaluate(model, val_tokens, cfg, device)
    return {
        "router_dtype": "fp32" if router_dtype is torch.float32 else None,
        "init_state_sha256": init_digest,
        "loss": losses,
        "val_loss": val_loss,
        "routing": logged,
        "time_s": elapsed,
        "tokens_per_s": steady,
        "final_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


@torch.no_grad()
def evaluate(model: MoELM, val_tokens: torch.Tensor, cfg: TrainDemoConfig,
             device: torch.device) -> float:
    """Mean loss over cfg.eval_batches fixed held-out batches (eval mode: no load counting)."""
    model.eval()
    sampler = BatchSampler(val_tokens, cfg.seq_len, cfg.batch_size, seed=cfg.seed + 2)
    total = 0.0
    for _ in range(cfg.eval_batches):
        tokens, targets = (t.to(device) for t in sampler.next())
        total += lm_loss(model, tokens, targets).item()
    model.train()
    return total / cfg.eval_batches


def run_demo(
    cfg: TrainDemoConfig,
    device: str | torch.device = "cpu",
    progress: Callable[[str], None] | None = None,
    keep_states: bool = False,
    cpu_threads: int | None = 1,
    control: bool = False,
) -> dict[str, Any]:
    """Train the bf16-router and fp32-router models from identical weights on identical batches.

    Returns the JSON-ready result (config, per-step losses, flip rates, load stats, timings,
    device, date). With keep_states, the initial and final state dicts are kept under
    "_states" (not JSON; for tests). With control, a third run repeats the bf16 one
    ("bf16_repeat"): its distance to the first is the run-to-run noise floor (zero on CPU,
    non-zero on GPUs whose atomics make training non-deterministic). On CPU, torch runs with `cpu_threads` threads for the
    duration (None: unchanged): the demo's GEMMs are tiny, and extra threads mostly spin-wait
    (measured: 1 thread was ~20x faster than 2 on a busy 2-core machine).
    """
    device = torch.device(device)
    saved_threads = torch.get_num_threads()
    if device.type == "cpu" and cpu_threads is not None:
        check_positive_int("cpu_threads", cpu_threads)
        torch.set_num_threads(cpu_threads)
    try:
        return _run_demo(cfg, device, progress, keep_states, control)
    finally:
        torch.set_num_threads(saved_threads)


def _run_demo(cfg: TrainDemoConfig, device: torch.device,
              progress: Callable[[str], None] | None, keep_states: bool,
              control: bool) -> dict[str, Any]:
    corpus = synthetic_corpus(cfg.corpus_chars, seed=cfg.seed)
    split = int(0.9 * len(corpus))
    train_tokens, val_tokens = encode(corpus[:split]), encode(corpus[split:])
    init_state = {k: v.clone() for k, v in build_model(cfg, None).state_dict().items()}
    runs: dict[str, dict[str, Any]] = {}
    states: dict[str, Any] = {"init": init_state}
    plan = dict(ROUTER_RUNS, **({"bf16_repeat": None} if control else {}))
    for label, router_dtype in plan.items():
        if progress is not None:
            progress(f"-- run '{label}' (router_dtype={'fp32' if router_dtype else None})")
        run = train_run(cfg, router_dtype, copy.deepcopy(init_state), train_tokens, val_tokens,
                        device, progress)
        states[label] = run.pop("final_state")
        runs[label] = run
    lb, lf = runs["bf16"]["loss"], runs["fp32"]["loss"]
    tail = max(1, len(lb) // 10)
    result = {
        "config": asdict(cfg),
        "device": _device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "precision": "fp32 master weights, bf16 compute copies (FSDP param_dtype=bf16 style)"
        if cfg.compute_dtype == "bf16" else "fp32 throughout",
        "load_balancing": f"aux-loss-free expert bias, load_balance_coeff={cfg.load_balance_coeff}",
        "runs": runs,
        "comparison": {
            "same_initial_weights": runs["bf16"]["init_state_sha256"]
            == runs["fp32"]["init_state_sha256"],
            "initial_loss_diff": lb[0] - lf[0],
            "final_loss_bf16_minus_fp32": sum(lb[-tail:]) / tail - sum(lf[-tail:]) / tail,
            "mean_abs_loss_diff": sum(abs(a - b) for a, b in zip(lb, lf)) / len(lb),
            "val_loss_bf16_minus_fp32": runs["bf16"]["val_loss"] - runs["fp32"]["val_loss"],
            "mean_flip_rate_bf16_run": _mean(runs["bf16"]["routing"]["flip_rate"]),
            "mean_flip_rate_fp32_run": _mean(runs["fp32"]["routing"]["flip_rate"]),
        },
    }
    if control:
        lr = runs["bf16_repeat"]["loss"]
        result["comparison"]["control_mean_abs_loss_diff"] = (
            sum(abs(a - b) for a, b in zip(lb, lr)) / len(lb))
        result["comparison"]["control_val_loss_diff"] = (
            runs["bf16"]["val_loss"] - runs["bf16_repeat"]["val_loss"])
    if keep_states:
        result["_states"] = states
    return result


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s))"


# --------------------------------------------------------------------------------------------
# output


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in result.items() if not k.startswith("_")}
    path.write_text(json.dumps(clean, indent=1) + "\n")
    return path


def write_plot(result: dict[str, Any], path: str | Path) -> Path | None:
    """Loss curves, flip rate and load balance in one PNG; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = result["runs"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for label, run in runs.items():
        axes[0].plot(run["loss"], label=f"router {label}", lw=1)
        axes[1].plot(run["routing"]["step"], run["routing"]["flip_rate"],
                     label=f"{label} run", lw=1)
        worst = [max(v) for v in run["routing"]["max_over_mean"]]
        axes[2].plot(run["routing"]["step"], worst, label=f"{label} run", lw=1)
    window = max(1, len(runs["bf16"]["loss"]) // 20)
    pairs = [("fp32", "bf16 - fp32 router")]
    if "bf16_repeat" in runs:
        pairs.append(("bf16_repeat", "bf16 - bf16 repeated (noise)"))
    for other, label in pairs:
        diff = [a - b for a, b in zip(runs["bf16"]["loss"], runs[other]["loss"])]
        smooth = [sum(diff[max(0, i - window + 1): i + 1]) / min(i + 1, window)
                  for i in range(len(diff))]
        line = axes[3].plot(diff, lw=0.5, alpha=0.35)[0]
        axes[3].plot(smooth, lw=1.2, color=line.get_color(), label=f"{label}, mean of {window}")
    axes[3].axhline(0.0, color="k", lw=0.6)
    axes[3].set(title="loss difference per step", xlabel="step")
    axes[0].set(title="training loss (nats/byte)", xlabel="step")
    axes[1].set(title="routing flip rate: bf16 vs fp32 gate", xlabel="step",
                ylabel="fraction of tokens")
    axes[2].set(title="load: max/mean tokens per expert (worst layer)", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    cfg = result["config"]
    fig.suptitle(f"moeprec train-demo '{cfg['name']}': {cfg['n_layers']} layers, "
                 f"{cfg['num_experts']} experts top-{cfg['top_k']}, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
