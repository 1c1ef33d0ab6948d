"""build_train_loader in every mode: packed collate, unpacked, streaming pack (exact steps), DPO rows."""

import collections
import hashlib
import json
import random

import numpy as np
import pytest
import torch
from data_helpers import IM_START, base_cfg, short_conversation, split_docs, write_jsonl

from mirotrain.config.tree import TrainConfig
from mirotrain.data.collate import collate_packed
from mirotrain.data.demo import demo_preferences, write_demo
from mirotrain.data.loader import build_train_loader
from mirotrain.data.pack_shards import pack_dataset, read_manifest
from mirotrain.data.preference import DPOShardReader, add_pair_columns, segment_sums
from mirotrain.data.render import ChatRenderer

PAD = 151643


def h(ids):
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    rng = random.Random(4)
    samples = [short_conversation(rng, i) for i in range(301)]
    return tmp, samples, write_jsonl(tmp / "sft.jsonl", samples)


def docs_of_batch(batch):
    """Real documents of a packed batch (segments starting with <|im_start|>), checking the padding segment."""
    ids = batch.input_ids[0].tolist()
    labels = batch.labels[0].tolist()
    pos = batch.position_ids[0].tolist()
    cu = batch.cu_seqlens.tolist()
    docs = []
    for a, b in zip(cu[:-1], cu[1:]):
        assert pos[a:b] == list(range(b - a))  # positions restart in every segment, padding included
        if ids[a] == IM_START:
            docs.append(ids[a:b])
        else:  # the padding segment: pad ids, no targets, never part of a document
            assert set(ids[a:b]) == {PAD} and set(labels[a:b]) == {-100}
    assert batch.max_seqlen == max(b - a for a, b in zip(cu[:-1], cu[1:]))
    return docs


def test_packed_batches_follow_the_contract(sft_file, tok):
    tmp, samples, path = sft_file
    cfg = base_cfg(tmp, path, packed=True, packed_seq_len=1024)
    loader = build_train_loader(TrainConfig.from_dict(cfg), dp_rank=0, dp_size=1, seed=1, tokenizer=tok)
    seen = collections.Counter()
    n = 0
    for batch in loader:
        n += 1
        assert batch.input_ids.shape == (1, 1024) and batch.input_ids.dtype == torch.long
        assert batch.labels.shape == batch.position_ids.shape == (1, 1024)
        assert batch.cu_seqlens.dtype == torch.int32 and int(batch.cu_seqlens[-1]) == 1024
        for d in docs_of_batch(batch):
            seen[h(d)] += 1
    assert n == loader.steps_per_epoch
    ref = collections.Counter(h(ChatRenderer(tok)(s["messages"])[0]) for s in samples)
    assert seen == ref


def test_collate_keeps_padding_out_of_documents():
    row = {"input_ids": np.array([1, 2, 3, 4, 5]), "labels": np.array([2, 3, -100, 5, -100]),
           "position_ids": np.array([0, 1, 2, 0, 1]), "seq_lens": np.array([3, 2])}
    b = collate_packed([row], pad_id=PAD, packed_seq_len=8)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5, PAD, PAD, PAD]]
    assert b.labels.tolist() == [[2, 3, -100, 5, -100, -100, -100, -100]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert b.cu_seqlens.tolist() == [0, 3, 5, 8] and b.max_seqlen == 3
    assert b.token_mask.tolist() == [[True] * 5 + [False] * 3]
    full = collate_packed([row], pad_id=PAD, packed_seq_len=5)
    assert full.cu_seqlens.tolist() == [0, 3, 5] and bool(full.token_mask.all())


def test_padded_collate_marks_padding():
    from mirotrain.data.collate import padded_collate_sft

    rows = [{"input_ids": np.array([1, 2, 3]), "labels": np.array([2, 3, -100])},
            {"input_ids": np.array([4]), "labels": np.array([-100])}]
    b = padded_collate_sft(rows, pad_id=PAD)
    assert b.token_mask.tolist() == [[True, True, True], [True, False, False]]


def test_unpacked_batches_cover_every_sample_once(sft_file, tok):
    tmp, samples, path = sft_file
    cfg = base_cfg(tmp, path)
    cfg["batch_size"] = 4
    seen = collections.Counter()
    steps = []
    for rank in range(2):
        loader = build_train_loader(TrainConfig.from_dict(cfg), dp_rank=rank, dp_size=2, seed=3, tokenizer=tok)
        loader.set_epoch(0)
        batches = list(loader)
        steps.append((len(batches), loader.steps_per_epoch))
        for b in batches:
            assert b.cu_seqlens is None and b.input_ids.shape[0] <= 4
            for ids, labels in zip(b.input_ids.tolist(), b.labels.tolist()):
                real = [t for t in ids if t != PAD]
                if real:
                    seen[h(ids[: len(real)])] += 1
                else:
                    assert set(labels) == {-100}  # the remainder's padding sample trains nothing
    assert steps[0] == steps[1] and steps[0][0] == steps[0][1] == 38  # ceil(ceil(301/2)/4)
    assert seen == collections.Counter(h(ChatRenderer(tok)(s["messages"])[0]) for s in samples)


def test_streaming_pack_runs_the_announced_steps(sft_file, tok):
    tmp, samples, path = sft_file
    cfg = base_cfg(tmp, path, streaming_pack=True, packed_seq_len=512)
    ref = collections.Counter(h(ChatRenderer(tok)(s["messages"])[0]) for s in samples)
    loaders = [build_train_loader(TrainConfig.from_dict(cfg), dp_rank=r, dp_size=2, seed=8, tokenizer=tok) for r in range(2)]
    assert loaders[0].steps_per_epoch == loaders[1].steps_per_epoch > 0
    for epoch in (0, 1):
        seen = collections.Counter()
        for loader in loaders:
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == loader.steps_per_epoch  # exactly what was announced
            for b in batches:
                assert b.input_ids.shape == (1, 512)
                for d in docs_of_batch(b):
                    seen[h(d)] += 1
        assert seen == ref  # every sample once per epoch across ranks
    # resume mid-epoch
    loader = loaders[1]
    loader.set_epoch(1)
    full = list(loader)
    loader.set_epoch(1)
    it = iter(loader)
    for _ in range(3):
        next(it)
    sd = json.loads(json.dumps(loader.state_dict()))
    fresh = build_train_loader(TrainConfig.from_dict(cfg), dp_rank=1, dp_size=2, seed=8, tokenizer=tok)
    fresh.load_state_dict(sd)
    fresh.set_epoch(1)
    rest = list(fresh)
    assert len(rest) == len(full) - 3 and all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(rest, full[3:]))


