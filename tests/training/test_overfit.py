"""The tiny CPU config memorises a small agent-trace set (loss < 0.1): `mirotrain sft` end to end with the
real Qwen3 tokenizer, packing and loader, on a few of the demo traces (the shortest, so it runs in seconds
per epoch); also checks the run's outputs (metrics.jsonl, summary.json, HF export with tokenizer files)."""

import json

import pytest

from sft_helpers import REPO, assert_ok, run_sft

pytestmark = pytest.mark.slow  # `mirotrain sft` as a child process


def test_tiny_model_overfits_a_small_trace_set(tmp_path):
    from mirotrain.data.demo import demo_traces
    from mirotrain.data.render import ChatRenderer
    from mirotrain.models.qwen3.tokenizer import qwen3_tokenizer_auto

    render = ChatRenderer(qwen3_tokenizer_auto(None))
    traces = demo_traces(60, seed=0)
    shortest = sorted(traces, key=lambda t: len(render(t["messages"])[0]))[:6]
    data = tmp_path / "traces.jsonl"
    data.write_text("".join(json.dumps(t) + "\n" for t in shortest))
    out = tmp_path / "run"
    proc = run_sft(REPO / "mirotrain" / "configs" / "tiny" / "sft.yaml", nproc=1, timeout=300, overrides=(
        f"output_dir={out}", f"dataset.data_files={data}", "epochs=80", "save_hf_every_epoch=False",
        "auto_resume=False", "optimizer.lr=1e-2", "lr_scheduler.warmup_ratio=0.03", "lr_scheduler.min_lr_ratio=0.5",
        "log_every_n_steps=10"))
    assert_ok(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 80
    assert summary["final_loss"] < 0.1, summary
    assert (out / "hf" / "final" / "tokenizer.json").is_file() and (out / "hf" / "final" / "config.json").is_file()
    assert "Step 80 |" in proc.stdout + proc.stderr
