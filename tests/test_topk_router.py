"""TokenChoiceTopKRouter and RouterOutput (SPEC 2)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from moeprec import RouterGateLinear, RouterOutput, TokenChoiceTopKRouter
from moeprec.routing.balance import count_tokens_per_expert

D = 32


def _router(num_experts=16, top_k=4, dtype=torch.float32, **kw):
    r = TokenChoiceTopKRouter(D, num_experts, top_k, **kw)
    r.init_weights(0.2)
    return r.to(dtype)


def _sets(selected):
    return [frozenset(row.tolist()) for row in selected]


def test_forward_shapes_dtypes_and_route_fields():
    r = _router(router_dtype="fp32", dtype=torch.bfloat16)
    x = torch.randn(10, D, dtype=torch.bfloat16)
    top, sel, counts = r(x)
    assert top.shape == (10, 4) and top.dtype == torch.float32
    assert sel.shape == (10, 4) and sel.dtype == torch.int64
    assert counts.shape == (16,) and counts.dtype == torch.int64
    out = r.route(x)
    assert isinstance(out, RouterOutput)
    assert out._fields == ("top_scores", "selected_experts", "num_tokens_per_expert", "scores", "logits")
    assert out.scores.shape == (10, 16) and out.logits.dtype == torch.float32
    assert torch.equal(out.top_scores, top) and torch.equal(out.selected_experts, sel)
    assert isinstance(r.gate, RouterGateLinear)
    assert r.top_k == 4 and r.num_experts == 16


@pytest.mark.parametrize(
    "router_dtype, logits_dtype, score_dtype",
    [(None, torch.bfloat16, torch.float32), ("fp32", torch.float32, torch.float32), ("fp64", torch.float64, torch.float64)],
)
def test_logits_and_scores_dtypes(router_dtype, logits_dtype, score_dtype):
    r = _router(router_dtype=router_dtype, dtype=torch.bfloat16)
    out = r.route(torch.randn(5, D, dtype=torch.bfloat16))
    assert out.logits.dtype == logits_dtype
    assert out.scores.dtype == score_dtype and out.top_scores.dtype == score_dtype


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_scores_selection_and_counts_against_a_direct_computation(score_func):
    r = _router(score_func=score_func, router_dtype="fp32", dtype=torch.bfloat16)
    x = torch.randn(64, D, dtype=torch.bfloat16)
    out = r.route(x)
    logits = x.float() @ r.gate.weight.float().t()
    scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    assert torch.equal(out.logits, logits)
    assert torch.equal(out.scores, scores)
    for t in range(64):
        want = sorted(range(16), key=lambda e: -scores[t, e].item())[:4]
        assert set(out.selected_experts[t].tolist()) == set(want)
        assert torch.equal(out.top_scores[t], scores[t, out.selected_experts[t]])
    want_counts = torch.tensor([(out.selected_experts == e).sum().item() for e in range(16)])
    assert torch.equal(out.num_tokens_per_expert, want_counts)
    assert out.num_tokens_per_expert.sum() == 64 * 4


def test_expert_bias_changes_selection_not_scores():
    r = _router(router_dtype="fp32")
    x = torch.randn(40, D)
    plain = r.route(x)
    bias = torch.zeros(16)
    bias[7] = 10.0  # every token now picks expert 7...
    biased = r.route(x, expert_bias=bias)
    assert (biased.selected_experts == 7).any(dim=1).all()
    assert not (plain.selected_experts == 7).any(dim=1).all()
    assert torch.equal(biased.scores, plain.scores)
    # ...but is weighted by its un-biased score
    assert torch.equal(biased.top_scores, plain.scores.gather(1, biased.selected_experts))
    assert biased.num_tokens_per_expert[7] == 40


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_route_norm_and_route_scale(score_func):
    x = torch.randn(20, D)
    base = _router(score_func=score_func)
    normed = _router(score_func=score_func, route_norm=True, route_scale=2.5)
    normed.load_state_dict(base.state_dict())
    a, b = base.route(x), normed.route(x)
    assert torch.equal(a.selected_experts, b.selected_experts)
    torch.testing.assert_close(b.top_scores, 2.5 * a.top_scores / (a.top_scores.sum(-1, keepdim=True) + 1e-20))
    torch.testing.assert_close(b.top_scores.sum(-1), torch.full((20,), 2.5))
    scaled = _router(score_func=score_func, route_scale=3.0)
    scaled.load_state_dict(base.state_dict())
    torch.testing.assert_close(scaled.route(x).top_scores, 3.0 * a.top_scores)


def _brute_force_groups(choice, num_groups, kept, top_k):
    """Per token: the best `kept` groups by the sum of each group's two best scores, then top_k."""
    t, e = choice.shape
    per = e // num_groups
    result = []
    for row in choice.tolist():
        groups = [sorted(row[g * per:(g + 1) * per], reverse=True) for g in range(num_groups)]
        gscore = [sum(s[:2]) for s in groups]
        best = max(itertools.combinations(range(num_groups), kept), key=lambda c: sum(gscore[g] for g in c))
        allowed = [i for i in range(e) if i // per in best]
        result.append(frozenset(sorted(allowed, key=lambda i: -row[i])[:top_k]))
    return result


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("groups, kept, top_k", [(4, 2, 4), (8, 3, 6), (4, 1, 2), (4, 4, 3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_group_limited_routing_against_brute_force(score_func, groups, kept, top_k, with_bias):
    r = _router(
        num_experts=16, top_k=top_k, score_func=score_func,
        num_expert_groups=groups, num_limited_groups=kept,
    )
    x = torch.randn(50, D)
    bias = torch.randn(16) * 0.1 if with_bias else None
    out = r.route(x, expert_bias=bias)
    choice = out.scores + (bias if with_bias else 0)
    assert _sets(out.selected_experts) == _brute_force_groups(choice, groups, kept, top_k)
    assert torch.equal(out.top_scores, out.scores.gather(1, out.selected_experts))
    # selected experts lie in exactly `kept` groups or fewer
    assert all(len({e // (16 // groups) for e in row}) <= kept for row in out.selected_experts.tolist())


def test_groups_matter():
    # The limit changes decisions for some tokens (else the test above could pass vacuously).
    x = torch.randn(200, D)
    plain = _router(top_k=4)
    grouped = _router(top_k=4, num_expert_groups=8, num_limited_groups=2)
    grouped.load_state_dict(plain.state_dict())
    assert _sets(plain.route(x).selected_experts) != _sets(grouped.route(x).selected_experts)


def test_group_of_one_expert_uses_its_one_score():
    r = _router(num_experts=8, top_k=2, num_expert_groups=8, num_limited_groups=2)
    out = r.route(torch.randn(30, D))
    assert _sets(out.selected_experts) == _brute_force_groups(out.scores, 8, 2, 2)


@pytest.mark.parametrize("t", [0, 1])
def test_edge_token_counts(t):
    r = _router(router_dtype="fp32", num_expert_groups=4, num_limited_groups=2)
    top, sel, counts = r(torch.randn(t, D))
    assert top.shape == (t, 4) and sel.shape == (t, 4)
    assert counts.sum() == 4 * t


def test_nan_token_stays_in_its_row():
    r = _router(router_dtype="fp32", num_expert_groups=4, num_limited_groups=2)
    x = torch.randn(12, D)
    clean = r.route(x)
    x[5] = float("nan")
    dirty = r.route(x)
    rows = [i for i in range(12) if i != 5]
    assert torch.equal(dirty.top_scores[rows], clean.top_scores[rows])
    assert torch.equal(dirty.selected_experts[rows], clean.selected_experts[rows])


def test_counts_under_compile_equal_bincount():
    sel = torch.randint(0, 16, (100, 4))
    want = torch.bincount(sel.flatten(), minlength=16)
    torch._dynamo.reset()
    got = torch.compile(count_tokens_per_expert, fullgraph=True, backend="eager")(sel, 16)
    assert torch.equal(count_tokens_per_expert(sel, 16), want)
    assert torch.equal(got, want) and got.dtype == torch.int64


def test_router_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    r = _router(router_dtype="fp32", score_func="sigmoid", route_norm=True,
                num_expert_groups=4, num_limited_groups=2, dtype=torch.bfloat16)
    x = torch.randn(24, D, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(16) * 0.01
    eager = r(x, bias)
    comp = torch.compile(r, fullgraph=True, backend="aot_eager")(x, bias)
    for a, b in zip(eager, comp):
        assert torch.equal(a, b)
    ga = torch.autograd.grad(eager[0].sum(), [x, r.gate.weight])
    gb = torch.autograd.grad(comp[0].sum(), [x, r.gate.weight])
    for a, b in zip(ga, gb):
        assert torch.equal(a, b)


def test_init_weights():
    r = TokenChoiceTopKRouter(256, 64, 2, gate_bias=True)
    with torch.no_grad():
        r.gate.bias.fill_(1.0)
    r.init_weights(0.02)
    assert abs(r.gate.weight.std().item() - 0.02) < 0.002
    assert r.gate.weight.abs().max() <= 2.0
    assert torch.equal(r.gate.bias, torch.zeros(64))


def test_gradients_reach_the_gate_in_model_dtypes():
    r = _router(router_dtype="fp32", dtype=torch.bfloat16, gate_bias=True)
    x = torch.randn(8, D, dtype=torch.bfloat16, requires_grad=True)
    r(x)[0].sum().backward()
    assert x.grad.dtype == torch.bfloat16 and r.gate.weight.grad.dtype == torch.bfloat16
    assert r.gate.bias.grad.dtype == torch.bfloat16 and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kw, exc, words",
    [
        (dict(top_k=17), ValueError, ["top_k", "16", "17"]),
        (dict(top_k=0), ValueError, ["top_k", "0"]),
        (dict(score_func="relu"), ValueError, ["score_func", "relu"]),
        (dict(router_dtype="bf16"), ValueError, ["moe_router_dtype", "bf16"]),
        (dict(num_expert_groups=5, num_limited_groups=1), ValueError, ["num_expert_groups", "16", "5"]),
        (dict(num_expert_groups=4, num_limited_groups=5), ValueError, ["num_limited_groups", "4", "5"]),
        (dict(num_expert_groups=4), ValueError, ["num_limited_groups", "None"]),
        (dict(num_limited_groups=2), ValueError, ["num_expert_groups", "None"]),
        (dict(top_k=9, num_expert_groups=4, num_limited_groups=2), ValueError, ["top_k", "8", "9"]),
        (dict(route_scale="2"), TypeError, ["route_scale", "str"]),
        (dict(route_norm=1), TypeError, ["route_norm", "int"]),
    ],
)
def test_bad_constructor_arguments(kw, exc, words):
    args = dict(dim=D, num_experts=16, top_k=4)
    args.update(kw)
    with pytest.raises(exc) as info:
        TokenChoiceTopKRouter(**args)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "x, bias, exc, words",
    [
        (torch.randn(3, D + 1), None, ValueError, ["x", str(D + 1)]),
        (torch.randn(2, 3, D), None, ValueError, ["x", "2-D"]),
        (torch.ones(3, D, dtype=torch.int64), None, TypeError, ["x", "int64"]),
        (torch.randn(3, D), torch.zeros(15), ValueError, ["expert_bias", "15"]),
        (torch.randn(3, D), torch.zeros(16, dtype=torch.int32), TypeError, ["expert_bias", "int32"]),
    ],
)
def test_bad_route_inputs(x, bias, exc, words):
    with pytest.raises(exc) as info:
        _router().route(x, bias)
    for word in words:
        assert word in str(info.value)


def test_demo_router_precision_section(capsys):
    import argparse

    from moeprec.cli import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--tokens", "256"])
    ctx = demo.DemoContext(device=torch.device("cpu"), seed=0)
    demo.router_precision(args, ctx)
    out = capsys.readouterr().out
    for label in ("bf16 (None)", "fp32", "fp64", "top-k set flips vs fp64"):
        assert label in out
    flips = ctx.results["router_flip_rate"]
    assert flips["fp64"] == 0.0 and flips["fp32"] <= 1 / 256  # summation order only
    assert demo.router_precision in demo.SECTIONS


def test_inputs_on_another_device_name_the_argument():
    # SPEC 6: devices are checked (an x elsewhere used to surface from deep inside the GEMM,
    # naming the router's weight instead of x)
    r = _router()
    with pytest.raises(ValueError, match="x.*meta"):
        r.route(torch.randn(3, D, device="meta"))
    with pytest.raises(ValueError, match="expert_bias.*meta"):
        r.route(torch.randn(3, D), torch.zeros(16, device="meta"))
