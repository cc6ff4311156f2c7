"""Expert parallelism (SPEC 5): shard a `MoE`'s routed experts over the ranks of a process group.

`expert_parallel(moe, group)` changes `moe` in place and returns it:
- its `experts` keep only this rank's contiguous block of `El = E / W` experts (rank r owns
  `[r*El, (r+1)*El)`); parameter names are unchanged, so state-dict keys stay those of `MoE`;
- the router, shared experts and `expert_bias` stay replicated and untouched;
- in the training path `MoE.forward` runs as before; only its call to the experts changes: the rows
  (sorted by global expert) go to their owners with one all-to-all, the local grouped GEMMs run,
  and a second all-to-all brings the outputs back in the original order, so the MoE's own combine,
  shared experts and losses see exactly what the unsharded layer computes;
- after `moe.quantize_(...)` (call it before `expert_parallel`), forward routes, sends each
  (token, slot) row and its router weight to the owner, runs `fused_moe` there on the local experts
  with local expert ids, and sums the returned rows per token;
- `moe.update_expert_bias()` first sums `tokens_per_expert` over the ranks (all-reduce), so the
  replicated `expert_bias` stays identical everywhere.

Gradients of replicated parameters (router, shared experts) are NOT all-reduced: that is the
data-parallel wrapper's job. Expert gradients land on the owner: the sum, over all ranks' tokens,
of what the unsharded layer would give for that shard.

Both classes are made by swapping `__class__` for a subclass that adds the distributed behaviour
(as `fully_shard` does), so `isinstance(moe, MoE)` still holds and model code needs no change.
"""

from __future__ import annotations

from itertools import groupby
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from moeprec.parallel._dispatch import DispatchPlan, all_to_all_rows, plan_dispatch
from moeprec.reorder import combine_expert_outputs, reorder_tokens

__all__ = ["expert_parallel", "is_expert_parallel"]

# GroupedExperts tensors whose leading dimension is the expert index (parameters when training,
# buffers after quantize_, scales included).
_EXPERT_TENSORS = ("w1", "w2", "b1", "b2", "w1_scale", "w2_scale")


def expert_parallel(moe: nn.Module, process_group: Any = None, *, count_group: Any = None) -> nn.Module:
    """Shard `moe`'s experts over `process_group` (default: the default group); returns `moe`.

    Every rank must call this with an identically initialised `moe` (same weights, same
    `expert_bias`). `count_group` is the group over which `tokens_per_expert` is summed before an
    expert-bias update (default: `process_group`; with data parallelism too, pass a group that
    spans the data-parallel ranks as well, e.g. the default group).
    """
    from moeprec.moe import MoE

    if not isinstance(moe, MoE):
        raise TypeError(f"moe: expected a moeprec.MoE, got {type(moe).__name__}")
    if is_expert_parallel(moe):
        raise ValueError("moe: expected a MoE that is not yet expert-parallel, got one that is")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "process_group: expected an initialised torch.distributed process group "
            "(call torch.distributed.init_process_group first), got no default group"
        )
    group = _as_group("process_group", process_group)
    count_group = group if count_group is None else _as_group("count_group", count_group)
    W = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("process_group: expected a group this rank belongs to, got one it does not")
    E = moe.args.num_experts
    if E % W:
        raise ValueError(
            f"num_experts: expected a multiple of the expert-parallel world size {W}, got {E}"
        )
    El = E // W
    lo, hi = rank * El, (rank + 1) * El

    names = [n for n in _EXPERT_TENSORS if getattr(moe.experts, n, None) is not None]
    for name in names:  # all checked before any is replaced: an error leaves `moe` as it was
        shape = tuple(getattr(moe.experts, name).shape)
        if shape[0] != E:
            raise ValueError(f"experts.{name}: expected a leading (expert) dimension of {E}, got shape {shape}")
    with torch.no_grad():
        for name in names:
            _keep_rows(moe.experts, name, lo, hi)
    moe.experts.num_experts = El

    ep = _EPState(group=group, count_group=count_group, world_size=W, rank=rank, num_experts=E,
                  num_local_experts=El)
    object.__setattr__(moe.experts, "_ep", ep)
    object.__setattr__(moe, "_ep", ep)
    moe.experts.__class__ = _ep_subclass(type(moe.experts), _ExpertParallelExperts)
    moe.__class__ = _ep_subclass(type(moe), _ExpertParallelMoE)
    return moe


