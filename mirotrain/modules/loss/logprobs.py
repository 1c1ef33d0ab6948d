"""Per-sequence log-probability sums, fused with the LM head and chunked over tokens.

DPO needs, for every chosen and rejected response, ``sum_t log p(y_t | y_<t)`` in fp32. Materialising the
full ``[tokens, vocab]`` logits would cost ~12 GB in bf16 per 40K-token sequence, and a bf16 ``log_softmax``
loses precision on long sums. Here:

* only *trained* positions (``label != ignore_index``) go through the LM head — prompts never do;
* the LM head runs on ``chunk_size`` tokens at a time and every chunk's logits are fp32 (bf16 inputs use
  an fp32-output matmul on CUDA), so log-sum-exp and the target logit are exact to fp32;
* :class:`FusedLinearLogProb` keeps only ``hidden``, the weight, the targets and one fp32 log-sum-exp per
  token for backward and recomputes each chunk's logits there — full logits are never alive at once,
  neither in forward nor kept for backward;
* per-token log-probs are summed into sequences with ``index_add`` over segment ids, so any number of
  sequences packed into one row (varlen) costs the same as one.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 2048


def _logits_fp32(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight.T`` with an fp32 result, without an fp32 copy of the (large) weight.

    fp32 inputs: a plain matmul. Low-precision inputs on CUDA: the matmul accumulates in fp32 anyway, so
    asking for an fp32 output (``out_dtype``) keeps logits exact to fp32 at bf16 matmul speed — no rounding of
    the logits to bf16 before the log-sum-exp. Without that kernel (older torch): the compute-dtype matmul,
    upcast (what fused CE kernels do), never an fp32 copy of the whole [vocab, dim] weight per chunk.
    """
    global _OUT_DTYPE_MM
    if hidden.dtype == torch.float32 and weight.dtype == torch.float32:
        return hidden @ weight.t()
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    if hidden.is_cuda and _OUT_DTYPE_MM:
        try:
            return torch.mm(hidden, weight.t(), out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_MM = False
    return (hidden @ weight.t()).float()


_OUT_DTYPE_MM = True  # flipped off once if this torch has no fp32-output matmul


class FusedLinearLogProb(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T)[i, targets[i]]`` per token, in fp32, chunked; logits recomputed in backward.

    Gradient of one token's log-prob w.r.t. its logits is ``onehot(target) - softmax``; with the incoming
    per-token gradient ``g`` the chunk's logit gradient is ``g * (onehot - exp(logits - lse))``, which needs
    only the saved fp32 ``lse``. Trading one extra LM-head matmul per chunk for O(tokens x vocab) memory is
    the right trade at 16K-40K tokens and a 152K vocabulary.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk_size: int) -> torch.Tensor:
        n = hidden.shape[0]
        token_logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = _logits_fp32(hidden[start:end], weight)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, targets[start:end, None]).squeeze(1)
            token_logp[start:end] = target_logit - chunk_lse
            lse[start:end] = chunk_lse
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size = chunk_size
        return token_logp

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor):  # type: ignore[override]
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        # addmm accumulates each chunk's product in fp32 internally; the running sum lives in the weight's
        # dtype (as the unsharded FSDP gradient does) to avoid an fp32 copy of a [vocab, dim] matrix.
        grad_weight = torch.zeros_like(weight) if need_w else None
        grad_logp = grad_logp.float()
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            h = hidden[start:end]
            g = grad_logp[start:end, None]
            grad_logits = _logits_fp32(h, weight)
            grad_logits.sub_(lse[start:end, None]).exp_().mul_(g).neg_()  # -g * softmax
            grad_logits.scatter_add_(1, targets[start:end, None], g)  # + g * onehot(target)
            grad_logits = grad_logits.to(weight.dtype)
            if need_h:
                grad_hidden[start:end] = grad_logits @ weight
            if need_w:
                grad_weight.addmm_(grad_logits.t(), h.to(weight.dtype))
            del grad_logits
        return grad_hidden, grad_weight, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """fp32 ``log p(target)`` for each row of ``hidden [n, D]`` under the LM head ``weight [V, D]``."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0.0 * weight.sum()  # keeps the graph connected
    return FusedLinearLogProb.apply(hidden, weight, targets.long(), int(chunk_size))


def sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, segment_ids: torch.Tensor,
                      num_segments: int, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                      ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of fp32 token log-probs per segment, and the number of trained tokens per segment.

    ``hidden`` is ``[..., D]`` (e.g. ``[1, T, D]`` for one packed row); ``labels`` and ``segment_ids`` have
    its leading shape. ``labels`` are already shifted (``labels[t]`` is the target of position ``t``);
    positions with ``ignore_index`` contribute nothing and never reach the LM head. ``segment_ids`` maps
    every trained position to its sequence in ``[0, num_segments)``. Returns ``(logp_sums [S] fp32,
    token_counts [S] int64)``; ``logp_sums`` is differentiable w.r.t. ``hidden`` and ``weight``.

    The token selection runs where ``labels`` live: pass the loader's CPU labels and segment ids and the
    selection costs no device-to-host sync (indices are copied to the device without blocking).
    """
    dim = hidden.shape[-1]
    flat_h = hidden.reshape(-1, dim)
    flat_labels = labels.reshape(-1)
    flat_seg = segment_ids.reshape(-1).to(flat_labels.device)
    if flat_h.shape[0] != flat_labels.shape[0] or flat_seg.shape[0] != flat_labels.shape[0]:
        raise ValueError(f"hidden {tuple(hidden.shape)}, labels {tuple(labels.shape)} and segment_ids "
                         f"{tuple(segment_ids.shape)} must share their leading shape")
    trained = (flat_labels != ignore_index).nonzero().squeeze(1)
    seg = flat_seg.index_select(0, trained).long()
    targets = flat_labels.index_select(0, trained).long()
    if seg.device.type == "cpu" and seg.numel() and (int(seg.min()) < 0 or int(seg.max()) >= num_segments):
        raise ValueError(f"segment ids of trained tokens must lie in [0, {num_segments})")
    device = hidden.device
    trained, seg, targets = (t.to(device, non_blocking=True) for t in (trained, seg, targets))
    logp = token_logprobs(flat_h.index_select(0, trained), weight, targets, chunk_size)
    sums = torch.zeros(num_segments, dtype=torch.float32, device=device).index_add(0, seg, logp)
    counts = torch.zeros(num_segments, dtype=torch.long, device=device).index_add_(0, seg, torch.ones_like(seg))
    return sums, counts


