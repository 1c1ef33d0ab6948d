"""The CUDA caching allocator's setting for training processes: ``expandable_segments:True`` by default.

An out-of-memory error is raised against the bytes the allocator has *reserved*, not the bytes tensors hold.
With fixed-size segments the reserved peak of our runs ran 14-47% above the allocated one (2× H200,
docs/benchmarks.md), because the step's large, differently sized transients (the LM-head loss's logits, the
root's reduce-scatter buffer, the recomputed layer) each leave segments that smaller blocks then split.
Expandable segments map more memory into one segment instead of reserving a new one, so freed pages are
reused whatever their size and the reserved peak stays near the allocated one: what `mirotrain validate`
estimates (mirotrain/commands/estimate.py). benchmarks/long_context.py measured with it for the same reason.

PyTorch reads ``PYTORCH_CUDA_ALLOC_CONF`` when it first initialises CUDA, so `mirotrain sft` / `dpo` set it
before anything touches CUDA; a value the user set (any value, including an empty one) is kept as it is, and
so is the device-generic ``PYTORCH_ALLOC_CONF`` (torch >= 2.9) when the user set that one instead.
"""

from __future__ import annotations

import os
from typing import MutableMapping

ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"
GENERIC_ALLOC_CONF = "PYTORCH_ALLOC_CONF"
DEFAULT_ALLOC_CONF = "expandable_segments:True"


def alloc_conf_default(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Set ``PYTORCH_CUDA_ALLOC_CONF`` to ``expandable_segments:True`` in ``environ`` unless it is already
    there (or the device-generic ``PYTORCH_ALLOC_CONF`` is); return the value set, or None when the user's was
    kept."""
    if ALLOC_CONF in environ or GENERIC_ALLOC_CONF in environ:
        return None
    environ[ALLOC_CONF] = DEFAULT_ALLOC_CONF
    return DEFAULT_ALLOC_CONF
