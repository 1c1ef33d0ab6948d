"""Packing 10,000 samples: whole documents, nothing lost or duplicated, consistent columns, DP split, resume."""

import collections
import hashlib
import random

import numpy as np
import pytest
from data_helpers import IM_END, IM_START, NL, base_cfg, reference_mask, short_conversation, write_jsonl

from mirotrain.config.tree import TrainConfig
from mirotrain.data.loader import build_train_loader
from mirotrain.data.pack_shards import build_dataset, pack, read_manifest
from mirotrain.data.packing import greedy_packs, plan_packs
from mirotrain.data.samplers import DistributedRowSampler
from mirotrain.data.shards import ShardReader

N = 10_000
L = 2048


def h(ids):
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tok, hf_tok):
    tmp = tmp_path_factory.mktemp("pack10k")
    rng = random.Random(123)
    samples = [short_conversation(rng, i) for i in range(N)]
    path = write_jsonl(tmp / "sft.jsonl", samples)
    cfg = base_cfg(tmp, path, packed=True, packed_seq_len=L, num_workers=2, rows_per_shard=64)
    ds = build_dataset(TrainConfig.from_dict(cfg), tokenizer=tok)
    out_dir, manifest = pack(ds, str(tmp / "packed"), num_workers=2)
    reference = [list(hf_tok.apply_chat_template(s["messages"], tokenize=True)["input_ids"]) for s in samples]
    return {"cfg": cfg, "dir": out_dir, "manifest": manifest, "reference": reference, "ds": ds, "tmp": tmp}


@pytest.mark.slow  # packs 10,000 samples with a pool of 2 worker processes
def test_rows_split_back_into_the_same_documents(packed):
    reader = ShardReader(packed["dir"])
    ref = packed["reference"]
    m = read_manifest(packed["dir"])
    assert m["docs"] == N and m["samples"] == N and m["skipped"] == m["dropped"] == 0
    assert m["rows"] == len(reader) and len(m["shards"]) > 1  # several shards, read as one sequence of rows
    seen = collections.Counter()
    by_index = {}
    tokens = 0
    for row in reader:
        ids, labels, pos, lens = (np.asarray(row[k], dtype=np.int64) for k in ("input_ids", "labels", "position_ids", "seq_lens"))
        assert int(lens.sum()) == len(ids) == len(labels) == len(pos) <= L
        assert len(row["doc_index"]) == len(lens)
        start = 0
        for n, doc_i in zip(lens.tolist(), row["doc_index"].tolist()):
            d_ids, d_lab, d_pos = ids[start:start + n], labels[start:start + n], pos[start:start + n]
            start += n
            assert d_pos.tolist() == list(range(n))  # restart per document
            assert d_ids[0] == IM_START and d_ids[-2] == IM_END and d_ids[-1] == NL  # whole document
            assert d_lab[-1] == -100  # no target across the document boundary
            mask = reference_mask(d_ids.tolist())
            expect = [d_ids[t + 1] if mask[t + 1] else -100 for t in range(n - 1)] + [-100]
            assert d_lab.tolist() == expect
            seen[h(d_ids)] += 1
            by_index[doc_i] = d_ids
        tokens += len(ids)
    assert seen == collections.Counter(h(r) for r in ref)  # no document lost or duplicated
    assert sorted(by_index) == list(range(N)) and all(by_index[i].tolist() == ref[i] for i in range(0, N, 97))
    assert tokens == m["tokens"] and m["pad_fraction"] == pytest.approx(1 - tokens / (len(reader) * L))
    assert m["pad_fraction"] < 0.02


