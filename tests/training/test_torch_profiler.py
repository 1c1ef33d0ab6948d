"""The ``profiler`` section of a MiroTrain recipe, driven step by step on CPU: traces appear where the config
says, after wait + warmup + active steps, and nothing is written while it is disabled."""

import json
from pathlib import Path

import torch

from mirotrain.config import load_config
from mirotrain.training.torch_profiler import profiler_from_node

RECIPE = (Path(__file__).resolve().parents[1] / "fixtures" / "mirotrain_v0_1" / "recipes" / "configs" / "qwen3"
          / "8B_full_sft.yaml")


def _steps(profiler, n: int) -> None:
    x = torch.randn(64, 64)
    with profiler:
        for _ in range(n):
            (x @ x).sum()
            profiler.step()


def test_traces_are_written_where_the_config_says(tmp_path):
    cfg = load_config(RECIPE, [f"output_dir={tmp_path}", "profiler.enabled=True", "profiler.wait_steps=1",
                               "profiler.warmup_steps=1", "profiler.active_steps=2"])
    out = tmp_path / "profiling_outputs"  # the recipe's ${output_dir}/profiling_outputs
    profiler = profiler_from_node(cfg["profiler"], rank=0, device=torch.device("cpu"), run_output_dir="/unused")
    _steps(profiler, 1)
    assert not list(out.glob("iteration_*"))  # ended while waiting: nothing recorded
    _steps(profiler_from_node(cfg["profiler"], rank=0, device=torch.device("cpu"), run_output_dir="/unused"), 6)
    assert [p.name for p in out.iterdir()] == ["iteration_4"]  # wait 1 + warmup 1 + active 2, one cycle
    trace = json.loads((out / "iteration_4" / "rank0_trace.json").read_text())
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])
    assert "aten::mm" in (out / "iteration_4" / "rank0_key_averages.txt").read_text()


def test_disabled_profiler_writes_nothing_and_defaults_under_the_run(tmp_path):
    cfg = load_config(RECIPE, [f"output_dir={tmp_path / 'elsewhere'}", "~profiler.output_dir"])
    _steps(profiler_from_node(cfg["profiler"], rank=0, device=torch.device("cpu"), run_output_dir=str(tmp_path)), 12)
    assert not (tmp_path / "profiling_outputs").exists()
    enabled = {**cfg["profiler"], "enabled": True, "wait_steps": 0, "warmup_steps": 1, "active_steps": 1}
    _steps(profiler_from_node(enabled, rank=3, device=torch.device("cpu"), run_output_dir=str(tmp_path)), 3)
    assert (tmp_path / "profiling_outputs" / "iteration_2" / "rank3_trace.json").is_file()
