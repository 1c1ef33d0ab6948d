"""How preference pairs fill DPO rows: packed (several short pairs per row, the default) or one pair per row
(``one_pair_per_row``, MiroTrain's meaning of batch_size), what `mirotrain pack` records about it, and the
shard cache that keeps the two apart."""

from __future__ import annotations

import numpy as np
import pytest

from mirotrain.config.tree import TrainConfig
from mirotrain.data.demo import write_demo
from mirotrain.data.loader import build_train_loader
from mirotrain.data.pack_shards import build_dataset, existing_shards, pack_dataset
from mirotrain.data.preference import DPOShardReader, PairsPerRow


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> str:
    return write_demo(str(tmp_path_factory.mktemp("pairs")), num_samples=1, seed=0, num_pairs=60)["preference"]


def _cfg(tmp_path, pairs_file: str, **keys) -> TrainConfig:
    """The tiny DPO data config: demo pairs (~70 tokens each) in 512-token rows."""
    return TrainConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "seed": 3, "batch_size": 1, "shuffle": True,
        "tokenizer": {"_component_": "mirotrain.models.qwen3.qwen3_tokenizer_auto", "path": None, "max_seq_len": 256},
        "dataset": {"_component_": "torchtune.datasets.preference_dataset", "source": "json",
                    "data_files": pairs_file, "packed_seq_len": 512, "num_workers": 0},
        **keys})


def _pairs_per_row(shard_dir: str) -> list[int]:
    reader = DPOShardReader(shard_dir)
    return [len(reader.pair_row(i)["pair_ids"]) for i in range(len(reader))]


def test_one_pair_per_row_puts_each_pair_alone_in_its_own_shards(tmp_path, pairs_file, tok):
    packed = pack_dataset(_cfg(tmp_path, pairs_file), tokenizer=tok)
    single = pack_dataset(_cfg(tmp_path, pairs_file, one_pair_per_row=True), tokenizer=tok)
    assert single != packed  # another cache entry: the packed shards are not reused for it, nor the reverse
    assert _pairs_per_row(single) == [1] * 60
    per_row = _pairs_per_row(packed)
    assert sum(per_row) == 60 and max(per_row) > 1
    # every pair is there once, with its two documents
    assert sorted(int(p) for i in range(60) for p in DPOShardReader(single).pair_row(i)["pair_ids"]) == list(range(60))
    # the manifest counts what the rows hold, for `mirotrain validate`
    stats = PairsPerRow.of(DPOShardReader(packed).manifest)
    assert (stats.pairs, stats.rows, stats.fewest, stats.most) == (60, len(per_row), min(per_row), max(per_row))
    assert PairsPerRow.of(DPOShardReader(single).manifest).mean == 1.0
    assert DPOShardReader(single).manifest["one_pair_per_row"] is True


def test_one_pair_per_row_changes_the_fingerprint_and_nothing_else_does_by_default(tmp_path, pairs_file, tok):
    default = build_dataset(_cfg(tmp_path, pairs_file), tokenizer=tok)
    written_false = build_dataset(_cfg(tmp_path, pairs_file, one_pair_per_row=False), tokenizer=tok)
    single = build_dataset(_cfg(tmp_path, pairs_file, one_pair_per_row=True), tokenizer=tok)
    assert default.fingerprint() == written_false.fingerprint()
    assert single.fingerprint() != default.fingerprint()
    listed = _cfg(tmp_path, pairs_file, one_pair_per_row=True)
    node = dict(listed.data.dataset.node)
    as_list = TrainConfig.from_dict({**listed.to_dict(), "dataset": [node, node]})  # a dataset list: ConcatDataset
    concat_single = build_dataset(as_list, tokenizer=tok)
    concat_default = build_dataset(TrainConfig.from_dict({**as_list.to_dict(), "one_pair_per_row": False}),
                                   tokenizer=tok)
    assert concat_single.one_pair_per_row and concat_single.fingerprint() != concat_default.fingerprint()


def test_existing_shards_finds_the_packed_directory_only_once_packed(tmp_path, pairs_file, tok):
    cfg = _cfg(tmp_path, pairs_file, one_pair_per_row=True)
    assert existing_shards(cfg, tokenizer=tok) is None
    shard_dir = pack_dataset(cfg, tokenizer=tok)
    assert existing_shards(cfg, tokenizer=tok) == shard_dir
    assert existing_shards(_cfg(tmp_path, pairs_file), tokenizer=tok) is None  # the packed layout is another directory


@pytest.mark.parametrize("dp_size,ga", [(1, 3), (2, 2)])
def test_a_step_trains_batch_size_x_ga_x_dp_pairs_with_one_pair_per_row(tmp_path, pairs_file, tok, dp_size, ga):
    """The micro-batches one optimizer step consumes on every data-parallel rank hold batch_size × GA × dp pairs
    (the DPO objective sums the pairs of those micro-batches); packed rows hold more."""
    def step_pairs(cfg: TrainConfig) -> list[int]:
        per_rank = []
        for rank in range(dp_size):
            loader = build_train_loader(cfg, dp_rank=rank, dp_size=dp_size, seed=cfg.run.seed, tokenizer=tok)
            loader.set_epoch(0)
            per_rank.append([batch.num_pairs for batch, _ in zip(loader, range(2 * ga))])
        return [int(np.sum([r[s * ga:(s + 1) * ga] for r in per_rank])) for s in range(2)]  # two steps

    keys = {"gradient_accumulation_steps": ga}
    assert step_pairs(_cfg(tmp_path, pairs_file, one_pair_per_row=True, **keys)) == [1 * ga * dp_size] * 2
    assert min(step_pairs(_cfg(tmp_path, pairs_file, **keys))) > 1 * ga * dp_size
