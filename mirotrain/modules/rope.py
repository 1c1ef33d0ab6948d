"""Rotary position embeddings: Qwen3's default RoPE and YaRN.

cos/sin are computed from the position ids on every forward instead of being read from a cache, so
there is no maximum length to overflow and nothing to re-initialise after meta-device construction.
YaRN follows the YaRN paper (arXiv:2309.00071) with the conventions of the HF Qwen3 checkpoints, so that
``inv_freq`` and the attention factor are bit-identical to what transformers computes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

YARN_KEYS = {
    "rope_type", "type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
    "attention_factor", "mscale", "mscale_all_dim", "partial_rotary_factor", "truncate",
}


def validate_yarn(rope_scaling: dict[str, Any], max_position_embeddings: int | None) -> None:
    """Reject yarn settings that would silently give a different model than the user asked for."""
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_scaling must be a mapping, got {type(rope_scaling).__name__}")
    unknown = set(rope_scaling) - YARN_KEYS
    if unknown:
        raise ValueError(f"rope_scaling: unknown keys {sorted(unknown)}; allowed: {sorted(YARN_KEYS - {'type'})}")
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if rope_type is None:
        raise KeyError("rope_scaling.rope_type is required (only 'yarn' is supported)")
    if rope_type != "yarn":
        raise ValueError(f"rope_scaling.rope_type must be 'yarn', got {rope_type!r}")
    for key in ("factor", "original_max_position_embeddings"):
        if rope_scaling.get(key) is None:
            raise KeyError(f"rope_scaling.{key} is required for yarn")
    if max_position_embeddings is None:
        raise KeyError("max_position_embeddings is required with yarn rope_scaling")
    expected = int(rope_scaling["original_max_position_embeddings"] * rope_scaling["factor"])
    if int(max_position_embeddings) != expected:
        raise ValueError(
            f"max_position_embeddings ({max_position_embeddings}) must equal "
            f"original_max_position_embeddings × factor = {expected}"
        )


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim
    return 1.0 / (theta ** exponents)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(head_dim: int, theta: float, rope_scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN frequencies: original frequencies for fast-rotating dims, /factor for slow ones, a linear
    ramp in between; plus the attention factor that rescales cos and sin (and so q·k)."""
    dim = int(head_dim * rope_scaling.get("partial_rotary_factor", 1.0))
    factor = float(rope_scaling["factor"])
    original = rope_scaling["original_max_position_embeddings"]
    attention_factor = rope_scaling.get("attention_factor")
    mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = rope_scaling.get("beta_fast") or 32
    beta_slow = rope_scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength completes `rotations` turns over the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) of shape [B, T, head_dim] for given position ids."""

    def __init__(self, head_dim: int, theta: float, rope_scaling: dict[str, Any] | None = None):
        super().__init__()
        self.head_dim, self.theta, self.rope_scaling = head_dim, theta, rope_scaling
        self.attention_scaling = 1.0
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)compute ``inv_freq``; called after meta-device construction once the module is on a device."""
        if self.rope_scaling:
            inv_freq, self.attention_scaling = yarn_inv_freq(self.head_dim, self.theta, self.rope_scaling)
        else:
            inv_freq = default_inv_freq(self.head_dim, self.theta)
        # assigned, not copied in: a buffer a dtype cast left in bf16 gets its fp32 back
        self.inv_freq = inv_freq if self.inv_freq.is_meta else inv_freq.to(self.inv_freq.device)

    def _apply(self, fn, recurse: bool = True):
        """Device moves apply; dtype casts do not. ``model.to(torch.bfloat16)`` (``from_pretrained(dtype=...)``)
        would otherwise round ``inv_freq`` to 8 significant bits (relative error up to 2^-9), and the angle
        error grows with the position: 0.8058 becomes 0.8047, 4.5 rad off at position 4096. transformers
        keeps its frequencies in fp32; ``forward`` computes the angles in fp32 from them."""
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and not self.inv_freq.is_meta:
            self.reset_parameters()
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [B, T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos/sin: [B, T, D]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin
