"""DPO reference log-probs: one pass over the shards, cached next to them (default), or a live frozen copy.

Why precompute: the reference model is frozen, so its log-prob of every chosen/rejected response is a
constant of the data. Computing it once (a forward-only pass, ~1/3 of a training step per row) and storing
``ref_chosen_logp`` / ``ref_rejected_logp`` as per-pair columns means training holds one model instead of
two and spends no compute on the reference (``reference: live`` runs the frozen copy every micro-batch instead).

Cache: the columns are written into a copy of the packed shard directory,
``{shard_dir}.ref-{key}``, where ``key`` hashes the reference weights (config + safetensors headers + file
sizes + sampled bytes), the packed data (the shard manifest's dataset/tokenizer hashes and row count), the
compute dtype and the attention backend. A finished directory has its manifest (written last), so a crashed
pass is simply redone and a finished one is reused by every later run — including the `--precompute-only`
pipeline step followed by training.

``reference: live`` keeps a frozen copy of the reference, sharded like the policy, and computes the same
numbers per micro-batch (:class:`LiveReference`); the two give the same losses (tests/dpo).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mirotrain.data.batch import PreferenceBatch
from mirotrain.modules.loss.logprobs import DEFAULT_CHUNK_SIZE, pair_logprobs
from mirotrain.training.forward import forward_hidden

log = logging.getLogger(__name__)

REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")
CACHE_VERSION = 1
_SAMPLE_BYTES = 1 << 16
_SAMPLES_PER_FILE = 8


# ------------------------------------------------------------------------------------------ forward
def forward_pair_logprobs(model: nn.Module, batch: PreferenceBatch, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                          sp_group: Any = None, sp_rank: int = 0) -> dict[str, torch.Tensor]:
    """Chosen/rejected log-prob sums (fp32) and token counts of every pair in a packed DPO batch.

    The model reads ``batch``'s (device) inputs; the token selection reads the host batch it was moved from
    (``batch.host``, see :meth:`mirotrain.data.batch.SFTBatch.to`: no host sync), or ``batch`` itself when
    it never left the host. Under Ulysses SP the batch is this rank's shard (``shard_batch_for_sp``): its
    columns start at ``sp_rank * T_local`` and the partial sums are reduced over ``sp_group``.
    """
    src = batch.host if batch.host is not None else batch
    hidden = forward_hidden(model, batch)
    offset = sp_rank * src.labels.shape[-1]
    out = pair_logprobs(hidden, model.lm_head_weight, src.labels, src.cu_seqlens, src.chosen_index,
                        src.rejected_index, token_offset=offset, chunk_size=chunk_size)
    if sp_group is not None and dist.is_initialized() and dist.get_world_size(sp_group) > 1:
        from mirotrain.parallel.ulysses import sp_all_reduce_sum

        # identity backward: each SP rank back-propagates the shared pair losses through its own tokens
        for key in ("chosen_logps", "rejected_logps"):
            out[key] = sp_all_reduce_sum(out[key], sp_group)
        for key in ("chosen_tokens", "rejected_tokens"):
            dist.all_reduce(out[key], op=dist.ReduceOp.SUM, group=sp_group)
    return out


class LiveReference:
    """``reference: live``: a frozen copy of the reference model evaluated on each micro-batch.

    Parameters are frozen and the model is in eval mode; the forward runs under ``no_grad``, so no
    activations are kept. The copy is sharded by the caller exactly like the policy.
    """

    def __init__(self, model: nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.chunk_size = chunk_size

    @torch.no_grad()
    def __call__(self, batch: PreferenceBatch, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        out = forward_pair_logprobs(self.model, batch, chunk_size=self.chunk_size, **kwargs)
        return out["chosen_logps"].detach(), out["rejected_logps"].detach()


def batch_reference_logprobs(batch: PreferenceBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The precomputed ``ref_chosen_logp`` / ``ref_rejected_logp`` columns of a batch, as fp32 on ``device``."""
    missing = [c for c in REF_COLUMNS if c not in batch.pair_columns]
    if missing:
        raise KeyError(f"batch has no precomputed reference columns {missing}; run the reference pass "
                       "(`mirotrain dpo --precompute-only`) or set reference: live")
    return tuple(batch.pair_columns[c].to(device, torch.float32, non_blocking=True) for c in REF_COLUMNS)  # type: ignore[return-value]


