"""Each MiroTrain v0.1 recipe trains 2 optimizer steps on CPU through the CLI (`mirotrain sft` / `dpo`).

What a CPU run has to override besides the paths, each for a reason a test machine imposes:
* the model, shrunk (2 layers, width 64; 4 experts for MoE), and the rows, 512 tokens: a packed row is
  attended with a dense [T, T] document mask on CPU, which at 32K-40K tokens needs tens of GB;
* ``device=cpu dtype=fp32`` (bf16 matmuls on CPU are several times slower), one process, so the SP/EP degrees
  become 1;
* the data, local files in the same formats (alpaca, agent traces, preference pairs) instead of Hub datasets;
* the Liger loss (a Triton kernel, CUDA only) -> the chunked linear cross-entropy;
* ``epochs=1 max_steps_per_epoch=2`` (2 steps).
The two yarn configs MiroTrain itself refuses are refused here too, by the CLI, with the one line naming
``dataset.packed_seq_len``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mirotrain.config import load_config
from mirotrain.data.demo import write_demo

RECIPES = Path(__file__).resolve().parents[1] / "fixtures" / "mirotrain_v0_1" / "recipes" / "configs"
CONFIGS = sorted(RECIPES.rglob("*.yaml"))
REFUSED = {"qwen3_yarn/8B_yarn_full_sft.yaml", "qwen3_yarn/32B_yarn_full_sft.yaml"}
SHRINK = ["model.n_layers=2", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
          "model.hidden_dim=128"]
MOE_SHRINK = ["model.moe_hidden_dim=32", "model.num_experts=4", "model.num_experts_per_tok=2"]
ROW = 512


def name(path: Path) -> str:
    return path.relative_to(RECIPES).as_posix()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """Local files in the formats of the recipes' Hub datasets."""
    out = tmp_path_factory.mktemp("recipe-data")
    files = write_demo(str(out), num_samples=40, num_pairs=200)  # GA 4 x 2 steps: 8 rows of pairs
    alpaca = out / "alpaca.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": f"Add {i} and {i + 1}.", "input": "",
                                          "output": f"{i} + {i + 1} = {2 * i + 1}."}) + "\n" for i in range(64)))
    return {"sft": files["sft"], "preference": files["preference"], "alpaca": str(alpaca)}


def cli(recipe: str, config: Path, overrides: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "mirotrain", recipe, "--config", str(config), *overrides],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def cpu_overrides(raw: dict, out: Path, data: dict[str, str]) -> list[str]:
    """Paths, the shrunk model and the CPU-imposed settings (see the module docstring)."""
    builder = raw["dataset"]["_component_"]
    kind = "preference" if builder.endswith("preference_dataset") else "alpaca" if "alpaca" in builder else "sft"
    overrides = [f"output_dir={out}", "checkpointer.checkpoint_dir=null", "tokenizer.path=null", "device=cpu",
                 "dtype=fp32", f"tokenizer.max_seq_len={ROW}", "ulysses_sequence_parallel_size=1", "epochs=1",
                 "max_steps_per_epoch=2", "dataset.source=json", f"dataset.data_files={data[kind]}", *SHRINK]
    if "name" in raw["dataset"]:
        overrides.append("~dataset.name")
    if kind != "preference":
        overrides.append(f"dataset.packed_seq_len={ROW}")  # DPO rows: 2 x max_seq_len when the config is silent
    if "ref_checkpointer" in raw:
        overrides.append("ref_checkpointer.checkpoint_dir=null")
    if "qwen3_moe" in raw["model"]["_component_"]:
        overrides += MOE_SHRINK + ["moe_expert_parallel_size=1"]
    if raw["loss"]["_component_"].endswith("LigerLinearCrossEntropyLoss"):
        overrides.append("loss._component_=mirotrain.modules.loss.LinearCrossEntropyLoss")
    return overrides


def trains_two_steps(path: Path, tmp_path: Path, data: dict[str, str]) -> None:
    raw = load_config(path)
    recipe = "dpo" if "ref_checkpointer" in raw else "sft"
    out = tmp_path / "run"
    proc = cli(recipe, path, cpu_overrides(raw, out, data), tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["steps_trained"] == 2, summary
    assert (out / "logs").is_dir()  # the recipe's DiskLogger at ${output_dir}/logs
    assert not (out / "profiling_outputs").exists()  # profiler.enabled: False


TRAINED = [p for p in CONFIGS if name(p) not in REFUSED]


# Two classes so that CI's `--dist loadscope` runs the SFT and the DPO recipes (minutes each) on two workers.
@pytest.mark.slow
class TestSFTRecipe:
    @pytest.mark.parametrize("path", [p for p in TRAINED if "ref_checkpointer" not in load_config(p)], ids=name)
    def test_trains_two_steps_on_cpu(self, path, tmp_path, data):
        trains_two_steps(path, tmp_path, data)


@pytest.mark.slow
class TestDPORecipe:
    @pytest.mark.parametrize("path", [p for p in TRAINED if "ref_checkpointer" in load_config(p)], ids=name)
    def test_trains_two_steps_on_cpu(self, path, tmp_path, data):
        trains_two_steps(path, tmp_path, data)


@pytest.mark.slow
def test_enabled_profiler_writes_traces_during_training(tmp_path, data):
    path = RECIPES / "qwen3" / "8B_full_sft.yaml"
    out = tmp_path / "run"
    overrides = cpu_overrides(load_config(path), out, data) + [
        "profiler.enabled=True", "profiler.wait_steps=0", "profiler.warmup_steps=1", "profiler.active_steps=1"]
    proc = cli("sft", path, overrides, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "profiling_outputs" / "iteration_2" / "rank0_trace.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in CONFIGS if name(p) in REFUSED], ids=name)
def test_refused_yarn_recipe_stops_with_one_line(path, tmp_path):
    proc = cli("sft", path, [f"output_dir={tmp_path / 'run'}", "checkpointer.checkpoint_dir=null",
                             "tokenizer.path=null", "device=cpu", "ulysses_sequence_parallel_size=1"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"mirotrain sft: {path}: config key 'dataset.packed_seq_len': "
                                                     "(32768) must be >= tokenizer.max_seq_len (131072)")
