"""`moeprec bench` / `moeprec tune` argument handling and the launch-configuration lookup (CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from moeprec.cli import main
from moeprec.kernels import tuning


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
@pytest.mark.parametrize("cmd", ["bench", "tune"])
def test_commands_exit_cleanly_without_gpu(cmd, capsys):
    assert main([cmd, "--shapes", "qwen3-30b-a3b", "--M", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,name", [("--shapes", "llama", "--shapes"),
                                             ("--paths", "int3", "--paths"),
                                             ("--M", "1,x", "--M"), ("--M", "0", "--M")])
def test_bad_selection_names_the_flag(flag, value, name):
    with pytest.raises(ValueError, match=name):
        main(["bench", flag, value])


@pytest.fixture
def tuned_table(tmp_path, monkeypatch):
    """install(device_name, table): serve `table` as that device's tuned file (caches cleared
    before and after)."""
    monkeypatch.setenv("MOEPREC_FUSED_MOE_CONFIG_DIR", str(tmp_path))

    def install(device_name, table):
        (tmp_path / tuning.device_file_name(device_name)).write_text(json.dumps(table))
        tuning.clear_caches()

    yield install
    tuning.clear_caches()


def test_config_lookup_nearest_m_and_fallback(tuned_table):
    key = tuning.shape_key(8, 64, 32, 2)
    small = {"BLOCK_M": 16, "s1": {"BLOCK_N": 32, "BLOCK_K": 64}, "s2": {"BLOCK_N": 64, "BLOCK_K": 64}}
    large = {"BLOCK_M": 128, "s1": {"BLOCK_N": 128, "BLOCK_K": 128, "num_stages": 6},
             "s2": {"BLOCK_N": 128, "BLOCK_K": 64}}
    assert tuning.device_file_name("Test GPU/X") == "fused_moe_Test_GPU_X.json"
    tuned_table("Test GPU/X", {"bf16": {key: {"1": small, "4096": large}}})
    assert tuning.get_config("bf16", 2, 8, 64, 32, 2, "Test GPU/X")["BLOCK_M"] == 16
    cfg = tuning.get_config("bf16", 3000, 8, 64, 32, 2, "Test GPU/X")
    assert cfg["BLOCK_M"] == 128
    # 6 stages of a 128 x 128 A tile + 256 x 128 weight rows cannot fit: cut down
    assert cfg["s1"]["num_stages"] < 6
    # another shape or device: the heuristic
    assert tuning.get_config("bf16", 2, 8, 64, 48, 2, "Test GPU/X") == tuning.fix_config(
        tuning.default_config("bf16", 2, 8, 64, 48, 2), "bf16")


@pytest.mark.parametrize("path", tuning.PATHS)
def test_fixed_configs_are_legal(path):
    for M in (1, 64, 1024, 16384):
        cfg = tuning.get_config(path, M, 128, 2048, 768, 8)
        for st in ("s1", "s2"):
            s = cfg[st]
            assert s["BLOCK_K"] >= (64 if path.startswith("w4") and not cfg["dequant"] else 16)
            assert s["num_stages"] >= 2 and s["num_warps"] in (4, 8)


def test_one_pair_blocks_do_not_carry_over_to_larger_batches(tuned_table):
    # a BLOCK_M = 1 entry streams an expert's weights once per token: tuned at M = 4, it serves
    # M <= 4 but not M = 64 (16 tokens per expert here), where the heuristic's tiles take over
    key = tuning.shape_key(8, 64, 32, 2)
    one = {"BLOCK_M": 1, "s1": {"BLOCK_N": 16, "BLOCK_K": 256}, "s2": {"BLOCK_N": 16, "BLOCK_K": 256}}
    tuned_table("Test GPU/Y", {"w4a16": {key: {"4": one}}})
    assert tuning.get_config("w4a16", 3, 8, 64, 32, 2, "Test GPU/Y")["BLOCK_M"] == 1
    assert tuning.get_config("w4a16", 64, 8, 64, 32, 2, "Test GPU/Y")["BLOCK_M"] == 32


def test_tuned_entries_serve_batches_within_a_factor_of_4(tuned_table):
    # a table tuned at M = 16 only must not set launch settings for prefill batches
    key = tuning.shape_key(8, 64, 32, 2)
    tiny = {"BLOCK_M": 16, "s1": {"BLOCK_N": 32, "BLOCK_K": 32}, "s2": {"BLOCK_N": 32, "BLOCK_K": 32}}
    tuned_table("Test GPU/Z", {"bf16": {key: {"16": tiny}}})
    for M in (4, 16, 64):
        assert tuning.get_config("bf16", M, 8, 64, 32, 2, "Test GPU/Z")["s1"]["BLOCK_N"] == 32
    for M in (3, 65, 4096):  # more than 4x away: the heuristic
        assert tuning.get_config("bf16", M, 8, 64, 32, 2, "Test GPU/Z") == tuning.fix_config(
            tuning.default_config("bf16", M, 8, 64, 32, 2), "bf16")


def test_equally_near_tuned_batches_pick_the_larger(tuned_table):
    key = tuning.shape_key(8, 64, 32, 2)
    st = {"BLOCK_N": 32, "BLOCK_K": 64}
    table = {"bf16": {key: {"256": {"BLOCK_M": 32, "s1": st, "s2": st},
                            "4096": {"BLOCK_M": 128, "s1": st, "s2": st}}}}
    tuned_table("Test GPU/T", table)
    assert tuning.get_config("bf16", 1024, 8, 64, 32, 2, "Test GPU/T")["BLOCK_M"] == 128
    assert tuning.get_config("bf16", 1000, 8, 64, 32, 2, "Test GPU/T")["BLOCK_M"] == 32


def test_mxfp4_prefill_decodes_the_weights_first(tuned_table):
    # from DEQUANT_MIN_TOKENS_PER_EXPERT tokens per expert on, unless a tuned entry says
    # otherwise, with the settings of the plain path that runs the decoded weights
    E, H, I, k = 8, 64, 32, 2  # noqa: E741
    edge = tuning.DEQUANT_MIN_TOKENS_PER_EXPERT * E // k
    fp8_edge = tuning.DEQUANT_FP8_MIN_TOKENS_PER_EXPERT * E // k
    for path, plain, at in (("w4a16", "bf16", edge), ("w4a8", "fp8", fp8_edge)):
        assert not tuning.get_config(path, at - 1, E, H, I, k)["dequant"]
        big = tuning.get_config(path, at, E, H, I, k)
        assert big["dequant"] and big["s1"] == tuning.get_config(plain, at, E, H, I, k)["s1"]
    for path in ("bf16", "fp8", "w8a16"):
        assert not tuning.get_config(path, 16 * edge, E, H, I, k)["dequant"]
    key = tuning.shape_key(E, H, I, k)
    tiles = {"BLOCK_M": 128, "s1": {"BLOCK_N": 64, "BLOCK_K": 128}, "s2": {"BLOCK_N": 64, "BLOCK_K": 128}}
    tuned_table("Test GPU/D", {
        "w4a16": {key: {str(edge): dict(tiles, dequant=False), str(4 * edge): tiles}},
        "bf16": {key: {str(4 * edge): dict(tiles, BLOCK_M=64)}}})
    assert not tuning.get_config("w4a16", edge, E, H, I, k, "Test GPU/D")["dequant"]
    # an entry from before the choice existed: decoded, with the bf16 path's tuned settings
    cfg = tuning.get_config("w4a16", 4 * edge, E, H, I, k, "Test GPU/D")
    assert cfg["dequant"] and cfg["BLOCK_M"] == 64


def test_tune_searches_one_pair_blocks_for_decode_with_16_bit_activations():
    from moeprec.cli.tune import _block_m_candidates

    assert _block_m_candidates("w4a16", 1, 128, 8) == [1, 16]
    assert _block_m_candidates("bf16", 16, 128, 8) == [1, 16]
    assert 1 not in _block_m_candidates("w4a8", 1, 128, 8)  # fp8 activations: tensor cores
    assert 1 not in _block_m_candidates("w4a16", 1024, 128, 8)


def test_bench_table_puts_each_path_against_bf16():
    from moeprec.cli.bench import _table, add_bf16_ratios

    def row(path, M, ms):
        return {"shape": "qwen3-30b-a3b", "path": path, "M": M, "ms": ms, "TFLOPs": 1.0,
                "weight_GBps": 1.0, "floor_ms": ms / 2, "pct_floor": 50.0}

    rows = [row("bf16", 1, 0.036), row("mxfp4-w4a16", 1, 0.012), row("mxfp4-w4a16", 4, 0.05),
            {"shape": "qwen3-30b-a3b", "path": "bf16", "M": 4, "error": "failed"}]
    add_bf16_ratios(rows)
    assert rows[1]["x_bf16"] == pytest.approx(3.0) and rows[0]["x_bf16"] == pytest.approx(1.0)
    assert "x_bf16" not in rows[2]  # its bf16 point failed: no ratio, not a made-up one
    lines = _table([r for r in rows if "ms" in r]).splitlines()
    assert "x bf16" in lines[0]
    assert lines[3].split()[4] == "3.00"
    assert lines[4].split()[4] == "1.0"  # the ratio column is blank: TFLOP/s comes next


@pytest.fixture
def fake_clock(monkeypatch):
    """install(model): `tune.tune_point` runs without a GPU, each config "timed" as model(cfg)
    ms (the kernels, inputs, graphs and device name faked); returns the list of timed configs."""
    import torch

    import moeprec.kernels.fused_moe_triton as fm
    from moeprec.cli import tune

    def install(model):
        timed = []
        monkeypatch.setattr(fm, "fused_moe_triton_impl", lambda *a, config, **kw: config)
        monkeypatch.setattr(tune, "make_inputs", lambda *a, **kw: [(None, None, None)])
        monkeypatch.setattr(tune, "_as_graphs", lambda fns: fns)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "none")

        def fake_ms(fns, reps):
            cfg = fns[0]()
            timed.append(cfg)
            return model(cfg)

        monkeypatch.setattr(tune, "_median_ms", fake_ms)
        return timed

    return install


@pytest.mark.parametrize("tma_pays", [True, False])
def test_tune_tries_tma_weight_tiles_per_stage(tma_pays, fake_clock):
    # the search with a fake clock (no GPU): a timing model in which TMA weight tiles save time
    # in each stage (or cost time) must end on tma_b in both stages (or in neither)
    from moeprec.cli import tune

    sign = -1 if tma_pays else 1
    timed = fake_clock(lambda cfg: 1.0 + sign * (0.1 * cfg["s1"]["tma_b"] + 0.05 * cfg["s2"]["tma_b"]))
    r = tune.tune_point("qwen3-30b-a3b", "bf16", 4096, {"w1": None, "w2": None}, 1, None)
    assert r["config"]["s1"]["tma_b"] == tma_pays and r["config"]["s2"]["tma_b"] == tma_pays
    assert any(c["s1"]["tma_b"] for c in timed) and any(c["s2"]["tma_b"] for c in timed)
    assert r["ms"] == pytest.approx(0.85 if tma_pays else 1.0)


@pytest.mark.parametrize("M,pdl_pays", [(16, True), (16, False), (4096, True)])
def test_tune_tries_programmatic_dependent_launch_on_short_calls(M, pdl_pays, fake_clock):
    # fake clock: where "pdl" saves time the search must end on it, but only for calls short
    # enough to be timed as graphs (M <= 256); where it costs time, never
    from moeprec.cli import tune

    timed = fake_clock(lambda cfg: 1.0 + (-0.1 if pdl_pays else 0.1) * cfg["pdl"])
    r = tune.tune_point("qwen3-30b-a3b", "bf16", M, {"w1": None, "w2": None}, 1, None)
    graphed = M <= 256
    assert r["config"]["pdl"] == (graphed and pdl_pays)
    assert any(c["pdl"] for c in timed) == graphed


@pytest.mark.parametrize("base_ms,ring_ms,ring_pays", [
    (1.0, 0.9, True),          # 10%: kept
    (1.0, 0.995, False),       # 0.5% (5 us): noise
    (0.022, 0.0215, False),    # 2.3% but 0.5 us at a 22 us point: noise
    (0.080, 0.077, True),      # 3.75%, 3 us: kept
])
def test_tune_refine_tries_the_ring_and_rematches_its_start(base_ms, ring_ms, ring_pays,
                                                            fake_clock):
    # fake clock: --refine starts from the table's entry, tries the TMA ring per stage, and keeps
    # a change only if it beats the start in a rematch by 1% and 1 us; a start timed slow once
    # (first after compiling) must not let a noise-sized "win" into the table
    from moeprec.cli import tune

    def model(cfg):
        if len(timed) == 1:
            return 1.2 * base_ms  # the start, straight after compiling
        s1 = cfg["s1"]
        return ring_ms if (s1["ring"], s1.get("maxnreg")) == (2, 64) else base_ms

    timed = fake_clock(model)
    r = tune.tune_point("mixtral-8x7b", "mxfp4-w4a16", 1, {"w1": None, "w2": None}, 1, None,
                        refine=True)
    assert timed[0]["BLOCK_M"] == 1 and not timed[0]["s1"]["ring"]
    assert all(c["BLOCK_M"] == 1 for c in timed)  # no tile search
    assert any(c["s2"]["ring"] for c in timed)  # both stages tried
    # with a ring taken, that stage's rows per program again (half and double)
    ring = [c["s1"] for c in timed if c["s1"]["ring"] == 2 and c["s1"]["maxnreg"] == 64]
    assert {s["BLOCK_N"] for s in ring} - {timed[0]["s1"]["BLOCK_N"]}
    assert {s["BLOCK_K"] for s in ring} - {timed[0]["s1"]["BLOCK_K"]}  # and longer steps
    s1 = r["config"]["s1"]
    assert (s1["ring"], s1.get("maxnreg")) == ((2, 64) if ring_pays else (0, None))
    assert r["ms"] == pytest.approx(ring_ms if ring_pays else base_ms)
