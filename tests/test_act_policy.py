import json
from importlib import resources
from types import SimpleNamespace

import pytest
import torch

from moeprec.act_policy import (
    ENV_BOUND,
    ENV_FORCE_BF16,
    device_default_bound,
    resolve_act_dtype,
    select_act_dtype,
)

TRUTHY = ["1", "true", "TRUE", "Yes", "on", "ON"]
FALSY = ["0", "false", "False", "no", "NO", "off"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(ENV_FORCE_BF16, raising=False)
    monkeypatch.delenv(ENV_BOUND, raising=False)


def _table():
    return json.loads(resources.files("moeprec").joinpath("configs/act_dtype_bounds.json").read_text())


def _fake_gpu(monkeypatch, name, capability):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_bounds_file_has_default_512_and_cpu_bound_is_used():
    table = _table()
    assert table["default"] == 512
    b = device_default_bound(None)
    assert b == table.get("cpu", table["default"])
    assert select_act_dtype(b - 1, quant="mxfp4") == "bf16"
    assert select_act_dtype(b, quant="mxfp4") == "fp8"


@pytest.mark.parametrize("m", [0, 1, 511, 512, 513, 100_000])
def test_quant_none_and_fp8_ignore_token_count(m):
    assert select_act_dtype(m, quant="none") == "bf16"
    assert select_act_dtype(m, quant="fp8") == "fp8"


@pytest.mark.parametrize("bound", [0, 1, 7, 512, 4096])
def test_mxfp4_switches_exactly_at_env_bound(monkeypatch, bound):
    monkeypatch.setenv(ENV_BOUND, str(bound))
    if bound > 0:
        assert select_act_dtype(bound - 1, quant="mxfp4") == "bf16"
    assert select_act_dtype(bound, quant="mxfp4") == "fp8"
    assert select_act_dtype(bound + 1, quant="mxfp4") == "fp8"


def test_env_read_at_every_call(monkeypatch):
    assert select_act_dtype(100, quant="mxfp4") == "bf16"
    monkeypatch.setenv(ENV_BOUND, "100")
    assert select_act_dtype(100, quant="mxfp4") == "fp8"
    monkeypatch.setenv(ENV_BOUND, "101")
    assert select_act_dtype(100, quant="mxfp4") == "bf16"
    monkeypatch.setenv(ENV_FORCE_BF16, "1")
    assert select_act_dtype(10_000, quant="mxfp4") == "bf16"
    monkeypatch.setenv(ENV_FORCE_BF16, "0")
    assert select_act_dtype(10_000, quant="mxfp4") == "fp8"
    monkeypatch.delenv(ENV_FORCE_BF16)
    monkeypatch.delenv(ENV_BOUND)
    assert select_act_dtype(100, quant="mxfp4") == "bf16"


@pytest.mark.parametrize("value", TRUTHY)
@pytest.mark.parametrize("quant", ["mxfp4", "fp8"])
def test_force_bf16_truthy_values_on_every_quantized_path(monkeypatch, value, quant):
    monkeypatch.setenv(ENV_FORCE_BF16, value)
    monkeypatch.setenv(ENV_BOUND, "0")
    for m in (0, 1, 512, 10**6):
        assert select_act_dtype(m, quant=quant) == "bf16"


@pytest.mark.parametrize("value", FALSY)
def test_force_bf16_falsy_values(monkeypatch, value):
    monkeypatch.setenv(ENV_FORCE_BF16, value)
    assert select_act_dtype(10**6, quant="mxfp4") == "fp8"
    assert select_act_dtype(1, quant="fp8") == "fp8"


@pytest.mark.parametrize("value", ["2", "", "y", "enable", "tru", "1.0"])
def test_bad_force_value_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(ENV_FORCE_BF16, value)
    with pytest.raises(ValueError, match=ENV_FORCE_BF16):
        select_act_dtype(10, quant="mxfp4")
    # a malformed setting fails on every path, not only at large batches
    with pytest.raises(ValueError, match=ENV_FORCE_BF16):
        select_act_dtype(10, quant="none")


@pytest.mark.parametrize("value", ["-1", "1.5", "abc", "", "1e3", "+5", "0x10"])
def test_bad_bound_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(ENV_BOUND, value)
    with pytest.raises(ValueError, match=ENV_BOUND):
        select_act_dtype(10, quant="mxfp4")


def test_config_bound_and_env_precedence(monkeypatch):
    cfg = SimpleNamespace(act_dtype="auto", bf16_fp8_bound=64, force_bf16_act=False)
    assert resolve_act_dtype(63, quant="mxfp4", precision=cfg) == "bf16"
    assert resolve_act_dtype(64, quant="mxfp4", precision=cfg) == "fp8"
    # env bound is a deployment override: it beats the config
    monkeypatch.setenv(ENV_BOUND, "1000")
    assert resolve_act_dtype(64, quant="mxfp4", precision=cfg) == "bf16"
    assert resolve_act_dtype(1000, quant="mxfp4", precision=cfg) == "fp8"


def test_config_force_and_env_force():
    cfg = SimpleNamespace(act_dtype="auto", bf16_fp8_bound=0, force_bf16_act=True)
    for quant in ("mxfp4", "fp8", "none"):
        assert resolve_act_dtype(10**6, quant=quant, precision=cfg) == "bf16"


def test_config_force_holds_even_when_env_flag_is_falsy(monkeypatch):
    # SPEC: force when the env flag is truthy OR the config says so
    monkeypatch.setenv(ENV_FORCE_BF16, "0")
    cfg = SimpleNamespace(force_bf16_act=True)
    assert resolve_act_dtype(10**6, quant="fp8", precision=cfg) == "bf16"


def test_explicit_act_dtype_wins_over_everything(monkeypatch):
    monkeypatch.setenv(ENV_FORCE_BF16, "1")
    monkeypatch.setenv(ENV_BOUND, "10")
    cfg = SimpleNamespace(act_dtype="fp4", bf16_fp8_bound=5, force_bf16_act=True)
    for quant in ("none", "mxfp4", "fp8"):
        for explicit in ("bf16", "fp8", "fp4"):
            assert resolve_act_dtype(3, quant=quant, act_dtype=explicit, precision=cfg) == explicit


def test_config_act_dtype_below_force_above_policy(monkeypatch):
    cfg = SimpleNamespace(act_dtype="fp4", bf16_fp8_bound=None, force_bf16_act=False)
    assert resolve_act_dtype(1, quant="mxfp4", precision=cfg) == "fp4"
    assert resolve_act_dtype(10**6, quant="fp8", precision=cfg) == "fp4"
    # The config's act dtype is the policy of QUANTIZED experts (SPEC 4: "the act-dtype policy
    # used once the experts are quantized"); unquantized weights keep SPEC 1.2's quant="none"
    # -> "bf16" (only an explicit act_dtype argument quantizes their activations).
    assert resolve_act_dtype(1, quant="none", precision=cfg) == "bf16"
    assert resolve_act_dtype(1, quant="none", act_dtype="fp4", precision=cfg) == "fp4"
    monkeypatch.setenv(ENV_FORCE_BF16, "yes")
    assert resolve_act_dtype(1, quant="mxfp4", precision=cfg) == "bf16"


def test_duck_typed_config_with_missing_fields_uses_defaults():
    cfg = SimpleNamespace(bf16_fp8_bound=10)
    assert resolve_act_dtype(10**6, quant="mxfp4", precision=cfg) == "fp8"
    assert resolve_act_dtype(9, quant="mxfp4", precision=cfg) == "bf16"
    assert resolve_act_dtype(10**6, quant="mxfp4", precision=None) == "fp8"


@pytest.mark.parametrize("value", ["fp8", 512, True, torch.float32, object()])
def test_a_precision_that_is_no_config_is_refused(value):
    # SPEC 6: these used to be read as "no setting" and silently ignored
    with pytest.raises(TypeError, match="precision") as info:
        resolve_act_dtype(10, quant="mxfp4", precision=value)
    assert type(value).__name__ in str(info.value)


def test_real_precision_config():
    precision = pytest.importorskip("moeprec.precision")
    cfg = precision.PrecisionConfig(bf16_fp8_bound=8)
    assert resolve_act_dtype(7, quant="mxfp4", precision=cfg) == "bf16"
    assert resolve_act_dtype(8, quant="mxfp4", precision=cfg) == "fp8"
    cfg = precision.PrecisionConfig(force_bf16_act=True)
    assert resolve_act_dtype(10**6, quant="fp8", precision=cfg) == "bf16"


@pytest.mark.parametrize(
    "field,value,exc",
    [
        ("act_dtype", "int8", ValueError),
        ("force_bf16_act", "yes", TypeError),
        ("bf16_fp8_bound", -1, ValueError),
        ("bf16_fp8_bound", 1.5, TypeError),
    ],
)
def test_bad_config_fields(field, value, exc):
    cfg = SimpleNamespace(**{field: value})
    with pytest.raises(exc, match=field):
        resolve_act_dtype(10, quant="mxfp4", precision=cfg)


def test_device_policy_hopper_fp8_blackwell_fp4(monkeypatch):
    _fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    bound = _table().get("NVIDIA H100 80GB HBM3", 512)
    assert device_default_bound("cuda:0") == bound
    if bound > 0:
        assert select_act_dtype(bound - 1, quant="mxfp4", device="cuda:0") == "bf16"
    assert select_act_dtype(bound, quant="mxfp4", device=torch.device("cuda", 0)) == "fp8"
    _fake_gpu(monkeypatch, "NVIDIA B200", (10, 0))
    assert device_default_bound("cuda") == _table()["default"]  # unknown device: the default
    assert select_act_dtype(10**6, quant="mxfp4", device="cuda") == "fp4"
    assert select_act_dtype(10**6, quant="fp8", device="cuda") == "fp8"
    assert select_act_dtype(1, quant="mxfp4", device="cuda") == "bf16"
    # CPU devices never pick fp4
    assert select_act_dtype(10**6, quant="mxfp4", device="cpu") == "fp8"
    assert select_act_dtype(10**6, quant="mxfp4", device=torch.device("cpu")) == "fp8"


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        (dict(num_tokens=-1, quant="mxfp4"), ValueError, "num_tokens"),
        (dict(num_tokens=1.5, quant="mxfp4"), TypeError, "num_tokens"),
        (dict(num_tokens=True, quant="mxfp4"), TypeError, "num_tokens"),
        (dict(num_tokens=1, quant="int4"), ValueError, "quant"),
        (dict(num_tokens=1, quant="mxfp4", activation="relu"), ValueError, "activation"),
        (dict(num_tokens=1, quant="mxfp4", gate_mode="zigzag"), ValueError, "gate_mode"),
    ],
)
def test_bad_arguments(kwargs, exc, name):
    n = kwargs.pop("num_tokens")
    with pytest.raises(exc, match=name):
        select_act_dtype(n, **kwargs)


def test_bad_explicit_act_dtype():
    with pytest.raises(ValueError, match="act_dtype"):
        resolve_act_dtype(1, quant="mxfp4", act_dtype="fp16")


@pytest.mark.parametrize(
    "device,exc",
    [("bogus", ValueError), (3.5, TypeError), ([0], TypeError)],
)
def test_bad_device_names_the_argument(device, exc):
    with pytest.raises(exc, match="device"):
        select_act_dtype(10**6, quant="mxfp4", device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_names_the_argument():
    # used to be torch's AssertionError "Torch not compiled with CUDA enabled"
    with pytest.raises(ValueError, match="device.*cuda"):
        select_act_dtype(10**6, quant="mxfp4", device="cuda")
