"""Deterministic mode (mirotrain/training/determinism.py, ``cudnn_deterministic_mode``).

Fast: what the mode sets (environment, torch flags, the attention kernel and the loss's compilation) and that it
refuses an environment that would undo it. Slow: `mirotrain sft` under torchrun (2 ranks, gloo, tiny fp32
Qwen3) with the mode, run twice, is bitwise equal (losses, grad norms, LRs, final weights), and a run SIGKILLed
after a step checkpoint and restarted equals both. CPU runs are bitwise reproducible with or without the mode,
so the slow tests check that the mode's settings (strict deterministic algorithms, the eager loss) break
nothing on the resume path; what the mode buys is proven on 2 GPUs: tests/gpu/test_deterministic_gpu.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._inductor.config as inductor_config

from mirotrain.config import load_config
from mirotrain.config.loader import ConfigError
from mirotrain.config.tree import TrainConfig
from mirotrain.modules.attention import single_document_kernel
from mirotrain.training.builders import ModelSpec
from mirotrain.training.determinism import deterministic_environment, enable_deterministic_mode
from sft_helpers import assert_ok, assert_same_training, run_sft, tiny_config, write_config, write_shards

TINY_SFT = Path(__file__).resolve().parents[2] / "mirotrain" / "configs" / "tiny" / "sft.yaml"
STEPS, EVERY, KILL_AFTER = 12, 4, 6


@pytest.fixture
def process_flags():
    """The mode sets process-wide torch flags: they are put back for the tests that follow."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             getattr(inductor_config, "deterministic", None))
    yield
    enabled, warn_only, cudnn_deterministic, benchmark, inductor = saved
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_deterministic, benchmark
    if inductor is not None:
        inductor_config.deterministic = inductor


def test_the_mode_sets_environment_flags_and_attention_kernel(process_flags):
    assert single_document_kernel(torch.bfloat16, 128) == "cudnn"  # without the mode
    environ: dict[str, str] = {}
    line = enable_deterministic_mode(environ)
    assert environ == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NCCL_NVLS_ENABLE": "0"}
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert getattr(inductor_config, "deterministic", True) is True
    assert single_document_kernel(torch.bfloat16, 128) == "sdpa"
    assert "CUBLAS_WORKSPACE_CONFIG=:4096:8, NCCL_NVLS_ENABLE=0" in line
    # strict, not warn_only: an op without a deterministic kernel fails, naming itself
    with pytest.raises(RuntimeError, match="put_ does not have a deterministic implementation"):
        torch.zeros(4).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))


def test_a_deterministic_user_setting_is_kept_and_any_other_refused():
    assert deterministic_environment({"CUBLAS_WORKSPACE_CONFIG": ":16:8"})["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    for name, value in (("CUBLAS_WORKSPACE_CONFIG", ":0:0"), ("NCCL_NVLS_ENABLE", "1")):
        with pytest.raises(ConfigError, match=f"config key 'cudnn_deterministic_mode': needs {name} .*{value}"):
            deterministic_environment({name: value})


@pytest.mark.parametrize("mode, compiled", [("false", (True, True)), ("true", (True, False))])
def test_the_mode_runs_the_loss_uncompiled_and_keeps_the_compiled_layers(mode, compiled):
    overrides = ["compile=true", f"cudnn_deterministic_mode={mode}", "enable_activation_checkpointing=true",
                 "mlp_tiles=1"]
    spec = ModelSpec.from_config(TrainConfig.from_dict(load_config(TINY_SFT, overrides)), torch.device("cpu"), 1)
    assert (spec.compile_model, spec.compile_loss) == compiled


# ------------------------------------------------------------------------------- end to end (slow)


def _config(tmp: Path, shards: str, name: str, **extra) -> Path:
    cfg = tiny_config(tmp / name, shards, cudnn_deterministic_mode=True, seed=7, **extra)
    return write_config(cfg, tmp / f"{name}.yaml")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run with the mode, and the shards every run here reads."""
    tmp = tmp_path_factory.mktemp("deterministic")
    shards = write_shards(tmp / "shards", n_rows=2 * STEPS, seq_len=64, seed=3)
    proc = run_sft(_config(tmp, shards, "first"), nproc=2)
    assert_ok(proc)
    assert "cudnn_deterministic_mode: deterministic algorithms" in proc.stdout + proc.stderr
    return {"tmp": tmp, "shards": shards, "out": tmp / "first"}


@pytest.mark.slow
def test_two_runs_with_the_mode_are_bitwise_equal(reference):
    tmp = reference["tmp"]
    assert_ok(run_sft(_config(tmp, reference["shards"], "second"), nproc=2))
    assert_same_training(reference["out"], tmp / "second", STEPS)


@pytest.mark.slow
def test_a_run_killed_after_a_step_checkpoint_resumes_bitwise_equal(reference):
    tmp = reference["tmp"]
    cfg = _config(tmp, reference["shards"], "faulted", auto_resume=True, checkpoint_steps_for_auto_resume=EVERY)
    marker = tmp / "fault.marker"
    killed = run_sft(cfg, nproc=2, env={"MIROTRAIN_FAULT_AFTER_STEP": str(KILL_AFTER),
                                        "MIROTRAIN_FAULT_MARKER": str(marker)})
    assert killed.returncode != 0 and marker.exists(), killed.stderr[-3000:]
    resumed = run_sft(cfg, nproc=2)
    assert_ok(resumed)
    assert f"step_{EVERY}: step {EVERY}" in resumed.stdout + resumed.stderr
    assert_same_training(reference["out"], tmp / "faulted", STEPS)
