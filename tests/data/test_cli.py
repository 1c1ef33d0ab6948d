"""`mirotrain data demo` and `mirotrain pack` through the CLI dispatcher (in process)."""

import json

from mirotrain.cli import main
from mirotrain.data.shards import ShardReader

CONFIG = """
output_dir: {out}/run
tokenizer:
  _component_: mirotrain.models.qwen3.qwen3_tokenizer_auto
  path: null
  max_seq_len: 2048
dataset:
  _component_: mirotrain.datasets.odr_chat_dataset
  source: json
  data_files: {out}/data/sft.jsonl
  conversation_column: messages
  conversation_style: traces
  masking_strategy: train_on_assistant
  packed: True
  streaming_pack: False
  packed_seq_len: 4096
  output_dir: ${{output_dir}}/packed
  split: train
  num_workers: 0
seed: 42
batch_size: 1
shuffle: True
"""


def test_demo_then_pack(tmp_path, capsys):
    assert main(["data", "demo", "--out", str(tmp_path / "data"), "--num-samples", "40", "--seed", "1"]) == 0
    traces = [json.loads(line) for line in open(tmp_path / "data" / "sft.jsonl")]
    assert len(traces) == 40
    roles = [m["role"] for t in traces for m in t["messages"]]
    assert "tool" in roles and any("tool_calls" in m for t in traces for m in t["messages"])
    assert any("<think>" in (m.get("content") or "") or m.get("reasoning_content") for t in traces for m in t["messages"])
    assert max(len(m.get("content") or "") for t in traces for m in t["messages"]) > 3000  # long tool outputs
    assert len({len(t["messages"]) for t in traces}) > 3  # varied turn counts
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.format(out=tmp_path))
    capsys.readouterr()
    assert main(["pack", "--config", str(cfg)]) == 0
    captured = capsys.readouterr()
    shard_dir = captured.out.strip().splitlines()[-1]
    assert shard_dir.startswith(str(tmp_path / "run" / "packed")) and "samples=40" in captured.err
    assert len(ShardReader(shard_dir)) > 0
    assert main(["pack", "--config", str(cfg)]) == 0
    again = capsys.readouterr()
    assert "cache hit" in again.err and again.out.strip().splitlines()[-1] == shard_dir
    assert main(["pack", "--config", str(cfg), "dataset.packed_seq_len=1024"]) == 2
    assert "must be >= tokenizer.max_seq_len" in capsys.readouterr().err
    (tmp_path / "data" / "sft.jsonl").write_text('{"messages": [}\n')
    assert main(["pack", "--config", str(cfg)]) == 2
    assert "sft.jsonl:1: malformed JSON" in capsys.readouterr().err
