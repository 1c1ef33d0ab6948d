"""Ulysses sequence parallelism (SP): each of ``sp`` ranks holds 1/sp of a packed row's tokens.

Everything outside attention (embedding, norms, MLP, LM head, loss) is per-token, so it runs on the local
shard unchanged. Attention needs the whole sequence, so around the kernel the shard is traded for heads::

    q, k, v [B, T/sp, H, D]  --all-to-all-->  [B, T, H/sp, D]   (scatter heads, gather sequence)
    kernel over the full row with the *global* cu_seqlens (documents may cross shard boundaries)
    out [B, T, H/sp, D]      --all-to-all-->  [B, T/sp, H, D]   (scatter sequence, gather heads)

q, k and v travel in one all-to-all (one collective instead of three; same bytes), so a layer costs two
all-to-alls forward and two backward. The backward of an all-to-all is the inverse all-to-all
(:class:`_SeqHeadAllToAll`), which is also what makes activation checkpointing work: recomputation simply
repeats the exchange.

GQA: with ``n_kv_heads >= sp`` the KV heads are exchanged as they are, so rank r receives q heads
``[r·H/sp, ...)`` and KV heads ``[r·KV/sp, ...)`` and the q→kv grouping is unchanged. Only when
``sp > n_kv_heads`` is a KV head sent to ``sp/KV`` ranks (the minimum: every such rank needs it for the
whole sequence). See :func:`mirotrain.parallel.mesh.kv_replication_factor`.

The hidden states are never gathered: the loss is computed on each rank's own shard and the token sums are
reduced (no SP-times redundant LM head). Padding to a multiple of sp is its own ignored document rather than
part of the last one, and head and world-size divisibility are checked up front (``parallel/mesh.py``).

Loss and gradient normalisation. The target is ``Σ token losses / N`` with N the trained tokens of the
optimizer step over every rank of the ``dp × sp`` world. SP ranks hold disjoint tokens, so N is the plain
sum of the local counts (nothing is divided by sp). Each rank backpropagates ``loss_sum · F / N``, F being
the factor FSDP divides the reduced gradients by (the world size); each rank's backward yields the
gradient of its own shard's loss and, through the reverse all-to-alls, the part of the other SP ranks'
losses that flows through its activations, so the reduction over the SP group and the DP replicas gives
exactly ∂(Σ losses / N)/∂θ; the trainer's optimizer step does this. Sequence-level losses (DPO)
reduce per-sequence partial sums with :func:`sp_all_reduce_sum` instead.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from mirotrain.parallel.mesh import ParallelConfigError, check_sp_attention_backend, kv_replication_factor

IGNORE_INDEX = -100

AttnFn = Callable[..., torch.Tensor]


# --------------------------------------------------------------------------------------------- data side
def shard_batch_for_sp(batch: dict[str, Any], sp_rank: int, sp_size: int, pad_id: int) -> dict[str, Any]:
    """This rank's share of a batch: pad the row to a multiple of ``sp_size``, keep 1/sp of its columns.

    Padding (``(-T) % sp`` tokens of ``pad_id``) gets ignored labels and, for packed rows, becomes a
    document of its own (``cu_seqlens`` gains one boundary, its position ids restart at 0), so no real
    token attends to it and varlen kernels never see rows outside ``cu_seqlens``. Rank r keeps columns
    ``[r·T/sp, (r+1)·T/sp)`` of ``input_ids``, ``labels``, ``position_ids`` and ``token_mask`` (False on the
    padding); ``cu_seqlens`` and ``max_seqlen`` stay global because attention runs over the full row after
    the exchange. Position ids
    are always materialised, since the model's default ``arange(T_local)`` would be wrong on rank r > 0.
    Other keys pass through unchanged. Tensors may live on any device; no host sync except reading
    ``cu_seqlens[-1]`` when ``cu_seqlens`` is on an accelerator (shard while the batch is still on CPU).
    """
    if sp_size < 1 or not 0 <= sp_rank < sp_size:
        raise ValueError(f"sp_rank {sp_rank} must be in [0, {sp_size})")
    input_ids = batch["input_ids"]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    bsz, total = input_ids.shape
    out = dict(batch)
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(total, device=input_ids.device).expand(bsz, -1)
    cu_seqlens = batch.get("cu_seqlens")
    pad = (-total) % sp_size
    if sp_size == 1:
        out["position_ids"] = position_ids
        return out

    if pad:
        def right_pad(t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, values.to(t.dtype).expand(bsz, -1)], dim=1)

        dev = input_ids.device
        input_ids = right_pad(input_ids, torch.full((1, pad), pad_id, device=dev))
        labels = right_pad(batch["labels"], torch.full((1, pad), IGNORE_INDEX, device=dev))
        if cu_seqlens is None:  # plain causal rows: trailing pad is never attended to; keep positions monotone
            pad_pos = torch.arange(total, total + pad, device=dev)
        else:
            pad_pos = torch.arange(pad, device=dev)
        position_ids = right_pad(position_ids, pad_pos[None])
        if batch.get("token_mask") is not None:
            out["token_mask"] = right_pad(batch["token_mask"], torch.zeros((1, pad), dtype=torch.bool, device=dev))
    else:
        labels = batch["labels"]

    if cu_seqlens is not None:
        if bsz != 1:
            raise ValueError(f"packed rows (cu_seqlens) must have batch size 1, got {bsz}")
        covered = int(cu_seqlens[-1])
        if covered > total:
            raise ValueError(f"cu_seqlens ends at {covered} but the row has {total} tokens")
        extra = []
        if covered < total:  # tokens after the last document: their own segment, never merged with one
            extra.append(total)
        if pad:
            extra.append(total + pad)
        if extra:
            cu_seqlens = torch.cat([cu_seqlens, torch.tensor(extra, dtype=cu_seqlens.dtype, device=cu_seqlens.device)])
            out["cu_seqlens"] = cu_seqlens
            new_lens = [b - a for a, b in zip([covered] + extra[:-1], extra)]
            if batch.get("max_seqlen") is not None:
                out["max_seqlen"] = max(int(batch["max_seqlen"]), *new_lens)
        if out.get("max_seqlen") is None:
            out["max_seqlen"] = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())

    local = (total + pad) // sp_size
    cols = slice(sp_rank * local, (sp_rank + 1) * local)
    out["input_ids"] = input_ids[:, cols].contiguous()
    out["labels"] = labels[:, cols].contiguous()
    out["position_ids"] = position_ids[:, cols].contiguous()
    if out.get("token_mask") is not None:
        out["token_mask"] = out["token_mask"][:, cols].contiguous()
    return out


# ---------------------------------------------------------------------------------------- the exchange
def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup, seq_to_heads: bool) -> torch.Tensor:
    """One all-to-all; ``seq_to_heads``: [B, T/P, P·h, D] -> [B, T, h, D], else the inverse.

    The send buffer is laid out [P, ...] so that chunk j is what rank j receives; the received chunk j comes
    from rank j (its sequence slice when gathering the sequence, its head group when gathering heads).
    """
    world = dist.get_world_size(group)
    if seq_to_heads:
        bsz, t_local, heads, dim = x.shape
        send = x.reshape(bsz, t_local, world, heads // world, dim).permute(2, 0, 1, 3, 4).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        # recv [P(seq slice), B, T/P, h, D] -> [B, T, h, D]
        return recv.permute(1, 0, 2, 3, 4).reshape(bsz, world * t_local, heads // world, dim)
    bsz, total, heads, dim = x.shape
    send = x.reshape(bsz, world, total // world, heads, dim).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv [P(head group), B, T/P, h, D] -> [B, T/P, P·h, D]
    return recv.permute(1, 2, 0, 3, 4).reshape(bsz, total // world, world * heads, dim)


class _SeqHeadAllToAll(torch.autograd.Function):
    """Autograd-aware exchange: the gradient of an all-to-all is the inverse all-to-all."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup, seq_to_heads: bool) -> torch.Tensor:
        ctx.group, ctx.seq_to_heads = group, seq_to_heads
        return _all_to_all(x, group, seq_to_heads)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _all_to_all(grad.contiguous(), ctx.group, not ctx.seq_to_heads), None, None


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, T/P, H, D] -> [B, T, H/P, D] (this rank's head group over the whole sequence)."""
    return _SeqHeadAllToAll.apply(x, group, True)


def scatter_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, T, H/P, D] -> [B, T/P, H, D] (inverse of :func:`gather_sequence`)."""
    return _SeqHeadAllToAll.apply(x, group, False)


class UlyssesAttention:
    """Drop-in for ``Attention.attn_fn``: exchange sequence for heads, run the original kernel, exchange back.

    A plain callable (not an ``nn.Module``) so the model's module tree and state dict are unchanged.
    """

    def __init__(self, inner: AttnFn, group: dist.ProcessGroup, n_heads: int, n_kv_heads: int):
        self.inner, self.group = inner, group
        self.sp = dist.get_world_size(group)
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.kv_rep = kv_replication_factor(n_heads, n_kv_heads, self.sp)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                 max_seqlen: int | None = None, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
        bsz, t_local, n_heads, dim = q.shape
        if n_heads != self.n_heads or k.shape[2] != self.n_kv_heads:
            raise ValueError(f"expected {self.n_heads} q / {self.n_kv_heads} kv heads, got {n_heads} / {k.shape[2]}")
        if self.kv_rep > 1:
            # sp > KV: head j of the replicated tensor goes to rank j, which needs KV head j // (sp/KV).
            # Autograd sums the replicas' gradients back into the original head.
            k, v = k.repeat_interleave(self.kv_rep, dim=2), v.repeat_interleave(self.kv_rep, dim=2)
        kv_heads = k.shape[2]
        sp = self.sp
        hq, hk = n_heads // sp, kv_heads // sp
        # Pack q, k, v per destination rank so one all-to-all carries all three: [B, T/P, P·(hq+2hk), D].
        packed = torch.cat([q.reshape(bsz, t_local, sp, hq, dim), k.reshape(bsz, t_local, sp, hk, dim),
                            v.reshape(bsz, t_local, sp, hk, dim)], dim=3).reshape(bsz, t_local, -1, dim)
        full = gather_sequence(packed, self.group)  # [B, T, hq + 2hk, D]
        q_full, k_full, v_full = full.split([hq, hk, hk], dim=2)
        out = self.inner(q_full, k_full, v_full, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale,
                         backend=backend)  # [B, T, hq, D]
        return scatter_sequence(out.contiguous(), self.group)  # [B, T/P, H, D]


def _as_group(sp_group: dist.ProcessGroup | DeviceMesh) -> dist.ProcessGroup:
    return sp_group.get_group() if isinstance(sp_group, DeviceMesh) else sp_group


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "attn_fn") and hasattr(m, "n_heads") and hasattr(m, "n_kv_heads")]


def apply_ulysses(model: nn.Module, sp_group: dist.ProcessGroup | DeviceMesh, *, device_type: str | None = None) -> int:
    """Install the Ulysses exchange around every attention kernel of ``model``; returns how many.

    Call it on the single-device model (any device, meta included) before activation checkpointing and FSDP
    wrapping; it only swaps ``Attention.attn_fn`` and adds no parameters. Raises
    :class:`~mirotrain.parallel.mesh.ParallelConfigError` for head counts the group size cannot split or a
    backend that cannot run under SP (``device_type`` defaults to the parameters' device, or CUDA if they
    are on meta and CUDA exists). A group of size 1 leaves the model untouched.
    """
    group = _as_group(sp_group)
    sp = dist.get_world_size(group)
    modules = _attention_modules(model)
    if not modules:
        raise ValueError("apply_ulysses found no attention module (a module with attn_fn, n_heads, n_kv_heads)")
    if device_type is None:
        param = next(model.parameters(), None)
        device_type = param.device.type if param is not None else "cpu"
        if device_type == "meta":
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
    for module in modules:
        if isinstance(module.attn_fn, UlyssesAttention):
            raise ParallelConfigError("apply_ulysses was already applied to this model")
        kv_replication_factor(module.n_heads, module.n_kv_heads, sp)
        check_sp_attention_backend(getattr(module, "backend", "auto"), device_type, sp)
    if sp == 1:
        return 0
    for module in modules:
        module.attn_fn = UlyssesAttention(module.attn_fn, group, module.n_heads, module.n_kv_heads)
    return len(modules)


# ---------------------------------------------------------------------------------------------- loss side
class _SumOverGroup(torch.autograd.Function):
    """All-reduce SUM forward, identity backward (see :func:`sp_all_reduce_sum`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def sp_all_reduce_sum(partial: torch.Tensor, group: dist.ProcessGroup | DeviceMesh) -> torch.Tensor:
    """Sum per-sequence partials over the SP group, differentiably (e.g. DPO log-prob sums of a sharded row).

    Sequence-level losses (DPO) need each sequence's total, but its tokens are spread over the SP ranks: each
    rank sums its own tokens per sequence (segment ids offset by ``sp_rank · T_local``), this all-reduces them,
    and every SP rank then computes the *same* loss. The backward is the identity, not a second all-reduce:
    rank r's partial gradient is dL/dtotal · ∂partial_r/∂θ, and the gradient reduction over the SP group
    sums those into dL/dθ exactly once. With FSDP2 averaging over dp × sp, backprop
    ``replica_loss · world_size / dp_size`` (the replicated loss counted once per DP replica, then the mean
    over replicas).
    """
    return _SumOverGroup.apply(partial, _as_group(group))
