"""Deterministic mode (``cudnn_deterministic_mode: true``): the same config, seed, world size and hardware give
bitwise-equal losses and weights, also when a run is killed and auto-resumed from a step checkpoint.

A seed fixes what is drawn, not the order in which a GPU adds numbers. What the mode pins, each a source of
run-to-run differences on GPUs otherwise:

- cuBLAS: ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, a fixed workspace per handle and stream, so a matmul's algorithm
  does not depend on what other streams (FSDP's collectives, the async checkpoint's copies) are doing.
  PyTorch reads it once, at the process's first matmul, and refuses cuBLAS calls under deterministic
  algorithms without it: it is set before the process group and the model exist.
- Deterministic algorithms, strictly (``torch.use_deterministic_algorithms(True)``, not ``warn_only``): flash
  attention's backward (SDPA's and ``varlen_attn``'s) accumulates dQ in a fixed order instead of with
  atomics, memory-efficient attention's backward uses one key split, SDPA stops choosing cuDNN attention, and
  the backward of ``index_select`` / ``index_add`` / ``scatter_add`` (the loss's token selection, the MoE routing
  counts) runs sorted kernels, also inside compiled graphs. An op without a deterministic kernel raises, naming
  itself, instead of making the run differ silently; with ``warn_only`` flash attention keeps its atomics.
- cuDNN: deterministic algorithms only, none chosen by benchmarking.
- Inductor (the compiled decoder layers): ``torch._inductor.config.deterministic`` (torch >= 2.9): no timing-based
  choice that changes numerics, so a reduction's block sizes are picked by rule, not by whichever config
  benchmarked fastest in this process.
- Attention and loss choices follow the mode: see :func:`mirotrain.modules.attention.single_document_kernel` and
  ``ModelSpec.from_config`` (mirotrain/training/builders.py), where the chunked loss runs eagerly.
- NCCL: NVLS (reduction inside the NVLink switch) is turned off; it is not deterministic from one call to the
  next. Ring and tree reductions are: NCCL picks algorithm, protocol and channels from the message size and the
  topology it detects, not from timings, so a fixed world size on the same machine type reduces in one order.

Deterministic whatever the mode: the data order (a permutation of seed + epoch, read without worker
processes), the random init (one seeded generator), the step checkpoint (every rank's RNG states and data
position, mirotrain/training/state.py), and there is no dropout.
"""

from __future__ import annotations

import os
from typing import MutableMapping

import torch

from mirotrain.config.loader import ConfigError

KEY = "cudnn_deterministic_mode"
# Each variable the mode needs, with the values that keep it deterministic (the first is the one it sets).
ENVIRONMENT: dict[str, tuple[str, ...]] = {
    "CUBLAS_WORKSPACE_CONFIG": (":4096:8", ":16:8"),  # the two PyTorch accepts as deterministic
    "NCCL_NVLS_ENABLE": ("0",),
}


def deterministic_environment(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set each variable of ``ENVIRONMENT`` in ``environ`` unless it already holds a deterministic value; return
    the values in force. A value that is not deterministic is the user's explicit choice and is refused."""
    for name, accepted in ENVIRONMENT.items():
        value = environ.get(name)
        if value is None:
            environ[name] = accepted[0]
        elif value not in accepted:
            raise ConfigError(KEY, f"needs {name} to be {' or '.join(accepted)}, but the environment sets "
                              f"{name}={value!r}: unset it (the mode sets {accepted[0]}) or train without the mode")
    return {name: environ[name] for name in ENVIRONMENT}


def enable_deterministic_mode(environ: MutableMapping[str, str] = os.environ) -> str:
    """Pin every source of run-to-run differences this module lists; call it before the process group, the model
    and the first CUDA matmul exist. Returns the line the run logs."""
    env = deterministic_environment(environ)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config, "deterministic"):
        inductor_config.deterministic = True
    settings = ", ".join(f"{name}={value}" for name, value in env.items())
    return (f"{KEY}: deterministic algorithms (an op without a deterministic kernel raises), {settings}, "
            "deterministic cuDNN and Inductor, flash attention instead of cuDNN attention, the chunked loss "
            "uncompiled (docs/training.md, 'Deterministic mode')")