# -------------------------------------------------------------------------------------------- cache
def _fingerprint_file(h: "hashlib._Hash", path: Path) -> None:
    """Size, safetensors header and a few sampled blocks: cheap, and changes whenever the weights do."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, 1 << 26)))
        for k in range(_SAMPLES_PER_FILE):
            f.seek(max(0, (size - _SAMPLE_BYTES) * k // max(1, _SAMPLES_PER_FILE - 1)))
            h.update(f.read(_SAMPLE_BYTES))


def model_fingerprint(model_dir: str | None) -> str:
    """Hash of an HF checkpoint directory's config and weights (``random-init`` when there is none)."""
    if model_dir is None:
        return "random-init"
    from mirotrain.models.hf_io import localize

    root = Path(localize(model_dir))
    h = hashlib.sha256()
    for name in ("config.json",):
        if (root / name).exists():
            h.update((root / name).read_bytes())
    for path in sorted(root.glob("*.safetensors")):
        _fingerprint_file(h, path)
    return h.hexdigest()


def reference_cache_key(model_dir: str | None, shard_manifest: Mapping[str, Any], *, dtype: str,
                        attention_backend: str = "auto", extra: Mapping[str, Any] | None = None) -> str:
    """Key of a reference pass: weights x packed data x numerics (dtype, attention backend)."""
    data = {k: shard_manifest.get(k) for k in ("dataset_hash", "tokenizer_hash", "rows", "packed_seq_len",
                                               "docs", "packing", "schema_version")}
    payload = {"version": CACHE_VERSION, "model": model_fingerprint(model_dir), "data": data, "dtype": dtype,
               "attention_backend": attention_backend, **(dict(extra) if extra else {})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reference_shard_dir(shard_dir: str, key: str) -> str:
    return f"{shard_dir.rstrip('/')}.ref-{key}"


def has_reference_columns(shard_dir: str) -> bool:
    from mirotrain.data.shards import manifest_exists, read_manifest

    if not manifest_exists(shard_dir):
        return False
    return set(REF_COLUMNS) <= set(read_manifest(shard_dir).get("extra_pair_columns", []))


def num_pair_ids(reader: Any) -> int:
    """``max pair id + 1`` over every row (size of the per-pair column arrays)."""
    top = -1
    for i in range(len(reader)):
        ids = reader.row(i)["pair_ids"]
        if len(ids):
            top = max(top, int(np.max(ids)))
    return top + 1


# --------------------------------------------------------------------------------------------- pass
@torch.no_grad()
def compute_reference_columns(model: nn.Module, batches: Iterable[PreferenceBatch],
                              num_pairs: int, device: torch.device, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                              sp_group: Any = None, sp_rank: int = 0, dp_group: Any = None,
                              sp_size: int = 1, progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """Reference log-probs of every pair, indexed by pair id, identical on every rank.

    ``batches`` yields this rank's prepared rows (every rank the same number of batches, as FSDP needs). Each pair is seen by exactly one data-parallel group; the values are summed
    over all ranks and divided by the SP degree (the ranks of an SP group hold the same full sums).
    """
    model.eval()
    chosen = torch.zeros(num_pairs, dtype=torch.float64, device=device)
    rejected = torch.zeros(num_pairs, dtype=torch.float64, device=device)
    for n, batch in enumerate(batches):
        out = forward_pair_logprobs(model, batch, chunk_size=chunk_size, sp_group=sp_group, sp_rank=sp_rank)
        ids = batch.pair_ids.to(device, torch.long)
        chosen.index_add_(0, ids, out["chosen_logps"].double())
        rejected.index_add_(0, ids, out["rejected_logps"].double())
        if progress is not None:
            progress(n + 1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in (chosen, rejected):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            if sp_size > 1:
                t.div_(sp_size)
    return {"ref_chosen_logp": chosen.cpu(), "ref_rejected_logp": rejected.cpu()}


def write_reference_dir(shard_dir: str, out_dir: str, columns: Mapping[str, torch.Tensor],
                        info: Mapping[str, Any] | None = None) -> str:
    """Write ``out_dir`` = ``shard_dir`` + the reference columns (manifest last = complete)."""
    from mirotrain.data.preference import add_pair_columns

    add_pair_columns(shard_dir, out_dir, dict(columns))
    if info:
        log.info("reference log-probs written to %s (%s)", out_dir, dict(info))
    return out_dir
