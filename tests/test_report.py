import json

import pytest

from moeprec.cli import main
from moeprec.cli.presets import PRESETS

SMALL = ["report", "--hidden", "64", "--intermediate", "32", "--experts", "4", "--top-k", "2",
         "--error-tokens", "16", "--router-tokens", "64", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("MOEPREC_FORCE_BF16_ACT", raising=False)
    monkeypatch.delenv("MOEPREC_BF16_FP8_BOUND", raising=False)


def _run(tmp_path, *extra):
    path = tmp_path / "r.json"
    assert main(SMALL + ["--json", str(path), *extra]) == 0
    return json.loads(path.read_text())


def test_small_shape_report(tmp_path, capsys):
    res = _run(tmp_path, "--tokens", "1,511,512,600")
    out, err = capsys.readouterr()
    assert "[report" in err  # progress goes to stderr
    assert "expert path errors" in out and "router top-2 set flips" in out
    assert res["shape"]["hidden"] == 64 and res["model"] == "custom"
    picks = res["policy"]["picks"]
    assert res["policy"]["bound"] == 512
    assert [picks[m]["mxfp4"] for m in ("1", "511", "512", "600")] == ["bf16", "bf16", "fp8", "fp8"]
    assert all(p["fp8"] == "fp8" for p in picks.values())
    paths = res["paths"]
    assert set(paths) == {"bf16", "mxfp4-w4a16", "mxfp4-fp8", "mxfp4-fp4", "fp8-w8a16", "fp8"}
    for m in paths.values():
        assert not m["nan"] and 0 < m["rel_l2"] < 1 and m["max_abs"] > 0
    # the orderings any sane implementation shows on Gaussian data
    assert paths["bf16"]["rel_l2"] < paths["fp8"]["rel_l2"] < paths["mxfp4-w4a16"]["rel_l2"]
    assert paths["mxfp4-fp8"]["act_rel_l2"] < paths["mxfp4-fp4"]["act_rel_l2"]
    r = res["router"]
    assert r["fp32_vs_fp64"] <= r["bf16_vs_fp64"] and 0 <= r["bf16_vs_fp32"] <= 1
    assert res["sample"] == {"experts": 4, "intermediate": 32, "top_k": 2, "error_tokens": 16,
                             "budget_melems": 16.0}


def test_env_bound_and_force_shown(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOEPREC_BF16_FP8_BOUND", "8")
    res = _run(tmp_path, "--tokens", "7,8")
    assert res["policy"]["bound"] == 8 and res["policy"]["bound_source"] == "MOEPREC_BF16_FP8_BOUND"
    assert [res["policy"]["picks"][m]["mxfp4"] for m in ("7", "8")] == ["bf16", "fp8"]
    monkeypatch.setenv("MOEPREC_FORCE_BF16_ACT", "1")
    res = _run(tmp_path, "--tokens", "100")
    assert res["policy"]["picks"]["100"] == {"mxfp4": "bf16", "fp8": "bf16"}
    assert "MOEPREC_FORCE_BF16_ACT=1" in capsys.readouterr().out


def test_budget_samples_experts_and_intermediate(tmp_path):
    from argparse import Namespace

    from moeprec.cli.report import sample_sizes

    ns = Namespace(budget_melems=16.0, experts_sample=None, intermediate_sample=None)
    assert sample_sizes(PRESETS["qwen3-30b-a3b"], ns) == (3, 768)
    n, inter = sample_sizes(PRESETS["mixtral-8x7b"], ns)
    assert n == 1 and inter % 32 == 0 and 3 * 4096 * inter <= 16e6
    ns = Namespace(budget_melems=16.0, experts_sample=2, intermediate_sample=64)
    assert sample_sizes(PRESETS["deepseek-v3"], ns) == (2, 64)


def test_preset_with_biases_and_interleaved(tmp_path):
    res = _run(tmp_path, "--model", "gpt-oss-20b", "--hidden", "64", "--intermediate", "32",
               "--experts", "4", "--top-k", "2", "--tokens", "1")
    assert res["shape"]["activation"] == "swiglu_oai" and res["shape"]["bias"]
    assert res["model"] == "gpt-oss-20b (modified)"


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "r.png"
    _run(tmp_path, "--tokens", "1", "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--top-k", "5"], "top-k"),
        (["--hidden", "48"], "multiples of 32"),
        (["--experts-sample", "9"], "experts-sample"),
        (["--intermediate-sample", "40"], "intermediate-sample"),
        (["--error-tokens", "0"], "error-tokens"),
    ],
)
def test_bad_arguments(extra, match):
    with pytest.raises(ValueError, match=match):
        main(SMALL + extra)


def test_bad_token_list(capsys):
    with pytest.raises(SystemExit):
        main(SMALL + ["--tokens", "1,x"])
    assert "--tokens" in capsys.readouterr().err
