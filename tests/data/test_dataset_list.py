"""A ``dataset:`` list (MiroTrain's ConcatDataset): the parts' records are packed together into one shard
directory, whose cache key covers every part."""

import collections
import random

from data_helpers import base_cfg, short_conversation, write_jsonl

from mirotrain.config.tree import parse_config
from mirotrain.data.loader import build_train_loader
from mirotrain.data.pack_shards import pack_dataset, read_manifest


def _files(tmp_path):
    rng = random.Random(11)
    first = [short_conversation(rng, i) for i in range(40)]
    second = [{"messages": [{"role": "user", "content": f"second file question {i}"},
                            {"role": "assistant", "content": f"zebra answer {i}"}]} for i in range(25)]
    return write_jsonl(tmp_path / "first.jsonl", first), write_jsonl(tmp_path / "second.jsonl", second)


def _checked(raw):
    """The config as `mirotrain pack` checks it (the sections it reads)."""
    return parse_config(raw, scope=("tokenizer", "dataset"))


def _list_config(tmp_path, first, second, **options):
    raw = base_cfg(tmp_path, first, packed=True, packed_seq_len=1024, **options)
    part = {k: v for k, v in raw["dataset"].items() if k not in ("packed", "packed_seq_len", "num_workers")}
    raw["dataset"] = [raw["dataset"], {**part, "data_files": second}]
    return raw


def test_a_dataset_list_packs_rows_from_both_files(tmp_path, tok):
    first, second = _files(tmp_path)
    cfg = _checked(_list_config(tmp_path, first, second))
    loader = build_train_loader(cfg, tokenizer=tok)
    manifest = loader.manifest
    assert manifest["docs"] == 40 + 25 and manifest["layout"] == "packed" and manifest["packed_seq_len"] == 1024
    assert [p["data_files"] for p in manifest["config"]["parts"]] == [first, second]
    text = collections.Counter()
    for batch in loader:
        decoded = tok.decode(batch.input_ids[0].tolist())
        text["first"] += sum(f"q{i}.0 " in decoded for i in range(40))
        text["second"] += sum(f"zebra answer {i}<|im_end|>" in decoded for i in range(25))
    assert text == {"first": 40, "second": 25}


def test_the_cache_key_covers_every_part(tmp_path, tok):
    first, second = _files(tmp_path)
    raw = _list_config(tmp_path, first, second)
    before = pack_dataset(_checked(raw), tokenizer=tok)
    write_jsonl(second, [{"messages": [{"role": "user", "content": "changed"}, {"role": "assistant", "content": "x"}]}])
    after = pack_dataset(_checked(raw), tokenizer=tok)
    assert before != after and read_manifest(after)["docs"] == 40 + 1
    single = dict(raw, dataset=raw["dataset"][0])
    assert pack_dataset(_checked(single), tokenizer=tok) not in (before, after)
