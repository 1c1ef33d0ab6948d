"""Training-side data loading: ``build_train_loader`` (contract in docs/contracts.md).

Modes, picked from the ``dataset`` section:
* ``packed: True`` -- pack once (cache hit when already packed; with a process group only global rank 0 packs,
  the others wait at a barrier) and read the Arrow shards memory-mapped; one packed row per micro-batch.
* ``streaming_pack: True`` -- :mod:`mirotrain.data.streaming` (no preprocessing; exact step count).
* neither -- unpacked: documents are tokenised once into one-document rows (same cache), batches of
  ``batch_size`` right-padded rows.
* a preference dataset -- DPO rows (:mod:`mirotrain.data.preference`), one row per micro-batch.
* ``shard_dir: <dir>`` -- read an existing shard directory as is (e.g. DPO rows with reference log-probs).

Remainder handling: every data-parallel rank gets ``ceil(rows / R)`` rows per epoch; a rank that runs out
gets an all-padding row (labels all -100, so it adds nothing to the loss sum nor to the trained-token count).
Every row is used exactly once per epoch, and every rank runs ``steps_per_epoch`` micro-batches.
The ranks of one sequence-parallel group pass the same ``dp_rank`` and therefore read the same rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from mirotrain.data.collate import collate_packed, padded_collate_dpo, padded_collate_sft, padding_dpo_row, padding_row
from mirotrain.data.datasets import PreferenceDataset
from mirotrain.data.pack_shards import build_dataset, pack, output_root
from mirotrain.data.preference import extra_pair_columns
from mirotrain.data.samplers import DistributedRowSampler
from mirotrain.data.shards import ShardReader, read_manifest

if TYPE_CHECKING:
    from mirotrain.config.tree import TrainConfig


def _dist():
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist
    except Exception:  # pragma: no cover
        pass
    return None


def _config_error(key: str, message: str) -> Exception:
    from mirotrain.config import ConfigError

    return ConfigError(key, message)


class TrainLoader:
    """Iterates batch dicts for one data-parallel rank; stateful for exact resume."""

    def __init__(self, mode: str, *, batch_size: int, pad_id: int, sampler: DistributedRowSampler | None = None,
                 reader: ShardReader | None = None, packed_seq_len: int | None = None, streamer: Any = None,
                 seed: int = 0, shard_dir: str | None = None):
        self.mode, self.batch_size, self.pad_id = mode, int(batch_size), int(pad_id)
        self.sampler, self.reader, self.streamer = sampler, reader, streamer
        self.packed_seq_len = packed_seq_len
        self.shard_dir = shard_dir
        self.manifest = reader.manifest if reader is not None else None
        self.extra_columns = extra_pair_columns(self.manifest) if (reader is not None and mode == "dpo") else []
        self._stream_state = {"epoch": 0, "position": 0, "seed": int(seed)}
        self._resumed = False

    # -- size / epoch ----------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        if self.mode == "streaming":
            return self.streamer.steps_per_epoch
        n = len(self.sampler)
        return -(-n // self.batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def epoch(self) -> int:
        return self._stream_state["epoch"] if self.mode == "streaming" else self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning -- unless a restored state points into this very epoch."""
        if self._resumed and epoch == self.epoch:
            self._resumed = False
            return
        self._resumed = False
        if self.mode == "streaming":
            self._stream_state.update(epoch=int(epoch), position=0)
        else:
            self.sampler.set_epoch(epoch)

    # -- iteration -------------------------------------------------------------------------------
    def _row(self, item: int | None) -> dict:
        if self.mode == "dpo":
            if item is None:
                return padding_dpo_row(self.pad_id)
            row = dict(self.reader.row(item))
            return row
        if item is None:
            return padding_row(self.pad_id)
        return self.reader.row(item)

    def __iter__(self) -> Iterator[dict]:
        self._resumed = False
        if self.mode == "streaming":
            st = self._stream_state
            for row in self.streamer.iter_rows(st["epoch"], st["position"]):
                st["position"] += 1
                yield collate_packed([row if row is not None else padding_row(self.pad_id)], self.pad_id, self.packed_seq_len)
            return
        if self.mode in ("packed", "dpo"):
            for item in self.sampler:
                row = self._row(item)
                if self.mode == "dpo":
                    yield padded_collate_dpo([row], pad_id=self.pad_id, packed_seq_len=self.packed_seq_len, extra_columns=self.extra_columns)
                else:
                    yield collate_packed([row], self.pad_id, self.packed_seq_len)
            return
        batch: list[dict] = []
        for item in self.sampler:
            batch.append(self._row(item))
            if len(batch) == self.batch_size:
                yield padded_collate_sft(batch, pad_id=self.pad_id)
                batch = []
        if batch:
            yield padded_collate_sft(batch, pad_id=self.pad_id)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.mode == "streaming":
            return {"mode": self.mode, **self._stream_state}
        return {"mode": self.mode, "batch_size": self.batch_size, **self.sampler.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("mode") != self.mode:
            raise ValueError(f"dataloader state is for mode {sd.get('mode')!r}, this loader is {self.mode!r}")
        if self.mode == "streaming":
            if int(sd["seed"]) != self._stream_state["seed"]:
                # the plan depends on the seed: keep the saved one so the resumed epoch is the same epoch
                self.streamer.seed = int(sd["seed"])
                self.streamer._plan_epoch = None
            self._stream_state = {"epoch": int(sd["epoch"]), "position": int(sd["position"]), "seed": int(sd["seed"])}
        else:
            if int(sd.get("batch_size", self.batch_size)) != self.batch_size:
                raise ValueError(f"cannot resume: saved batch_size={sd['batch_size']}, now {self.batch_size}")
            self.sampler.load_state_dict(sd)
        self._resumed = True


def _ensure_packed(cfg: TrainConfig, section: str, ds: Any) -> str:
    """Pack on global rank 0 (cache hit if done), barrier, return the shard dir on every rank."""
    from mirotrain.data.pack_shards import shard_dir_for

    dist = _dist()
    root = output_root(cfg, section)
    if dist is None:
        return pack(ds, root, num_workers=ds.options.num_workers)[0]
    failure: list[Exception | None] = [None]
    if dist.get_rank() == 0:
        try:
            pack(ds, root, num_workers=ds.options.num_workers)
        except Exception as exc:  # noqa: BLE001 - re-raised below, on rank 0 as it is
            failure[0] = exc if isinstance(exc, ValueError) else RuntimeError(f"packing failed on rank 0: {exc!r}")
            dist.broadcast_object_list(failure, src=0)
            raise
    # Every rank learns rank 0's outcome (instead of a barrier that breaks when rank 0 leaves), so a bad data
    # file stops every rank with the same one-line error.
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise failure[0]
    return shard_dir_for(ds, root)


def build_train_loader(cfg: TrainConfig, section: str = "dataset", *, dp_rank: int = 0, dp_size: int = 1,
                       seed: int | None = 0, tokenizer: Any = None) -> TrainLoader:
    """The data loader of one data-parallel rank for the config's ``section`` (see the module docstring)."""
    sec = cfg.data.section(section)
    if sec is None:
        raise _config_error(section, "missing dataset section")
    batch_size = cfg.data.batch_size
    seed = 0 if seed is None else int(seed)
    if sec.shard_dir:
        shard_dir = str(sec.shard_dir)
        manifest = read_manifest(shard_dir)
        mode = "dpo" if manifest.get("kind") == "dpo" else ("packed" if manifest.get("layout") == "packed" else "unpacked")
        pad_id = int(manifest["pad_id"])
    else:
        if tokenizer is None:
            from mirotrain.config import instantiate

            tokenizer = instantiate(cfg.tokenizer.component)
        ds = build_dataset(cfg, section, tokenizer)
        pad_id = int(tokenizer.pad_id)
        if ds.kind == PreferenceDataset.kind:
            mode = "dpo"
        elif sec.streaming_pack:
            from mirotrain.data.streaming import StreamingPacker

            streamer = StreamingPacker(ds, dp_rank, dp_size, seed)
            return TrainLoader("streaming", batch_size=1, pad_id=pad_id, streamer=streamer,
                               packed_seq_len=ds.options.packed_seq_len, seed=seed)
        else:
            mode = "packed" if sec.packed else "unpacked"
        shard_dir = _ensure_packed(cfg, section, ds)
    reader = ShardReader(shard_dir)
    sampler = DistributedRowSampler(len(reader), dp_rank=dp_rank, dp_size=dp_size, shuffle=cfg.data.shuffle, seed=seed)
    L = reader.manifest.get("packed_seq_len") if mode in ("packed", "dpo") else None
    return TrainLoader(mode, batch_size=batch_size if mode == "unpacked" else 1, pad_id=pad_id, sampler=sampler,
                       reader=reader, packed_seq_len=L, seed=seed, shard_dir=shard_dir)


__all__ = ["TrainLoader", "build_train_loader", "read_manifest"]
