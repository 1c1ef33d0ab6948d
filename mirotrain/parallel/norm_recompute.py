"""Eager decoder layers recompute their RMSNorms in backward, applied from outside the model.

An eager RMSNorm keeps an fp32 copy of its input and its normalised output for backward (``modules/norms.py``
upcasts to normalise in fp32): 6 bytes per element in bf16 for the two D-wide norms and the per-head q and k
norms of every layer, more than a third of what an eager Qwen3-32B layer saves. Run under a non-reentrant
checkpoint, a norm keeps only its input, which its caller keeps anyway, and redoes its few elementwise ops in
backward, bit for bit the same. Compiled layers need none of this: Inductor's partitioner already recomputes
such ops (``commands/step_memory.py`` counts both cases).
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from mirotrain.modules.norms import RMSNorm


def apply_norm_recompute(model: nn.Module) -> None:
    """Checkpoint every RMSNorm inside the decoder layers (not the final norm: its output feeds the loss
    directly, which keeps it); ``forward`` is replaced in place, so FQNs and state dicts are unchanged."""
    for layer in model.layers:
        for norm in layer.modules():
            if isinstance(norm, RMSNorm):
                # a norm draws no random numbers: no RNG state to save and restore around its recompute
                norm.forward = functools.partial(checkpoint, norm.forward, use_reentrant=False,
                                                 preserve_rng_state=False)
