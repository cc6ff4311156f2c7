"""The training demo (moeprec train-demo): a short real run on CPU, and its measurement helpers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moeprec.routing.topk_router import TokenChoiceTopKRouter
from moeprec.train_demo import (
    BatchSampler,
    TrainDemoConfig,
    build_model,
    compute_params,
    encode,
    flip_rate,
    get_config,
    lm_loss,
    load_stats,
    run_demo,
    state_digest,
    synthetic_corpus,
    write_json,
    write_plot,
)

STEPS = 30


@pytest.fixture(scope="module")
def demo():
    """The short configuration, 30 steps per router (a few seconds on one CPU thread)."""
    torch.manual_seed(0)
    cfg = get_config("short", steps=STEPS, log_every=3)
    return cfg, run_demo(cfg, device="cpu", keep_states=True)


@pytest.mark.slow
def test_demo_loss_decreases(demo):
    _, result = demo
    for label, run in result["runs"].items():
        loss = run["loss"]
        assert len(loss) == STEPS
        first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
        # Starts near ln(256) = 5.55 (uniform over bytes); the structured corpus is learnable.
        assert first > 4.5, (label, first)
        assert last < first - 1.5, (label, first, last)
        assert run["val_loss"] < first - 1.5, (label, run["val_loss"])


@pytest.mark.slow
def test_demo_runs_start_from_identical_weights(demo):
    cfg, result = demo
    runs = result["runs"]
    init = result["_states"]["init"]
    digest = state_digest(init)
    assert runs["bf16"]["init_state_sha256"] == runs["fp32"]["init_state_sha256"] == digest
    assert result["comparison"]["same_initial_weights"] is True
    # the digest tells weights apart, and the initial state is the seeded one
    assert state_digest(build_model(get_config("short", seed=cfg.seed + 1), None).state_dict()) != digest
    assert state_digest(build_model(cfg, None).state_dict()) == digest
    # the two runs did train apart: the router precision changed something
    assert runs["bf16"]["loss"] != runs["fp32"]["loss"]
    assert not torch.equal(result["_states"]["bf16"]["blocks.0.moe.router.gate.weight"],
                           result["_states"]["fp32"]["blocks.0.moe.router.gate.weight"])


@pytest.mark.slow
def test_demo_json_fields_finite(demo, tmp_path):
    cfg, result = demo
    path = write_json(result, tmp_path / "out.json")
    data = json.loads(path.read_text())
    for key in ("config", "device", "torch", "date", "precision", "load_balancing", "runs",
                "comparison"):
        assert key in data, key
    assert "_states" not in data
    assert data["config"]["num_experts"] == cfg.num_experts and data["config"]["top_k"] == 8
    assert set(data["runs"]) == {"bf16", "fp32"}
    assert data["runs"]["bf16"]["router_dtype"] is None
    assert data["runs"]["fp32"]["router_dtype"] == "fp32"
    logged_steps = list(range(0, STEPS, 3)) + ([STEPS - 1] if (STEPS - 1) % 3 else [])
    for run in data["runs"].values():
        r = run["routing"]
        assert r["step"] == logged_steps
        for key in ("flip_rate", "max_over_mean", "cv", "idle_frac", "flip_rate_per_layer"):
            assert len(r[key]) == len(logged_steps), key
        assert all(math.isfinite(v) for v in run["loss"])
        assert all(0.0 <= v <= 1.0 for v in r["flip_rate"])
        for per_layer in r["flip_rate_per_layer"]:
            assert len(per_layer) == cfg.n_layers and all(0.0 <= v <= 1.0 for v in per_layer)
        for per_layer in r["max_over_mean"]:
            assert all(1.0 <= v <= cfg.num_experts / cfg.top_k for v in per_layer)
        assert all(v >= 0 and math.isfinite(v) for layer in r["cv"] for v in layer)
        assert run["time_s"] > 0 and run["tokens_per_s"] > 0
    # a bf16 gate does flip some tokens' expert sets at this size, and the probe sees it
    assert sum(data["runs"]["bf16"]["routing"]["flip_rate"]) > 0
    assert all(math.isfinite(v) for v in data["comparison"].values() if not isinstance(v, bool))


@pytest.mark.slow
def test_demo_plot(demo, tmp_path):
    pytest.importorskip("matplotlib")
    _, result = demo
    png = write_plot(result, tmp_path / "plot.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("bias", [False, True])
def test_flip_rate_selection_matches_router(bias):
    """The probe's bf16 / fp32 selections are exactly the library router's."""
    torch.manual_seed(1)
    d, e, k, t = 48, 32, 8, 300
    x = torch.randn(t, d).bfloat16()
    w = (torch.randn(e, d) * 0.3).bfloat16()
    expert_bias = torch.randn(e) * 0.01 if bias else None
    rate, ids_low, ids_fp32 = flip_rate(x, w, k, expert_bias)
    for router_dtype, ids in ((None, ids_low), (torch.float32, ids_fp32)):
        router = TokenChoiceTopKRouter(d, e, k, router_dtype=router_dtype).bfloat16()
        with torch.no_grad():
            router.gate.weight.copy_(w)
        sel = router.route(x, expert_bias).selected_experts.sort(dim=-1).values
        assert torch.equal(sel, ids)
    expected = (ids_low != ids_fp32).any(-1).float().mean().item()
    assert rate == expected


def test_flip_rate_zero_when_bf16_gate_is_exact():
    # small integers: every product and sum is exact in bf16, so the two gates agree
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-2, 3, (200, 16), generator=g).bfloat16()
    w = torch.randint(-2, 3, (64, 16), generator=g).bfloat16()
    assert flip_rate(x, w, 8)[0] == 0.0


def test_flip_rate_positive_for_near_ties():
    torch.manual_seed(3)
    x = torch.randn(2048, 256).bfloat16()
    w = (torch.randn(128, 256) * 0.02).bfloat16()
    rate = flip_rate(x, w, 8)[0]
    assert 0.0 < rate < 1.0


def test_load_stats_known_counts():
    selected = torch.tensor([[0, 1], [0, 2]])  # counts [2, 1, 1, 0], mean 1
    s = load_stats(selected, 4)
    assert s["max_over_mean"] == pytest.approx(2.0)
    assert s["cv"] == pytest.approx(math.sqrt(0.5))
    assert s["idle_frac"] == pytest.approx(0.25)


def test_corpus_deterministic_and_learnable():
    a, b = synthetic_corpus(5000, seed=0), synthetic_corpus(5000, seed=0)
    assert a == b and len(a) == 5000 and a.isascii()
    assert synthetic_corpus(5000, seed=1) != a
    # the arithmetic lines are correct (structure a model can learn)
    sums = [ln for ln in a.splitlines()[:-1] if "+" in ln and "=" in ln]
    assert sums and all(int(l.split("=")[0].split("+")[0]) + int(l.split("=")[0].split("+")[1])
                        == int(l.split("=")[1]) for l in sums)
    tokens = encode(a)
    assert tokens.dtype == torch.long and int(tokens.max()) < 256
    x, y = BatchSampler(tokens, 16, 4, seed=0).next()
    x2, _ = BatchSampler(tokens, 16, 4, seed=0).next()
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x, x2)


def test_bf16_compute_fp32_masters():
    """Forward runs on bf16 copies (the router sees bf16), gradients land on fp32 masters."""
    cfg = get_config("short", n_layers=1, seq_len=16, batch_size=2)
    model = build_model(cfg, None)
    seen = []
    model.blocks[0].moe.register_forward_pre_hook(lambda m, a: seen.append(
        (a[0].dtype, m.router.gate.weight.dtype)))
    tokens = torch.randint(0, 256, (2, 16))
    loss = lm_loss(model, tokens, tokens)
    loss.backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.blocks[0].moe.router.gate.weight.grad is not None
    assert all(v.dtype == torch.bfloat16 for v in compute_params(model).values())


def test_config_errors():
    with pytest.raises(ValueError, match="config"):
        get_config("huge")
    with pytest.raises(ValueError, match="dim"):
        TrainDemoConfig(dim=63)
    with pytest.raises(ValueError, match="top_k"):
        TrainDemoConfig(num_experts=4, top_k=8)
    with pytest.raises(ValueError, match="compute_dtype"):
        TrainDemoConfig(compute_dtype="fp8")


def test_cli_writes_json_and_plot(tmp_path):
    from moeprec.cli import main

    rc = main(["train-demo", "--steps", "3", "--out", str(tmp_path), "--plot", "--quiet",
               "--control"])
    assert rc == 0
    data = json.loads((tmp_path / "train_demo_short.json").read_text())
    assert data["config"]["steps"] == 3 and len(data["runs"]["fp32"]["loss"]) == 3
    # on CPU a repeated run is bit-identical: the bf16/fp32 difference is the router's alone
    assert data["runs"]["bf16_repeat"]["loss"] == data["runs"]["bf16"]["loss"]
    assert data["comparison"]["control_mean_abs_loss_diff"] == 0.0
    assert main(["train-demo", "--steps", "0", "--out", str(tmp_path)]) == 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "train_demo_short.png").exists()


def test_bench_train_smoke(tmp_path):
    """benchmarks/bench_train.py runs on tiny shapes, and its two layers agree on the same weights."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GEMMs: more threads only spin
    try:
        rc = bench.main(["--smoke", "--device", "cpu", "--no-compile", "--tokens", "48",
                         "--warmup", "0", "--iters", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    data = json.loads((tmp_path / "bench_train_smoke.json").read_text())
    rows = data["rows"]
    assert {(r["shape"], r["impl"]) for r in rows} == {
        (f"{s}(smoke)", impl) for s in ("qwen3-30b-a3b", "gpt-oss-20b")
        for impl in ("moeprec", "titan-style")}
    for r in rows:
        assert "error" not in r, r
        assert r["rel_diff_vs_peer"] < 2e-2, r  # bf16 outputs of the same math
        assert r["fwd_bwd_ms"] > 0 and r["tflops"] > 0
    assert len(data["summary"]) == 2


@pytest.mark.gpu
def test_demo_runs_on_cuda():
    """The short configuration on the GPU: bf16 grouped GEMMs, the CUDA fp32 gate path."""
    cfg = get_config("short", steps=40, log_every=5)
    result = run_demo(cfg, device="cuda")
    assert "cpu" not in result["device"]
    for run in result["runs"].values():
        loss = run["loss"]
        assert all(math.isfinite(v) for v in loss)
        assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 1.0
        assert all(0.0 <= v <= 1.0 for v in run["routing"]["flip_rate"])
    assert result["comparison"]["same_initial_weights"]
