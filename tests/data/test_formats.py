"""Formats -> messages, sources (JSON/JSONL/Parquet on fsspec, HF datasets) and bad-input errors."""

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import base_cfg, write_jsonl

from mirotrain.config import ConfigError
from mirotrain.config.tree import TrainConfig
from mirotrain.data.errors import DataError
from mirotrain.data.formats import (
    alpaca_to_messages,
    preference_to_messages,
    sharegpt_to_messages,
    traces_to_messages,
)
from mirotrain.data.pack_shards import build_dataset, pack, pack_dataset, read_manifest
from mirotrain.data.shards import ShardReader
from mirotrain.data.formats import SampleFormatError

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _pack_error(tmp_path, lines, **dataset):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = base_cfg(tmp_path, str(path), packed=True, **dataset)
    return cfg, str(path)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"messages": [{"role": "user", "content": "hi"}', "malformed JSON line"),
        ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}', "unknown role 'robot'"),
        ('{"messages": []}', "empty conversation"),
        ('{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}', "assistant turn first"),
        ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}', "content must be a string"),
        ('{"messages": "not a list"}', "must be a list of messages"),
        ('{"conversation": []}', "missing column 'messages'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
        ('{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "y"}]}',
         "system message may only come first"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, tok, bad_line, message):
    cfg, path = _pack_error(tmp_path, [json.dumps(GOOD), json.dumps(GOOD), bad_line, json.dumps(GOOD)])
    with pytest.raises(DataError) as info:
        pack_dataset(TrainConfig.from_dict(cfg), tokenizer=tok)
    assert f"{path}:3" in str(info.value) and message in str(info.value)


def test_skip_counts_bad_samples(tmp_path, tok):
    lines = [json.dumps(GOOD), "{oops", json.dumps({"messages": []}), json.dumps(GOOD)]
    cfg, path = _pack_error(tmp_path, lines, on_bad_sample="skip")
    out = pack_dataset(TrainConfig.from_dict(cfg), tokenizer=tok)
    m = read_manifest(out)
    assert m["skipped"] == 2 and m["docs"] == 2 and m["samples"] == 4
    assert any(f"{path}:2" in e for e in m["skip_examples"]) and any(f"{path}:3" in e for e in m["skip_examples"])


def test_overlong_drop_is_counted(tmp_path, tok_dir):
    from mirotrain.models.qwen3.tokenizer import qwen3_tokenizer_auto

    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    cfg, _ = _pack_error(tmp_path, [json.dumps(GOOD), json.dumps(long)], packed_seq_len=128)
    t = qwen3_tokenizer_auto(tok_dir, max_seq_len=128, on_overlong="drop")
    m = read_manifest(pack_dataset(TrainConfig.from_dict(cfg), tokenizer=t))
    assert m["dropped"] == 1 and m["docs"] == 1
    t2 = qwen3_tokenizer_auto(tok_dir, max_seq_len=128)
    m2 = read_manifest(pack_dataset(TrainConfig.from_dict(cfg), tokenizer=t2))
    assert m2["truncated"] == 1 and m2["docs"] == 2 and m2["max_doc_len"] == 128


def test_json_array_error_names_line(tmp_path, tok):
    path = tmp_path / "arr.json"
    path.write_text('[\n  {"messages": []},\n  {oops}\n]\n')
    cfg = base_cfg(tmp_path, str(path), packed=True)
    with pytest.raises(DataError, match=r"arr\.json:3: malformed JSON"):
        pack_dataset(TrainConfig.from_dict(cfg), tokenizer=tok)
    path.write_text(json.dumps([GOOD, {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}]))
    with pytest.raises(DataError, match=r"arr\.json item 1: tool result first"):
        pack_dataset(TrainConfig.from_dict(cfg), tokenizer=tok)


def test_parquet_and_memory_url_sources(tmp_path, tok):
    rows = [GOOD, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    fs = fsspec.filesystem("memory")
    with fs.open("/mt-test/data.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = base_cfg(tmp_path, "memory://mt-test/data.jsonl", packed=True, output_dir="memory://mt-test/packed")
    out = pack_dataset(TrainConfig.from_dict(cfg), tokenizer=tok)
    assert out.startswith("memory://") and len(ShardReader(out)) == 1 and read_manifest(out)["docs"] == 2
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    cfg = base_cfg(tmp_path, str(tmp_path / "d.parquet"), source="parquet", packed=True)
    cfg["dataset"]["source"] = "parquet"
    m = read_manifest(pack_dataset(TrainConfig.from_dict(cfg), tokenizer=tok))
    assert m["docs"] == 2
    bad = [GOOD, {"messages": [{"role": "assistant", "content": "x"}]}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    cfg["dataset"]["data_files"] = str(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet row 1: assistant turn first"):
        pack_dataset(TrainConfig.from_dict(cfg), tokenizer=tok)


def test_hf_datasets_source_alpaca_csv(tmp_path, tok):
    (tmp_path / "a.csv").write_text("instruction,input,output\nAdd,1 2,3\nSay hi,,hi\n")
    cfg = base_cfg(tmp_path, str(tmp_path / "a.csv"))
    cfg["dataset"] = {"_component_": "torchtune.datasets.alpaca_dataset", "source": "csv", "data_files": str(tmp_path / "a.csv"),
                      "train_on_input": False, "num_workers": 0}
    ds = build_dataset(TrainConfig.from_dict(cfg), tokenizer=tok)
    records = ds.records()
    assert len(records) == 2
    item = ds.encode(*records[0])
    text = tok.decode(item.input_ids.tolist())
    assert "Add\n\n1 2" in text and text.endswith("3<|im_end|>\n")
    trained = [t for t in item.labels.tolist() if t != -100]
    assert tok.decode(trained).endswith("3<|im_end|>") and "Add" not in tok.decode(trained)
    assert ds.source.data_files and len(ds.encode(*records[1])) > 0


def test_sharegpt_openai_alpaca_preference_conversions():
    sg = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                            {"from": "gpt", "value": "let me call"},
                            {"from": "function_call", "value": json.dumps({"name": "f", "arguments": {"x": 1}})},
                            {"from": "observation", "value": "42"}, {"from": "gpt", "value": "it is 42"}],
          "tools": json.dumps([{"name": "f"}])}
    out = sharegpt_to_messages(sg)
    roles = [m["role"] for m in out["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert out["messages"][2]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"x": 1}}
    assert out["tools"] == [{"name": "f"}]
    with pytest.raises(SampleFormatError, match="turn 1 has unknown role 'bot'"):
        sharegpt_to_messages({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]})
    oa = {"messages": [{"role": "developer", "content": "s"}, {"role": "user", "content": "q"},
                       {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
                                                                             "function": {"name": "f", "arguments": "{}"}}]},
                       {"role": "tool", "content": "r"}, {"role": "assistant", "content": "done"}]}
    msgs = traces_to_messages(oa, new_system_prompt="NEW")["messages"]
    assert msgs[0] == {"role": "system", "content": "NEW"} and msgs[2]["content"] == "" and msgs[3]["role"] == "tool"
    al = alpaca_to_messages({"instruction": "do", "input": "", "output": "done"})
    assert al["messages"] == [{"role": "user", "content": "do"}, {"role": "assistant", "content": "done"}]
    p1 = preference_to_messages({"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert p1["prompt"] == [{"role": "user", "content": "q"}] and p1["chosen"][0]["content"] == "good"
    conv = lambda a: [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]  # noqa: E731
    p2 = preference_to_messages({"chosen": conv("good"), "rejected": conv("bad")})
    assert p2["prompt"] == [{"role": "user", "content": "q"}] and p2["rejected"][0]["content"] == "bad"
    with pytest.raises(SampleFormatError, match="different prompts"):
        preference_to_messages({"chosen": conv("good"), "rejected": [{"role": "user", "content": "other"},
                                                                     {"role": "assistant", "content": "x"}]})


def test_config_errors(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    cfg = base_cfg(tmp_path, path, packed_seqlen=5)
    with pytest.raises(ConfigError, match="unknown dataset option"):
        build_dataset(TrainConfig.from_dict(cfg), tokenizer=tok)
    cfg = base_cfg(tmp_path, path, conversation_style="chatml")
    with pytest.raises(ConfigError, match="conversation_style must be one of"):
        build_dataset(TrainConfig.from_dict(cfg), tokenizer=tok)
    cfg = base_cfg(tmp_path, str(tmp_path / "missing*.jsonl"), packed=True)
    with pytest.raises(FileNotFoundError):
        pack(build_dataset(TrainConfig.from_dict(cfg), tokenizer=tok), str(tmp_path / "out"))
