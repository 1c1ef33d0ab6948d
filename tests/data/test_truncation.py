"""Truncation: the one cut of a too-long sample, applied by the datasets after rendering."""

import json

import numpy as np
import pytest
from data_helpers import IM_END, write_jsonl

from mirotrain.data.datasets import odr_chat_dataset, preference_dataset
from mirotrain.data.render import ChatRenderer
from mirotrain.data.truncation import SampleTooLong, Truncation
from mirotrain.models.qwen3.tokenizer import qwen3_tokenizer_auto

LONG = {"messages": [{"role": "user", "content": "long " + "word " * 400}, {"role": "assistant", "content": "short"}]}


def test_fit_cuts_right_or_left_or_drops():
    ids, mask = list(range(10)), [i % 2 == 0 for i in range(10)]
    assert Truncation("right").fit(ids, mask, 4) == (ids[:4], mask[:4])
    assert Truncation("left").fit(ids, mask, 4) == (ids[-4:], mask[-4:])
    assert Truncation("right").fit(ids, mask, 10) == (ids, mask)
    assert Truncation("right").fit(ids, mask, None) == (ids, mask)
    with pytest.raises(SampleTooLong, match="10 tokens, more than max_seq_len=4"):
        Truncation("right", "drop").fit(ids, mask, 4)
    Truncation.check_pair(3, 4, 7)
    with pytest.raises(SampleTooLong):
        Truncation.check_pair(3, 5, 7)


@pytest.mark.parametrize("side", ["right", "left"])
def test_dataset_cuts_a_long_sample_once(tmp_path, tok_dir, side):
    path = write_jsonl(tmp_path / "d.jsonl", [LONG])
    full_ids, full_mask = ChatRenderer(qwen3_tokenizer_auto(tok_dir))(LONG["messages"])
    ds = odr_chat_dataset(qwen3_tokenizer_auto(tok_dir, max_seq_len=100, truncation_type=side), data_files=path)
    status, enc = ds.encode_or_report(LONG, "d.jsonl:1")
    keep = slice(None, 100) if side == "right" else slice(-100, None)
    ids, mask = full_ids[keep], full_mask[keep]
    assert status == "ok" and enc.truncated and enc.input_ids.tolist() == ids
    assert enc.labels.tolist() == [ids[t + 1] if mask[t + 1] else -100 for t in range(99)] + [-100]
    if side == "left":
        assert ids[-2] == IM_END and mask[-2]  # not overwritten with a masked eos (a bug of the system we replace)


def test_dataset_drops_or_keeps_by_the_smaller_limit(tmp_path, tok_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [LONG])
    n = len(ChatRenderer(qwen3_tokenizer_auto(tok_dir))(LONG["messages"])[0])
    drop = odr_chat_dataset(qwen3_tokenizer_auto(tok_dir, max_seq_len=100, on_overlong="drop"), data_files=path)
    status, reason = drop.encode_or_report(LONG, "d.jsonl:1")
    assert status == "drop" and f"{n} tokens" in reason
    fits = odr_chat_dataset(qwen3_tokenizer_auto(tok_dir, max_seq_len=n), data_files=path)
    assert not fits.encode(LONG, "d.jsonl:1").truncated
    packed = odr_chat_dataset(qwen3_tokenizer_auto(tok_dir, max_seq_len=n), data_files=path, packed=True,
                              packed_seq_len=n - 1)
    assert len(packed.encode(LONG, "d.jsonl:1")) == n - 1  # min(tokenizer.max_seq_len, packed_seq_len)


def test_a_pair_longer_than_a_row_is_dropped(tmp_path, tok_dir):
    pair = {"prompt": "q " * 50, "chosen": "good", "rejected": "bad"}
    path = str(tmp_path / "p.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps(pair) + "\n")
    ds = preference_dataset(qwen3_tokenizer_auto(tok_dir, max_seq_len=1024), data_files=path, packed_seq_len=64)
    status, reason = ds.encode_or_report(pair, "p.jsonl:1")
    assert status == "drop" and "more than max_seq_len=64" in reason
    ok = preference_dataset(qwen3_tokenizer_auto(tok_dir, max_seq_len=1024), data_files=path, packed_seq_len=512)
    enc = ok.encode(pair, "p.jsonl:1")
    assert np.array_equal(enc.chosen.input_ids[:10], enc.rejected.input_ids[:10])  # the shared prompt