@pytest.mark.slow  # packs 10,000 samples with a pool of 2 worker processes
def test_two_dp_readers_cover_rows_disjointly(packed):
    reader = ShardReader(packed["dir"])
    items = []
    for rank in range(2):
        s = DistributedRowSampler(len(reader), dp_rank=rank, dp_size=2, shuffle=True, seed=5)
        s.set_epoch(3)
        got = list(s)
        assert len(got) == len(s) == -(-len(reader) // 2)
        items.append([i for i in got if i is not None])
    assert not set(items[0]) & set(items[1])
    assert sorted(items[0] + items[1]) == list(range(len(reader)))
    # another epoch reshuffles; the same epoch repeats exactly
    s = DistributedRowSampler(len(reader), 0, 2, True, 5)
    s.set_epoch(4)
    assert [i for i in s if i is not None] != items[0]


@pytest.mark.slow  # packs 10,000 samples with a pool of 2 worker processes
def test_sampler_and_loader_resume_mid_epoch(packed, tok):
    reader = ShardReader(packed["dir"])
    s = DistributedRowSampler(len(reader), 1, 2, True, 9)
    s.set_epoch(2)
    full = list(DistributedRowSampler(len(reader), 1, 2, True, 9).epoch_items(2))
    it = iter(s)
    head = [next(it) for _ in range(7)]
    state = s.state_dict()
    s2 = DistributedRowSampler(len(reader), 1, 2, True, 0)  # a wrong seed is replaced by the saved one
    s2.load_state_dict(state)
    assert head + list(s2) == full
    with pytest.raises(ValueError, match="data-parallel size"):
        DistributedRowSampler(len(reader), 0, 4, True, 9).load_state_dict(state)

    cfg = dict(packed["cfg"])
    cfg["dataset"] = dict(cfg["dataset"], output_dir=str(packed["tmp"] / "packed"))
    loader = build_train_loader(TrainConfig.from_dict(cfg), dp_rank=0, dp_size=2, seed=11, tokenizer=tok)
    assert loader.shard_dir == packed["dir"]  # cache hit on the directory `pack` wrote
    loader.set_epoch(1)
    batches = list(loader)
    assert len(batches) == loader.steps_per_epoch
    loader.set_epoch(1)
    it = iter(loader)
    for _ in range(5):
        next(it)
    sd = loader.state_dict()
    fresh = build_train_loader(TrainConfig.from_dict(cfg), dp_rank=0, dp_size=2, seed=11, tokenizer=tok)
    fresh.load_state_dict(sd)
    fresh.set_epoch(1)  # the trainer's usual call: must not rewind a restored epoch
    rest = list(fresh)
    assert len(rest) == len(batches) - 5
    for a, b in zip(rest, batches[5:]):
        assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("input_ids", "labels", "position_ids", "cu_seqlens"))


@pytest.mark.slow  # packs with a pool of 2 worker processes
def test_pack_is_deterministic_and_cached(tmp_path, tok):
    rng = random.Random(1)
    path = write_jsonl(tmp_path / "s.jsonl", [short_conversation(rng, i) for i in range(300)])
    cfg = base_cfg(tmp_path, path, packed=True, packed_seq_len=1024)
    ds = build_dataset(TrainConfig.from_dict(cfg), tokenizer=tok)
    d1, m1 = pack(ds, str(tmp_path / "a"), num_workers=0)
    d2, m2 = pack(ds, str(tmp_path / "b"), num_workers=2)
    files1 = sorted(p.name for p in (tmp_path / "a").rglob("*.arrow"))
    assert files1 and all(
        (tmp_path / "a" / d1.split("/")[-1] / f).read_bytes() == (tmp_path / "b" / d2.split("/")[-1] / f).read_bytes() for f in files1)
    assert m1["cache_hit"] is False
    d3, m3 = pack(ds, str(tmp_path / "a"))
    assert d3 == d1 and m3["cache_hit"] is True
    cfg2 = base_cfg(tmp_path, path, packed=True, packed_seq_len=1024, pack_seed=1)
    d4, _ = pack(build_dataset(TrainConfig.from_dict(cfg2), tokenizer=tok), str(tmp_path / "a"))
    assert d4 != d1  # the key covers the options


def test_bfd_padding_on_a_realistic_length_mix():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(7.0, 1.1, size=20_000).astype(int), 20, 16384)
    packs = plan_packs(lengths, 16384, seed=0)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(lengths[p].sum() <= 16384 for p in packs)
    pad = 1 - lengths.sum() / (len(packs) * 16384)
    greedy = greedy_packs(lengths.tolist(), 16384)
    assert pad < 0.02 and pad < 1 - lengths.sum() / (len(greedy) * 16384)
    assert plan_packs(lengths, 16384, seed=0) == packs
    with pytest.raises(ValueError, match="more than packed_seq_len"):
        plan_packs([10, 20000], 16384)