def segment_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int, offset: int = 0) -> torch.Tensor:
    """Document index of positions ``[offset, offset + total)`` of a packed row (``-1`` past the last document).

    ``offset`` selects a sequence-parallel rank's columns of a row whose ``cu_seqlens`` stay global.
    """
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    end = offset + total
    if ids.numel() < end:
        ids = torch.cat([ids, ids.new_full((end - ids.numel(),), -1)])
    return ids[offset:end]


def pair_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor,
                  chosen_index: torch.Tensor, rejected_index: torch.Tensor, *, token_offset: int = 0,
                  chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, torch.Tensor]:
    """Chosen/rejected log-prob sums and trained-token counts of the pairs packed in one row.

    ``hidden [1, T, D]`` and ``labels [1, T]`` may be a sequence-parallel shard starting at column
    ``token_offset`` of the row described by the global ``cu_seqlens``; the sums are then this shard's
    partial sums (the caller reduces them over the SP group). ``chosen_index``/``rejected_index [P]`` are
    segment indices into ``cu_seqlens`` (see :mod:`mirotrain.data.preference`).
    """
    num_segments = cu_seqlens.numel() - 1
    seg = segment_ids_from_cu_seqlens(cu_seqlens.to(labels.device), labels.shape[-1], token_offset)
    sums, counts = sequence_logprobs(hidden, weight, labels, seg.reshape(labels.shape), num_segments,
                                     chunk_size=chunk_size)
    ci = chosen_index.to(sums.device, non_blocking=True).long()
    ri = rejected_index.to(sums.device, non_blocking=True).long()
    return {"chosen_logps": sums[ci], "rejected_logps": sums[ri],
            "chosen_tokens": counts[ci], "rejected_tokens": counts[ri]}
