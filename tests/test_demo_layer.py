"""`moeprec demo`, section "MoE layer end to end": run through the CLI at --quick size and check
the claims its tables make against the library itself (select_act_dtype, dtypes, counts)."""

from __future__ import annotations

import argparse
import math
import os

import pytest
import torch

from moeprec import select_act_dtype
from moeprec.act_policy import ENV_BOUND, ENV_FORCE_BF16

BOUND = 48  # small, so the token counts around it (6, 47, 48, 96) keep the test quick


def _table(out: str, *header: str) -> list[list[str]]:
    """Rows (cells stripped) of the printed markdown table whose first header cells start so."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and all(c.startswith(h) for c, h in zip(cells, header)):
            rows = []
            for row in lines[i + 2 :]:  # skip the |---| rule
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            return rows
    raise AssertionError(f"no table with header {header!r} in:\n{out}")


@pytest.fixture(scope="module")
def demo_out():
    """stdout of `moeprec demo --quick` on CPU, with the act-dtype bound set to BOUND by env."""
    import contextlib
    import io

    from moeprec.cli import main

    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:  # module scope: the function-scoped fixture can't
        mp.setenv(ENV_BOUND, str(BOUND))
        mp.delenv(ENV_FORCE_BF16, raising=False)
        with contextlib.redirect_stdout(buf):
            rc = main(["demo", "--device", "cpu", "--quick", "--tokens", "128"])
        env_after = {k: os.environ.get(k) for k in (ENV_BOUND, ENV_FORCE_BF16)}
    return rc, buf.getvalue(), env_after


def test_demo_runs_both_sections(demo_out):
    rc, out, _ = demo_out
    assert rc == 0
    assert "[1/2]" in out and "[2/2] MoE layer end to end" in out
    assert "E=128, top-8" in out and "demo done in" in out


def test_demo_restores_env(demo_out):
    # the overrides table sets and unsets both variables; the caller's values must come back
    _, _, env_after = demo_out
    assert env_after == {ENV_BOUND: str(BOUND), ENV_FORCE_BF16: None}


def test_demo_forward_fp32_router_tracks_fp32_layer(demo_out):
    rows = {r[0]: r for r in _table(demo_out[1], "layer")}
    ref = rows["fp32 reference"]
    fp32 = rows['bf16, moe_router_dtype="fp32"']
    bf16 = rows["bf16, moe_router_dtype=None"]
    assert ref[1] == fp32[1] == "float32" and bf16[1] == "bfloat16"
    assert float(ref[3]) == 0.0
    agree = lambda r: float(r[2].rstrip("%"))  # noqa: E731
    assert agree(fp32) >= agree(bf16) and agree(fp32) >= 98.0
    assert 0 < float(fp32[3]) < float(bf16[3])


def test_demo_training_step_claims(demo_out):
    rows = {r[0]: r[1] for r in _table(demo_out[1], "training step")}
    assert rows["model dtype (gate weight)"] == "bfloat16"
    assert rows["gate weight grad dtype"] == "bfloat16"  # = the model dtype
    assert rows["router logits / scores"] == "float32"
    tokens = 96  # --quick forward tokens, routed top-8
    assert rows["tokens_per_expert: sum (= T*k)"].startswith(f"{tokens * 8} ")
    aux = float(rows["aux loss (switch, coeff 0.001)"])
    # switch loss E * sum f_i P_i is >= coeff * 1 in expectation-ish; at least positive and finite
    assert math.isfinite(aux) and aux > 0
    fp32_err = float(rows["gate grad rel err vs fp32 layer: fp32 router"])
    bf16_err = float(rows["gate grad rel err vs fp32 layer: bf16 router"])
    assert fp32_err < bf16_err


def test_demo_quantized_errors_ordered(demo_out):
    rows = {r[0]: r[1:] for r in _table(demo_out[1], "experts (")}
    dense = float(rows["bf16 (not quantized)"][0])
    errs = {q: [float(v) for v in rows[q]] for q in ("mxfp4", "fp8")}
    for q, (e_bf16, e_fp8, e_fp4) in errs.items():
        assert all(math.isfinite(v) and v > 0 for v in (e_bf16, e_fp8, e_fp4)), q
        # each coarser activation format adds error on top of the weights' own
        assert e_bf16 <= e_fp8 * 1.01 and e_fp8 < e_fp4, (q, e_bf16, e_fp8, e_fp4)
    assert dense < errs["fp8"][0] < errs["mxfp4"][0]


def test_demo_policy_matches_select_act_dtype(demo_out):
    rows = _table(demo_out[1], "experts", "tokens")
    seen = set()
    for quant, tokens, policy, ran, err in rows:
        m = int(tokens)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(ENV_BOUND, str(BOUND))
            mp.delenv(ENV_FORCE_BF16, raising=False)
            assert policy == select_act_dtype(m, quant=quant), (quant, m)
        assert ran == policy, (quant, m)  # the layer ran what the policy picked
        assert math.isfinite(float(err))
        seen.add((quant, policy))
    counts = {int(r[1]) for r in rows}
    assert {BOUND - 1, BOUND} <= counts  # both sides of the bound are shown
    assert {("mxfp4", "bf16"), ("mxfp4", "fp8"), ("fp8", "fp8")} <= seen


def test_demo_overrides(demo_out):
    rows = {r[0]: r[1:] for r in _table(demo_out[1], "setting (mxfp4 experts")}
    m = BOUND  # the table runs at the bound in force: the first count on the fast path
    assert rows[f"as built ({ENV_BOUND}={BOUND})"] == ["fp8", "fp8"]
    assert rows[f"{ENV_FORCE_BF16}=1"] == ["bf16", "bf16"]
    assert rows[f"{ENV_BOUND}={m + 1}"] == ["bf16", "bf16"]
    assert rows[f"{ENV_BOUND}=0"] == ["fp8", "fp8"]
    assert rows["PrecisionConfig(force_bf16_act=True)"] == ["bf16", "bf16"]
    assert rows[f"PrecisionConfig(bf16_fp8_bound={m + 1})"] == ["bf16", "bf16"]
    # the env bound wins over the config's
    assert rows[f"PrecisionConfig(bf16_fp8_bound={m + 1}) + {ENV_BOUND}={m}"] == ["fp8", "fp8"]


def _layer_args(*argv: str) -> argparse.Namespace:
    from moeprec.cli import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(["--device", "cpu", "--quick", *argv])


def test_demo_layer_gpt_oss(monkeypatch, capsys):
    """The gpt-oss-like layer (swiglu_oai, interleaved, biases) through the section function."""
    from moeprec.cli import demo

    monkeypatch.setenv(ENV_BOUND, "16")
    monkeypatch.delenv(ENV_FORCE_BF16, raising=False)
    ctx = demo.DemoContext(device=torch.device("cpu"), seed=1)
    demo.moe_layer(_layer_args("--layer", "gpt-oss-20b"), ctx)
    out = capsys.readouterr().out
    assert "swiglu_oai, interleaved gate/up, biases" in out
    res = ctx.results["layer"]
    assert res["bound"] == 16
    assert res["train"]["gate_grad_dtype"] == torch.bfloat16
    assert res["train"]["token_count_sum"] == res["train"]["tokens"] * 4
    errs = res["quantized"]["errors"]
    assert errs["none"]["bf16"] < errs["mxfp4"]["bf16"] <= errs["mxfp4"]["fp8"] * 1.01
    for (quant, m), v in res["quantized"]["policy"].items():
        assert v["ran"] == v["policy"] == select_act_dtype(m, quant=quant)


def test_demo_layer_bad_env_bound(monkeypatch):
    from moeprec.cli import demo

    monkeypatch.setenv(ENV_BOUND, "lots")
    ctx = demo.DemoContext(device=torch.device("cpu"), seed=0)
    with pytest.raises(ValueError, match=ENV_BOUND):
        demo.moe_layer(_layer_args(), ctx)


@pytest.mark.gpu
def test_demo_layer_cuda(monkeypatch, capsys):
    """On a GPU the quantized layer runs the Triton kernels: same claims as on CPU."""
    from moeprec.cli import demo

    monkeypatch.setenv(ENV_BOUND, str(BOUND))
    monkeypatch.delenv(ENV_FORCE_BF16, raising=False)
    dev = torch.device("cuda")
    ctx = demo.DemoContext(device=dev, seed=0)
    demo.moe_layer(_layer_args("--device", "cuda"), ctx)
    out = capsys.readouterr().out
    assert "cuda" in out
    res = ctx.results["layer"]
    assert res["train"]["gate_grad_dtype"] == torch.bfloat16
    assert res["train"]["logits_dtype"] == torch.float32
    fwd = res["forward"]
    assert fwd['bf16, moe_router_dtype="fp32"']["rel_l2"] < fwd["bf16, moe_router_dtype=None"]["rel_l2"]
    for quant in ("mxfp4", "fp8"):
        e = res["quantized"]["errors"][quant]
        assert e["bf16"] <= e["fp8"] * 1.01 and e["fp8"] < e["fp4"], (quant, e)
    for (quant, m), v in res["quantized"]["policy"].items():
        assert v["ran"] == v["policy"] == select_act_dtype(m, quant=quant, device=dev), (quant, m)
    for label, v in res["overrides"].items():
        assert v["ran"] == v["policy"], label
