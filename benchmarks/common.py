"""Shared helpers for the GPU benchmarks: where the HF baseline scripts are, the matmul peak, MFU.

The baselines live in ../shared/baselines beside the checkout; on the GPU machine (which receives only
the repository) they travel as the git-ignored copy `.baselines/` (`cp -r ../shared/baselines .baselines`
and carry `.baselines`).
"""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def baseline_script(name: str) -> Path:
    """Path of an HF baseline script (e.g. ``hf_fsdp2.py``) from .baselines/ or ../shared/baselines/."""
    for folder in (ROOT / ".baselines", ROOT.parent / "shared" / "baselines"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"baseline {name} not found in .baselines/ or ../shared/baselines/")


def matmul_peak_tflops(n: int = 8192, iters: int = 20) -> float:
    """Measured bf16 matmul rate on this GPU (TFLOP/s): the MFU denominator."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (start.elapsed_time(end) / 1e3) / 1e12
