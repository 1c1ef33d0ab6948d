"""SFT engine on GPUs (never in CI): Liger vs chunked loss at real shapes; Qwen3-1.7B at 16K packed on 1 GPU and
Qwen3-8B at 16K on 4 GPUs train; async DCP with pinned staging resumes bit-identically on 2 GPUs.

    pytest -m gpu tests/gpu/test_sft_gpu.py -v
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "training"))

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _torchrun(config: Path, nproc: int, env: dict | None = None, timeout: int = 1200) -> subprocess.CompletedProcess:
    from ports import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "mirotrain", "sft", "--config", str(config)]
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # keep the wheels' dir
    return subprocess.run(cmd, env={**os.environ, "PYTHONPATH": python_path, **(env or {})}, cwd=str(REPO),
                          capture_output=True, text=True, timeout=timeout, start_new_session=True)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed")
def test_liger_equals_chunked_loss_on_real_shapes():
    from mirotrain.modules.loss import LigerLinearCrossEntropyLoss, LinearCrossEntropyLoss

    torch.manual_seed(0)
    tokens, dim, vocab = 16384, 4096, 151936
    hidden0 = (torch.randn(1, tokens, dim, device="cuda") * 0.5).bfloat16()
    weight0 = (torch.randn(vocab, dim, device="cuda") * 0.02).bfloat16()
    labels = torch.randint(0, vocab, (1, tokens))
    labels[torch.rand(1, tokens) < 0.4] = -100
    results = []
    for loss_fn in (LinearCrossEntropyLoss(), LigerLinearCrossEntropyLoss()):
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        loss_sum, count = loss_fn(hidden, weight, labels)
        loss_sum.backward()
        results.append((loss_sum.float(), count, hidden.grad.float(), weight.grad.float()))
    (l1, c1, h1, w1), (l2, c2, h2, w2) = results
    assert int(c1) == int(c2)
    assert abs(l1 - l2).item() <= 1e-4 * abs(l1).item()
    assert (h1 - h2).norm().item() <= 1e-2 * h1.norm().item()  # bf16 gradients: relative Frobenius error
    assert (w1 - w2).norm().item() <= 1e-2 * w1.norm().item()


@needs_cuda
def test_chunked_loss_bf16_matches_fp32_reference():
    from mirotrain.modules.loss import LinearCrossEntropyLoss

    torch.manual_seed(0)
    hidden = (torch.randn(4096, 2048, device="cuda") * 0.5).bfloat16()
    weight = (torch.randn(151936, 2048, device="cuda") * 0.02).bfloat16()
    labels = torch.randint(0, 151936, (4096,))
    loss_sum, _ = LinearCrossEntropyLoss(chunk_tokens=1024)(hidden, weight, labels)
    ref = torch.nn.functional.cross_entropy((hidden.float() @ weight.float().t()), labels.cuda(), reduction="sum")
    assert abs(loss_sum.item() - ref.item()) <= 1e-3 * ref.item()


def _gpu_run(tmp_path: Path, size: str, nproc: int, seq: int, steps: int, **extra) -> Path:
    import yaml

    from benchmarks.sft import base_config, parse_args, write_rows

    ns = parse_args(["--size", size, "--chunk", "4096", "--sp", str(extra.pop("sp", 1))])
    shard = write_rows(tmp_path / "shards", (nproc // ns.sp) * steps, seq, 4, 151936)
    cfg = base_config(ns, tmp_path, shard)
    cfg.update(log_every_n_steps=1, log_peak_memory_stats=True, **extra)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _ok(_torchrun(path, nproc))
    return tmp_path / "run"


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@needs_cuda
def test_qwen3_1_7b_16k_packed_on_one_gpu(tmp_path):
    out = _gpu_run(tmp_path, "1.7B", 1, 16384, 4)
    losses = _losses(out)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["mfu"] > 0 and metrics["peak_mem_alloc_gib"] < 78


@needs_cuda
@pytest.mark.skipif(_gpus() < 4, reason="needs 4 GPUs")
def test_qwen3_8b_16k_on_four_gpus(tmp_path):
    out = _gpu_run(tmp_path, "8B", 4, 16384, 3)
    assert all(math.isfinite(v) for v in _losses(out))
    assert (out / "hf" / "final" / "model.safetensors.index.json").is_file()


@needs_cuda
@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_async_pinned_checkpoint_resumes_bit_identically_on_gpus(tmp_path):
    """Pinned-memory staging (ReusedBufferStager) path: kill after step 6 (a save step, during the async write),
    restart: the resumed run follows the clean one."""
    from sft_helpers import read_metrics, read_weights, tiny_config, write_config, write_shards

    shards = write_shards(tmp_path / "shards", n_rows=24, seq_len=256, seed=0)
    runs = {}
    for name in ("clean", "faulted"):
        cfg = tiny_config(tmp_path / name, shards, device="cuda", dtype="bf16", auto_resume=True,
                          checkpoint_steps_for_auto_resume=3, seed=4, compile=False, cudnn_deterministic_mode=True)
        runs[name] = write_config(cfg, tmp_path / f"{name}.yaml")
    _ok(_torchrun(runs["clean"], 2))
    env = {"MIROTRAIN_FAULT_AFTER_STEP": "6", "MIROTRAIN_FAULT_MARKER": str(tmp_path / "marker")}
    assert _torchrun(runs["faulted"], 2, env).returncode != 0
    _ok(_torchrun(runs["faulted"], 2, env))
    a, b = read_metrics(tmp_path / "clean"), read_metrics(tmp_path / "faulted")
    assert sorted(a) == sorted(b)
    # cudnn_deterministic_mode makes GPU runs bitwise reproducible (mirotrain/training/determinism.py), also
    # across the pinned-staging async save and the resume
    assert all(a[s]["loss"] == b[s]["loss"] for s in a)
    wa, wb = read_weights(tmp_path / "clean" / "hf" / "final"), read_weights(tmp_path / "faulted" / "hf" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
