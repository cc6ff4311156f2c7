import pytest
import torch

from moeprec import moe_align_block_size
from moeprec.dispatch import max_num_tokens_padded


def _check_invariants(topk_ids, E, block, expert_mask=None):
    M, k = topk_ids.shape
    pad = M * k
    sorted_ids, expert_ids, ntp = moe_align_block_size(topk_ids, E, block, expert_mask)
    max_len = max_num_tokens_padded(pad, E, block)
    assert sorted_ids.dtype == torch.int32 and expert_ids.dtype == torch.int32
    assert ntp.dtype == torch.int32 and ntp.shape == (1,)
    assert sorted_ids.shape == (max_len,)
    assert expert_ids.shape == (-(-max_len // block),)

    flat = topk_ids.reshape(-1).tolist()
    counts = [flat.count(e) for e in range(E)]
    padded = [-(-c // block) * block for c in counts]
    total = int(ntp.item())
    assert total == sum(padded) and total % block == 0

    s = sorted_ids.tolist()
    assert all(v == pad for v in s[total:]), "entries past the used length are the pad value"
    assert all(v == -1 for v in expert_ids.tolist()[total // block :])

    seen = []
    pos = 0
    for e in range(E):  # segments in ascending expert order, each block-aligned
        seg = s[pos : pos + padded[e]]
        real = [v for v in seg if v != pad]
        assert real == sorted(real), "ascending within an expert"
        assert seg[: counts[e]] == real and len(real) == counts[e], "pad only at the segment end"
        assert all(flat[v] == e for v in real)
        want = e if expert_mask is None or bool(expert_mask[e]) else -1
        for b in range(pos // block, (pos + padded[e]) // block):
            assert expert_ids[b].item() == want
        seen += real
        pos += padded[e]
    assert sorted(seen) == list(range(pad)), "each (token, slot) exactly once"
    return sorted_ids, expert_ids, ntp


@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("M", [1, 5, 40])
def test_invariants_many_experts(block, M):
    E, k = 257, 9
    g = torch.Generator().manual_seed(block * 1000 + M)
    # concentrate on few experts so that many have no tokens and some have several blocks
    topk_ids = torch.randint(0, 20, (M, k), generator=g) * 13 % E
    mask = torch.rand(E, generator=g) > 0.3
    _check_invariants(topk_ids, E, block)
    _check_invariants(topk_ids.int(), E, block, expert_mask=mask)


def test_uniform_routing_all_experts_used():
    E, k, M, block = 257, 9, 200, 16
    topk_ids = torch.stack([torch.randperm(E)[:k] for _ in range(M)])
    _check_invariants(topk_ids, E, block, expert_mask=torch.ones(E, dtype=torch.int32))


def test_hand_checked_example():
    # 3 tokens, top-2, 5 experts, blocks of 4: flat ids 0..5, pad value 6
    topk_ids = torch.tensor([[2, 0], [2, 3], [0, 2]])
    mask = torch.tensor([True, True, False, True, True])
    sorted_ids, expert_ids, ntp = moe_align_block_size(topk_ids, 5, 4, mask)
    # expert 0: flat 1, 4 | expert 2: flat 0, 2, 5 | expert 3: flat 3 ; experts 1, 4: no block
    want_used = [1, 4, 6, 6, 0, 2, 5, 6, 3, 6, 6, 6]
    assert ntp.tolist() == [12]
    assert sorted_ids.tolist() == want_used + [6] * (6 + 5 * 3 - 12)
    assert expert_ids.tolist() == [0, -1, 3, -1, -1, -1]  # expert 2 is not local
    _, expert_ids_all, _ = moe_align_block_size(topk_ids, 5, 4)
    assert expert_ids_all.tolist()[:3] == [0, 2, 3]


def test_no_tokens():
    sorted_ids, expert_ids, ntp = moe_align_block_size(torch.zeros(0, 4, dtype=torch.int64), 8, 16)
    assert ntp.tolist() == [0]
    assert (sorted_ids == 0).all() and (expert_ids == -1).all()


def test_out_of_range_ids_get_no_block():
    topk_ids = torch.tensor([[1, 7], [-1, 1]])
    sorted_ids, expert_ids, ntp = moe_align_block_size(topk_ids, 4, 2)
    assert ntp.tolist() == [2]
    assert sorted_ids.tolist()[:2] == [0, 3]
    assert (sorted_ids[2:] == 4).all()
    assert expert_ids.tolist()[0] == 1 and (expert_ids[1:] == -1).all()


def test_no_host_sync_needed_shapes_depend_only_on_sizes():
    a = moe_align_block_size(torch.zeros(6, 2, dtype=torch.int64), 4, 8)
    b = moe_align_block_size(torch.arange(12).reshape(6, 2) % 4, 4, 8)
    assert [t.shape for t in a] == [t.shape for t in b]


@pytest.mark.parametrize(
    "args,exc,name",
    [
        ((torch.zeros(3, dtype=torch.int64), 4, 16), ValueError, "topk_ids"),
        ((torch.zeros(3, 2), 4, 16), TypeError, "topk_ids"),
        ((torch.zeros(3, 2, dtype=torch.int64), 0, 16), ValueError, "num_experts"),
        ((torch.zeros(3, 2, dtype=torch.int64), 4, 0), ValueError, "block_size"),
        ((torch.zeros(3, 2, dtype=torch.int64), 4, 2.0), TypeError, "block_size"),
        ((torch.zeros(3, 2, dtype=torch.int64), 4, 16, torch.ones(5, dtype=torch.bool)), ValueError, "expert_mask"),
        ((torch.zeros(3, 2, dtype=torch.int64), 4, 16, [1, 1, 1, 1]), TypeError, "expert_mask"),
    ],
)
def test_bad_arguments(args, exc, name):
    with pytest.raises(exc, match=name):
        moe_align_block_size(*args)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    E, k, M, block = 257, 9, 300, 64
    topk_ids = torch.randint(0, E, (M, k))
    mask = torch.rand(E) > 0.5
    cpu = moe_align_block_size(topk_ids, E, block, mask)
    gpu = moe_align_block_size(topk_ids.cuda(), E, block, mask.cuda())
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())


def test_expert_mask_takes_the_dtypes_fused_moe_takes():
    # a float mask was accepted here (0.5 counting as local) but refused by fused_moe
    ids = torch.zeros(2, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match="expert_mask"):
        moe_align_block_size(ids, 4, 4, torch.ones(4))
    for dtype in (torch.bool, torch.uint8, torch.int32):
        moe_align_block_size(ids, 4, 4, torch.ones(4, dtype=dtype))


def _align_brute_force(ids, num_experts, block, mask):
    """vLLM's layout written out: per expert (ascending) its flat ids, padded with M*k."""
    flat = ids.reshape(-1).tolist()
    pad = len(flat)
    sorted_ids, expert_ids = [], []
    for e in range(num_experts):
        rows = [i for i, v in enumerate(flat) if v == e]
        if not rows:
            continue
        n = -(-len(rows) // block) * block
        sorted_ids += rows + [pad] * (n - len(rows))
        expert_ids += [e if mask is None or bool(mask[e]) else -1] * (n // block)
    return sorted_ids, expert_ids


def test_matches_brute_force_on_random_routings():
    gen = torch.Generator().manual_seed(5)
    for trial in range(150):
        m, k, e = (int(v) for v in torch.randint(1, 7, (3,), generator=gen))
        m -= 1  # M = 0 included
        block = (1, 2, 3, 4, 16)[trial % 5]
        ids = torch.randint(0, e, (m, k), generator=gen, dtype=(torch.int32, torch.int64)[trial % 2])
        mask = None if trial % 3 == 0 else torch.rand(e, generator=gen) < 0.6
        s, eids, n = moe_align_block_size(ids, e, block, mask)
        want_s, want_e = _align_brute_force(ids, e, block, mask)
        used = int(n)
        assert n.dtype == torch.int32 and n.shape == (1,)
        assert s[:used].tolist() == want_s and eids[: used // block].tolist() == want_e
        assert (s[used:] == m * k).all() and (eids[used // block :] == -1).all()