def is_expert_parallel(module: nn.Module) -> bool:
    """Whether `module` (a MoE or its experts) went through `expert_parallel`."""
    return isinstance(module, (_ExpertParallelMoE, _ExpertParallelExperts))


class _EPState:
    """What the sharded modules need to know about the group (plain attributes, not a Module)."""

    def __init__(self, *, group, count_group, world_size, rank, num_experts, num_local_experts):
        self.group = group
        self.count_group = count_group
        self.world_size = world_size
        self.rank = rank
        self.num_experts = num_experts
        self.num_local_experts = num_local_experts

    def __deepcopy__(self, memo):
        # process groups are handles, not data: a copied module keeps talking to the same group
        return _EPState(group=self.group, count_group=self.count_group, world_size=self.world_size,
                        rank=self.rank, num_experts=self.num_experts,
                        num_local_experts=self.num_local_experts)

    @property
    def expert_offset(self) -> int:
        return self.rank * self.num_local_experts

    def __repr__(self) -> str:
        return (f"rank={self.rank}/{self.world_size}, experts=[{self.expert_offset}, "
                f"{self.expert_offset + self.num_local_experts}) of {self.num_experts}")


# ---------------------------------------------------------------------------------- sharding


def _as_group(name: str, group: Any):
    """A ProcessGroup, a 1-D DeviceMesh (its group) or None (the default group)."""
    from torch.distributed.device_mesh import DeviceMesh

    if group is None or isinstance(group, dist.ProcessGroup):
        return group
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"{name}: expected a 1-D DeviceMesh (e.g. mesh['ep']), got one of {group.ndim} dims"
            )
        return group.get_group()
    raise TypeError(f"{name}: expected a ProcessGroup, a 1-D DeviceMesh or None, got {type(group).__name__}")


def _keep_rows(module: nn.Module, name: str, lo: int, hi: int) -> None:
    """Replace parameter/buffer `name` by its rows [lo, hi) (a copy: the rest is freed)."""
    t = getattr(module, name)
    local = t.detach()[lo:hi].clone()
    if isinstance(t, nn.Parameter):
        setattr(module, name, nn.Parameter(local, requires_grad=t.requires_grad))
    else:
        setattr(module, name, local)  # a registered buffer stays a buffer


def _ep_subclass(cls: type, mixin: type) -> type:
    """`type(name, (mixin, cls))`, cached so every sharded instance of `cls` shares one class."""
    key = (cls, mixin)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"ExpertParallel{cls.__name__}", (mixin, cls), {})
    return _SUBCLASSES[key]


_SUBCLASSES: dict[tuple[type, type], type] = {}


# ---------------------------------------------------------------------------------- experts


class _ExpertParallelExperts:
    """Mixin over GroupedExperts: exchange rows, run the local experts, exchange back."""

    _ep: _EPState

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor | None = None, *,
                zero_uncounted_rows: bool = True):
        # Uncounted rows give zeros here either way (below), so the flag changes nothing.
        ep = self._ep
        if num_tokens_per_expert is None or num_tokens_per_expert.shape != (ep.num_experts,):
            got = None if num_tokens_per_expert is None else tuple(num_tokens_per_expert.shape)
            raise ValueError(
                f"num_tokens_per_expert: expected a [{ep.num_experts}] tensor (global counts of "
                f"the expert-parallel layer), got {got}"
            )
        plan = plan_dispatch(num_tokens_per_expert, ep.group, ep.world_size)
        n = plan.num_send
        if n > x.shape[0]:
            raise ValueError(
                f"num_tokens_per_expert: expected counts summing to at most x.shape[0]={x.shape[0]}, "
                f"got {n}"
            )
        # Rows past the counted ones (padding) stay here and give zeros, as GroupedExperts does.
        x_send = x[:n] if n < x.shape[0] else x
        x_recv = all_to_all_rows(x_send, plan.output_splits, plan.input_splits, ep.group)
        y_local = super().forward(plan.to_local(x_recv), plan.local_counts)
        y_recv = plan.from_local(y_local)
        y = all_to_all_rows(y_recv, plan.input_splits, plan.output_splits, ep.group)
        if n < x.shape[0]:
            y = torch.cat((y, y.new_zeros(x.shape[0] - n, y.shape[1])))
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, expert_parallel=({self._ep!r})"


# ---------------------------------------------------------------------------------- MoE


