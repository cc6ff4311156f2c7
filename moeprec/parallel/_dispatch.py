"""Token exchange for expert parallelism: autograd-aware all-to-all and the dispatch plan.

Rows arrive here sorted by global expert id (what `MoE` feeds its experts). Experts are owned in
contiguous blocks (rank r owns `[r*El, (r+1)*El)`, `El = E / W`), so rows sorted by expert are also
sorted by destination rank and one `all_to_all_single` moves them. A rank receives its rows grouped
by (source rank, local expert); its grouped GEMMs want them grouped by local expert, so a
permutation (computed on device) reorders them, and the inverse puts the outputs back before the
return trip.

The split sizes of `all_to_all_single` are host integers, so each dispatch copies the exchanged
counts to the host once: one device->host sync per MoE layer per forward (the backward reuses the
splits). Every expert-parallel MoE (torchtitan, Megatron, DeepEP's normal mode) pays this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DispatchPlan", "all_to_all_rows", "plan_dispatch"]


class _AllToAllRows(torch.autograd.Function):
    """`all_to_all_single` over dim 0 of a 2-D tensor; backward sends gradients the reverse way."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        return _all_to_all(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return _all_to_all(grad, input_splits, output_splits, ctx.group), None, None, None


def _all_to_all(x, output_splits, input_splits, group):
    x = x.contiguous()
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    return out


def all_to_all_rows(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group=None
) -> torch.Tensor:
    """Send `x[rows of split i]` to rank i of `group`; returns the rows received, by source rank.

    Differentiable: the gradient of the result travels back with the splits swapped.
    """
    return _AllToAllRows.apply(x, list(output_splits), list(input_splits), group)


@dataclass
class DispatchPlan:
    """What one exchange needs: host splits, local counts and the local reordering.

    - `send_counts [W, El]` (host): rows this rank sends to rank d for d's local expert e.
    - `recv_counts [W, El]` (host): rows this rank receives from rank s for its local expert e.
    - `recv_tokens [W]` (host): the token count (before top-k fan-out) of each source rank.
    - `input_splits` / `output_splits`: per-rank row counts of the token all-to-all.
    - `recv_counts_dev [W, El]`: the same counts, on the device (for device-side indexing).
    - `local_counts [El]` (device, int64): rows per local expert, all sources together.
    - `perm` (device): position i of the expert-major order takes received row `perm[i]`;
      `inv_perm` undoes it. Both None when the received order is already expert-major.
    """

    send_counts: torch.Tensor
    recv_counts: torch.Tensor
    recv_tokens: torch.Tensor
    input_splits: list[int]
    output_splits: list[int]
    recv_counts_dev: torch.Tensor
    local_counts: torch.Tensor
    perm: torch.Tensor | None
    inv_perm: torch.Tensor | None

    @property
    def num_send(self) -> int:
        return sum(self.input_splits)

    @property
    def num_recv(self) -> int:
        return sum(self.output_splits)

    def to_local(self, x_recv: torch.Tensor) -> torch.Tensor:
        """Received rows (source-major) -> expert-major order for the local grouped GEMMs."""
        return x_recv if self.perm is None else x_recv.index_select(0, self.perm)

    def from_local(self, y_local: torch.Tensor) -> torch.Tensor:
        """Expert-major outputs -> the received (source-major) order, ready to send back."""
        return y_local if self.inv_perm is None else y_local.index_select(0, self.inv_perm)

    def recv_local_expert(self) -> torch.Tensor:
        """Local expert id of each received row, in received order (int64, on the device)."""
        W, El = self.recv_counts_dev.shape
        ids = torch.arange(El, device=self.recv_counts_dev.device).repeat(W)
        return ids.repeat_interleave(self.recv_counts_dev.reshape(-1), output_size=self.num_recv)


def plan_dispatch(
    num_tokens_per_expert: torch.Tensor,
    group,
    world_size: int,
    *,
    num_tokens: int = 0,
    expert_major: bool = True,
) -> DispatchPlan:
    """Exchange counts with every rank of `group` and build the plan of the token all-to-all.

    `num_tokens_per_expert [E]` counts this rank's rows per global expert (rows sorted by expert);
    `num_tokens` is this rank's token count before the top-k fan-out, sent along so receivers can
    reproduce per-source decisions (the activation-dtype policy). `expert_major=False` skips the
    local reordering (for consumers that take rows in any order, such as fused_moe).
    """
    E = num_tokens_per_expert.shape[0]
    W = world_size
    El = E // W
    device = num_tokens_per_expert.device
    send = torch.empty(W, El + 1, dtype=torch.int64, device=device)
    send[:, :El] = num_tokens_per_expert.view(W, El)
    send[:, El] = num_tokens
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # The one device->host copy of the step: split sizes must be host integers.
    host = torch.stack((send, recv)).cpu()
    send_counts, recv_counts, recv_tokens = host[0, :, :El], host[1, :, :El], host[1, :, El]
    input_splits = send_counts.sum(1).tolist()
    output_splits = recv_counts.sum(1).tolist()
    recv_dev = recv[:, :El]
    local_counts = recv_dev.sum(0)
    perm = inv_perm = None
    if expert_major and W > 1 and El > 1:
        perm = _expert_major_perm(recv_dev, sum(output_splits))
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.numel(), device=device)
    return DispatchPlan(
        send_counts, recv_counts, recv_tokens, input_splits, output_splits, recv_dev,
        local_counts, perm, inv_perm,
    )


def _expert_major_perm(recv_counts: torch.Tensor, total: int) -> torch.Tensor:
    """Indices that reorder rows grouped (source, expert) into (expert, source) order.

    Computed on device from the device copy of the counts (no extra host sync); `total` (known on
    the host) sizes `repeat_interleave` so it needs no sync either.
    """
    W, El = recv_counts.shape
    device = recv_counts.device
    flat = recv_counts.reshape(-1)  # segments in received order (s, e)
    starts = torch.cumsum(flat, 0) - flat  # where each (s, e) segment begins in the received rows
    lengths_em = recv_counts.t().reshape(-1)  # segments in expert-major order (e, s)
    starts_em = starts.view(W, El).t().reshape(-1)
    seg = torch.repeat_interleave(
        torch.arange(W * El, device=device), lengths_em, output_size=total
    )
    seg_begin = torch.cumsum(lengths_em, 0) - lengths_em  # where each segment begins, expert-major
    pos = torch.arange(total, device=device) - seg_begin[seg]
    return starts_em[seg] + pos
