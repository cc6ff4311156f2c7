"""Expert parallelism over gloo on CPU: 2 and 4 processes against the single-process layer.

Each world size is launched once (a forkserver that has torch preloaded makes that cheap) and every
rank runs all checks in one go; the tests below read the per-rank verdicts. In a check, every rank
builds the same MoE (same seed) and an expert-parallel copy of it, feeds both its own tokens, and
compares outputs, input gradients, replicated-parameter gradients (local: no all-reduce) and
expert gradients (the sum over ranks of the unsharded gradients, restricted to the local shard).
Checks record mismatches instead of raising so that all ranks keep issuing the same collectives.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import socket
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

D, I = 16, 12  # tiny training shapes (no alignment constraint on the reference path)
DQ, IQ = 32, 32  # quantized shapes: MXFP4 blocks of 32 along both GEMMs' K
WORLD_TIMEOUT_S = 120  # a hung world fails the test instead of hanging CI
COLLECTIVE_TIMEOUT_S = 30


# ------------------------------------------------------------------------------ in the workers


class _Errors(list):
    """Mismatches of one check on one rank (recorded, not raised: keeps collectives aligned)."""

    def close(self, what, got, want, *, atol, rtol):
        if got is None or want is None:
            if got is not want:
                self.append(f"{what}: one side is None (got {got is None}, want {want is None})")
            return
        if got.shape != want.shape:
            self.append(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            return
        got, want = got.detach().double(), want.detach().double()
        if not torch.allclose(got, want, atol=atol, rtol=rtol):
            err = (got - want).abs().max().item()
            self.append(f"{what}: max abs err {err:.3g} (atol {atol}, rtol {rtol})")

    def check(self, what, ok):
        if not ok:
            self.append(what)


def _make_moe(dtype=torch.float32, dim=D, hidden=I, precision=None, **kw):
    from moeprec.args import MoEArgs
    from moeprec.moe import MoE

    torch.manual_seed(0)  # identical weights on every rank
    moe = MoE(MoEArgs(**kw), dim, hidden, precision)
    # O(1) outputs and gradients, so that tolerances are relative to something (std 0.02 gives
    # ~1e-4 outputs, under which an absolute tolerance would pass anything)
    moe.init_weights(0.5)
    if kw.get("mlp_bias"):  # zero-initialised biases would hide a bias-sharding bug
        with torch.no_grad():
            moe.experts.b1.normal_(0, 0.1)
            moe.experts.b2.normal_(0, 0.1)
    return moe.to(dtype)


def _ep_copy(moe):
    from moeprec.parallel import expert_parallel

    return expert_parallel(copy.deepcopy(moe))


def _tokens(rank, n, dtype, dim=D):
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(1, n, dim, generator=g).to(dtype)


# Training cases: MoEArgs overrides, dtype, tokens on rank r of W, tolerances.
_TRAIN_CASES = {
    "k2_uneven": (dict(num_experts=8, top_k=2), torch.float32, lambda r, W: 3 + 5 * r, 1e-5),
    "k3_bias_shared_score_first": (
        dict(num_experts=8, top_k=3, mlp_bias=True, num_shared_experts=1,
             score_before_experts=True, route_norm=True),
        torch.float32, lambda r, W: 7 - r, 1e-5,
    ),
    "single_token_and_empty_rank": (
        dict(num_experts=8, top_k=2), torch.float32, lambda r, W: (1, 9, 0, 4)[r % 4], 1e-5,
    ),
    "bf16": (dict(num_experts=8, top_k=2), torch.bfloat16, lambda r, W: 6 + 2 * r, 2e-2),
}


def _run_train_case(errs, rank, W, name):
    kw, dtype, ntok, tol = _TRAIN_CASES[name]
    ref = _make_moe(dtype, **kw)
    ep = _ep_copy(ref)
    _compare_fwd_bwd(errs, ref, ep, _tokens(rank, ntok(rank, W), dtype), rank, W, tol)


def _compare_fwd_bwd(errs, ref, ep, x, rank, W, tol):
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7 + rank))
    outs, grads = [], []
    for model in (ref, ep):
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        (out.float() * g).sum().backward()
        outs.append(out)
        grads.append(xi.grad)
    errs.close("output", outs[1], outs[0], atol=tol, rtol=tol)
    errs.close("input grad", grads[1], grads[0], atol=tol, rtol=tol)
    # replicated parameters: the local gradient, exactly what the unsharded layer gives here
    ep_params = dict(ep.named_parameters())
    for pname, p in ref.named_parameters():
        if not pname.startswith("experts."):
            errs.close(f"grad {pname}", ep_params[pname].grad, p.grad, atol=tol, rtol=tol)
    # expert shards: the sum over ranks of the unsharded gradients of this rank's block
    El = ep.experts.w1.shape[0]
    for pname in ("w1", "w2", "b1", "b2"):
        p = getattr(ref.experts, pname)
        if p is None:
            continue
        full = p.grad.float() if p.grad is not None else torch.zeros(p.shape)
        dist.all_reduce(full)
        got = getattr(ep.experts, pname).grad
        got = torch.zeros(El, *p.shape[1:]) if got is None else got
        errs.close(f"grad experts.{pname}", got, full[rank * El:(rank + 1) * El],
                   atol=tol * W, rtol=tol)


def _check_skewed_routing(errs, rank, W):
    """All tokens pick experts of rank 0: every other rank receives nothing, sends everything."""
    k = 2
    ref = _make_moe(num_experts=2 * W, top_k=k, load_balance_coeff=1e-3)
    with torch.no_grad():
        ref.expert_bias[:k] = 100.0  # selection uses scores + bias: experts 0..k-1 always win
    ep = _ep_copy(ref)
    _compare_fwd_bwd(errs, ref, ep, _tokens(rank, 5, torch.float32), rank, W, 1e-5)
    if rank > 0:
        errs.check("non-owner rank got nonzero expert grads",
                   ep.experts.w1.grad is None or not ep.experts.w1.grad.any())


def _check_expert_bias_update(errs, rank, W):
    """Bias updates use the token counts of all ranks, so the replicated bias stays replicated."""
    ref = _make_moe(num_experts=8, top_k=2, load_balance_coeff=0.01)
    ep = _ep_copy(ref)
    ref.train()
    ep.train()
    local = copy.deepcopy(ref)
    for step in range(2):
        x = _tokens(rank + 10 * step, 6 + rank, torch.float32)
        for model in (ref, ep, local):
            with torch.no_grad():
                model(x)
    local.update_expert_bias()  # what an update from this rank's counts alone would give
    dist.all_reduce(ref.tokens_per_expert)
    ref.update_expert_bias()
    ep.update_expert_bias()
    errs.close("expert_bias after update", ep.expert_bias, ref.expert_bias, atol=0, rtol=0)
    gathered = [torch.empty_like(ep.expert_bias) for _ in range(W)]
    dist.all_gather(gathered, ep.expert_bias)
    errs.check("expert_bias differs between ranks", all(torch.equal(b, gathered[0]) for b in gathered))
    # the check above can fail: local-only counts give a different bias on some rank
    differs = torch.tensor(float(not torch.equal(local.expert_bias, ref.expert_bias)))
    dist.all_reduce(differs, op=dist.ReduceOp.MAX)
    errs.check("test is insensitive: local counts gave the global bias on every rank", differs.item() == 1)


def _check_quantized(errs, rank, W, quant, bound=None, **kw):
    """Quantized inference. `bound`: the bf16/fp8 activation bound, set between the ranks' token
    counts so that ranks differ in activation dtype (the owner must use the sender's)."""
    from moeprec.precision import PrecisionConfig

    precision = None if bound is None else PrecisionConfig(bf16_fp8_bound=bound)
    ref = _make_moe(torch.bfloat16, dim=DQ, hidden=IQ, precision=precision, num_experts=4 * W,
                    top_k=3, **kw)
    ref.quantize_(quant)
    ref.eval()
    ep = _ep_copy(ref)
    x = _tokens(rank, (5, 2, 11, 0)[rank % 4], torch.bfloat16, DQ)
    with torch.no_grad():
        want, got = ref(x), ep(x)
    # the owner returns each weighted row in bf16 before the fp32 sum: a few bf16 ulps
    scale = want.float().abs().max().item() if want.numel() else 1.0
    errs.close(f"{quant} output", got, want, atol=1e-2 * scale, rtol=1e-2)


def _check_dp_x_ep(errs, rank, W):
    """The docs' 2-D recipe: experts over the "ep" dim, counts over the world, expert grads summed
    over "dp", the rest over the world, all divided by dp * ep: the single-process gradients of the
    mean loss over every rank's tokens."""
    if W != 4:
        return
    from torch.distributed.device_mesh import init_device_mesh

    from moeprec.parallel import expert_parallel

    dp, ep_size = 2, 2
    mesh = init_device_mesh("cpu", (dp, ep_size), mesh_dim_names=("dp", "ep"))
    ref = _make_moe(num_experts=4, top_k=2, num_shared_experts=1, load_balance_coeff=0.01)
    ep = expert_parallel(copy.deepcopy(ref), mesh["ep"], count_group=dist.group.WORLD)  # 1-D mesh ok
    xs = [_tokens(r, 2 + r, torch.float32)[0] for r in range(W)]
    n = sum(x.shape[0] for x in xs)
    (ref(torch.cat(xs)).pow(2).sum() / n).backward()
    (ep(xs[rank]).pow(2).sum() * (W / n)).backward()  # local share of the global mean, times W
    expert_params = {id(p) for p in ep.experts.parameters()}
    for p in ep.parameters():
        group = mesh["dp"].get_group() if id(p) in expert_params else dist.group.WORLD
        dist.all_reduce(p.grad, group=group)
        p.grad /= dp * ep_size
    lo = mesh["ep"].get_local_rank() * 2
    want = dict(ref.named_parameters())
    for name, p in ep.named_parameters():
        w = want[name].grad[lo:lo + 2] if name.startswith("experts.") else want[name].grad
        errs.close(f"dp x ep grad {name}", p.grad, w, atol=1e-5, rtol=1e-5)
    ep.train()
    ep(xs[rank])
    ep.update_expert_bias()  # counts over all 4 ranks: same bias everywhere
    gathered = [torch.empty_like(ep.expert_bias) for _ in range(W)]
    dist.all_gather(gathered, ep.expert_bias)
    errs.check("dp x ep: expert_bias differs between ranks",
               all(torch.equal(b, gathered[0]) for b in gathered))


def _check_errors(errs, rank, W):
    from moeprec.parallel import expert_parallel

    try:
        expert_parallel(_make_moe(num_experts=2 * W + 1, top_k=1))
        errs.append("E not divisible by world size: no error")
    except ValueError as e:
        errs.check(f"E not divisible: message {e}", "num_experts" in str(e) and str(W) in str(e))
    try:
        expert_parallel(_make_moe(num_experts=2 * W, top_k=1), process_group="ep")
        errs.append("a string as process_group: no error")
    except TypeError as e:
        errs.check(f"bad group: message {e}", "process_group" in str(e))
    ep = _ep_copy(_make_moe(num_experts=2 * W, top_k=1))
    try:
        expert_parallel(ep)
        errs.append("sharding twice: no error")
    except ValueError:
        pass
    # state-dict keys unchanged, expert tensors hold the local block only
    ref = _make_moe(num_experts=2 * W, top_k=1)
    errs.check("state-dict keys changed", list(ref.state_dict()) == list(ep.state_dict()))
    errs.check("local w1 shape", tuple(ep.experts.w1.shape) == (2,) + tuple(ref.experts.w1.shape[1:]))
    errs.close("local w1 values", ep.experts.w1, ref.experts.w1[2 * rank:2 * rank + 2], atol=0, rtol=0)
    errs.check("isinstance(MoE) lost", isinstance(ep, type(ref)))
    # a deep copy shares the process group and computes the same thing
    x = _tokens(rank, 4, torch.float32)
    with torch.no_grad():
        errs.close("deepcopy output", copy.deepcopy(ep)(x), ep(x), atol=0, rtol=0)


_CHECKS = {
    **{f"train_{name}": (lambda n: lambda e, r, W: _run_train_case(e, r, W, n))(name)
       for name in _TRAIN_CASES},
    "skewed_routing": _check_skewed_routing,
    "expert_bias_update": _check_expert_bias_update,
    "quantized_mxfp4": lambda e, r, W: _check_quantized(e, r, W, "mxfp4", num_shared_experts=1),
    "quantized_fp8_bias_score_first": lambda e, r, W: _check_quantized(
        e, r, W, "fp8", mlp_bias=True, score_before_experts=True),
    "quantized_mxfp4_mixed_act_dtype": lambda e, r, W: _check_quantized(e, r, W, "mxfp4", bound=4),
    "dp_x_ep_mesh": _check_dp_x_ep,
    "module_properties_and_errors": _check_errors,
}


def _worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)  # 4 ranks share 2 cores in CI
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    verdicts = {}
    try:
        for name, check in _CHECKS.items():
            errs = _Errors()
            try:
                check(errs, rank, world_size)
            except Exception:  # the code under test raised: report it, keep going
                errs.append(traceback.format_exc())
            verdicts[name] = list(errs)
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(verdicts, f)
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ in pytest


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world_size):
    """Run every check on `world_size` gloo ranks; returns {check: [errors of rank r, ...]}."""
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if method == "forkserver":
        # children fork from a server that imported these once: ~0.3 s per launch, not ~5 s/rank
        mp.set_forkserver_preload(["torch", "torch.distributed", "moeprec.moe", "moeprec.fused_moe_op"])
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _worker, args=(world_size, _free_port(), out_dir), nprocs=world_size, join=False,
            start_method=method,
        )
        deadline = time.monotonic() + WORLD_TIMEOUT_S
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail(f"expert-parallel world of {world_size} did not finish in {WORLD_TIMEOUT_S} s")
        per_rank = []
        for r in range(world_size):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
    return {name: [v.get(name, ["no verdict"]) for v in per_rank] for name in _CHECKS}


_WORLDS: dict[int, dict] = {}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def world(request):
    if request.param not in _WORLDS:
        try:
            _WORLDS[request.param] = _launch(request.param)
        except mp.ProcessException:  # e.g. the free port was taken before rank 0 bound it
            _WORLDS[request.param] = _launch(request.param)
    return request.param, _WORLDS[request.param]


@pytest.mark.parametrize("check", list(_CHECKS))
def test_expert_parallel_matches_single_process(world, check):
    W, verdicts = world
    failures = [f"rank {r}: {e}" for r, errs in enumerate(verdicts[check]) for e in errs]
    assert not failures, f"{check} on {W} ranks:\n" + "\n".join(failures)


def test_needs_initialised_process_group():
    from moeprec.parallel import expert_parallel

    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(ValueError, match="process_group"):
        expert_parallel(_make_moe(num_experts=4, top_k=1))


def test_rejects_non_moe():
    from moeprec.parallel import expert_parallel

    with pytest.raises(TypeError, match="moe"):
        expert_parallel(torch.nn.Linear(4, 4))