class _ExpertParallelMoE:
    """Mixin over MoE: global token counts for the bias update, and the quantized EP forward."""

    _ep: _EPState

    @property
    def ep_rank(self) -> int:
        return self._ep.rank

    @property
    def ep_size(self) -> int:
        return self._ep.world_size

    @property
    def local_experts(self) -> range:
        """The global ids of the experts this rank holds."""
        return range(self._ep.expert_offset, self._ep.expert_offset + self._ep.num_local_experts)

    def all_reduce_tokens_per_expert(self) -> None:
        """Sum `tokens_per_expert` over the count group, in place (every rank gets the total)."""
        buf = getattr(self, "tokens_per_expert", None)
        if buf is not None:
            dist.all_reduce(buf, group=self._ep.count_group)

    def update_expert_bias(self, *args, **kwargs):
        """All-reduce the token counts, then the MoE's own update (same result on every rank)."""
        self.all_reduce_tokens_per_expert()
        return super().update_expert_bias(*args, **kwargs)

    def quantize_(self, *args, **kwargs):
        raise ValueError(
            "quantize_: expected to be called before expert_parallel (quantize the full layer, "
            "then shard it), got a call on an expert-parallel MoE"
        )

    def _routed_experts_quantized(self, tokens: torch.Tensor, routed) -> torch.Tensor:
        """Quantized inference: each (token, slot) row and its router weight go to the owner of
        the expert, which runs `fused_moe` on its local experts (local ids) and sends the weighted
        rows back; the k rows of a token are summed here in fp32."""
        ep = self._ep
        if tokens.element_size() > 4:
            raise TypeError(f"x: expected bf16, fp16 or fp32 for quantized experts, got {tokens.dtype}")
        D = tokens.shape[1]
        reordered = reorder_tokens(routed.top_scores, routed.selected_experts)
        plan = plan_dispatch(
            routed.num_tokens_per_expert, ep.group, ep.world_size,
            num_tokens=tokens.shape[0], expert_major=False,
        )
        # One message per row: the token, then its fp32 router weight's bytes in the token's dtype
        # (fused_moe applies the weight on the owner, on the input or the output as configured).
        weights = reordered.scores.float().unsqueeze(-1).view(tokens.dtype)
        send = torch.cat((tokens[reordered.token_indices], weights), dim=1)
        recv = all_to_all_rows(send, plan.output_splits, plan.input_splits, ep.group)
        y_recv = self._local_fused_moe(
            recv[:, :D].contiguous(), recv[:, D:].contiguous().view(torch.float32), plan
        )
        y = all_to_all_rows(y_recv, plan.input_splits, plan.output_splits, ep.group)
        # The weights are applied already: sum the k copies of each token (fp32), then round to
        # the dtype fused_moe returns in the unsharded layer.
        out = combine_expert_outputs(y, reordered, routed.top_scores, score_before_experts=True)
        return out.to(tokens.dtype)

    def _local_fused_moe(self, x: torch.Tensor, w: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """fused_moe over the received rows with local expert ids, one call per run of source ranks
        sharing an activation dtype: rows from rank s use the dtype the unsharded layer picks for
        rank s's token count (`act_dtype="auto"` depends on it)."""
        from moeprec.act_policy import resolve_act_dtype
        from moeprec.fused_moe_op import fused_moe

        e = self.experts
        ids = plan.recv_local_expert().unsqueeze(-1)
        y = x.new_empty(x.shape)
        act = [
            resolve_act_dtype(int(n), quant=e.quant, precision=self.precision,
                              activation=e.activation, gate_mode=e.gate_mode, device=x.device)
            for n in plan.recv_tokens.tolist()
        ]
        start = 0
        for act_dtype, run in groupby(zip(act, plan.output_splits), key=lambda p: p[0]):
            stop = start + sum(n for _, n in run)
            if stop > start:
                y[start:stop] = fused_moe(
                    x[start:stop], e.w1, e.w2, w[start:stop], ids[start:stop],
                    activation=e.activation, gate_mode=e.gate_mode, swiglu_alpha=e.swiglu_alpha,
                    swiglu_limit=e.swiglu_limit, quant=e.quant, w1_scale=e.w1_scale,
                    w2_scale=e.w2_scale, act_dtype=act_dtype, bias1=e.b1, bias2=e.b2,
                    apply_router_weight_on_input=self.args.score_before_experts,
                    precision=self.precision, check_topk_ids=False,
                )
            start = stop
        return y