def test_dpo_rows_pairs_and_added_columns(tmp_path, tok, hf_tok):
    files = write_demo(str(tmp_path / "demo"), num_samples=5, seed=2, num_pairs=60)
    pairs = [json.loads(line) for line in open(files["preference"])]
    cfg = base_cfg(tmp_path, files["preference"])
    cfg["dataset"] = {"_component_": "mirotrain.datasets.preference_dataset", "source": "json",
                      "data_files": files["preference"], "packed_seq_len": 256, "num_workers": 0}
    out = pack_dataset(TrainConfig.from_dict(cfg), tokenizer=tok)
    m = read_manifest(out)
    assert m["kind"] == "dpo" and m["docs"] == 60
    reader = DPOShardReader(out)
    seen = set()
    for i in range(len(reader)):
        row = reader.pair_row(i)
        lens = row["seq_lens"].tolist()
        assert len(lens) == 2 * len(row["pair_ids"]) and sum(lens) == len(row["input_ids"]) <= 256
        docs = split_docs(row["input_ids"].tolist(), lens)
        labs = split_docs(row["labels"].tolist(), lens)
        for p, c, r in zip(row["pair_ids"].tolist(), row["chosen_index"].tolist(), row["rejected_index"].tolist()):
            seen.add(p)
            src = pairs[p]
            for seg, key in ((c, "chosen"), (r, "rejected")):
                ref = list(hf_tok.apply_chat_template(src["prompt"] + src[key], tokenize=True)["input_ids"])
                assert docs[seg] == ref
                trained = tok.decode([t for t in labs[seg] if t != -100])
                assert trained.endswith(src[key][0]["content"] + "<|im_end|>") and "What is" not in trained
    assert seen == set(range(60))
    ref_c = np.arange(60) * 0.5
    ref_r = -np.arange(60) * 1.0
    out2 = str(tmp_path / "with_ref")
    add_pair_columns(out, out2, {"ref_chosen_logp": ref_c, "ref_rejected_logp": torch.from_numpy(ref_r)})
    reader2 = DPOShardReader(out2)
    assert reader2.extra_columns == ["ref_chosen_logp", "ref_rejected_logp"] and len(reader2) == len(reader)
    cfg2 = dict(cfg, dataset={"shard_dir": out2})
    loader = build_train_loader(TrainConfig.from_dict(cfg2), dp_rank=0, dp_size=2, seed=0, tokenizer=tok)
    got = {}
    for b in loader:
        assert b.input_ids.shape == (1, 256)
        cu = b.cu_seqlens
        seg_tokens = segment_sums(torch.ones(256, dtype=torch.float64), cu)
        assert seg_tokens.tolist() == (cu[1:] - cu[:-1]).tolist()
        for k, p in enumerate(b.pair_ids.tolist()):
            got[p] = (float(b.pair_columns["ref_chosen_logp"][k]), float(b.pair_columns["ref_rejected_logp"][k]))
            c, r = int(b.chosen_index[k]), int(b.rejected_index[k])
            assert b.input_ids[0, cu[c]] == IM_START and b.input_ids[0, cu[r]] == IM_START
    assert got and all(got[p] == (ref_c[p], ref_r[p]) for p in got)
    with pytest.raises(ValueError, match="pair id"):
        add_pair_columns(out, str(tmp_path / "bad"), {"ref_chosen_logp": np.zeros(3)})


def test_demo_preferences_follow_a_learnable_pattern():
    prefs = demo_preferences(100, seed=0)
    assert all(p["chosen"][0]["content"].startswith("Sure.") for p in prefs)
    assert not any(p["rejected"][0]["content"].startswith("Sure.") for p in prefs)
    assert demo_preferences(100, seed=0) == prefs
