"""Rotary position embedding with default, linear and llama3 frequency scaling."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from fleetllm.model.layers.cpu_kernels import CpuKernels


def inv_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths scaled by factor, short ones kept, a smooth ramp between.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


Rope = tuple[torch.Tensor, torch.Tensor]  # cos, signed sin: [T, 1, head_dim] each


class RotaryEmbedding(nn.Module):
    """x * cos + rotate_half(x) * sin, as transformers computes it, in fewer ops: the sign of
    rotate_half lives in a signed sin table (-sin on the first half), so rotate_half(x) * sin
    is x.roll(half) * signed_sin, which rounds identically. The tables are gathered once per
    forward (cos_sin) and shared by every layer. With the native CPU kernels (`kernels`, set by
    the model) the rotation is one call, in place, rounded at the same points."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None, dtype: torch.dtype) -> None:
        super().__init__()
        inv_freq = inv_frequencies(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.half = head_dim // 2
        self.kernels: CpuKernels | None = None
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("signed_sin", torch.cat((-freqs.sin(), freqs.sin()), dim=-1
                                                     ).to(dtype), persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> Rope:
        return (self.cos.index_select(0, positions).unsqueeze(1),
                self.signed_sin.index_select(0, positions).unsqueeze(1))

    def rotate(self, rope: Rope, x: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim] (q and k heads together, or either) -> rotated. x may be
        rotated in place (the kernel does): pass a tensor nothing else reads afterwards."""
        cos, sin = rope
        k = self.kernels
        if k is not None and k.rotate_ok(x, cos):
            return k.rotate_(x, cos, sin)
        return x * cos + x.roll(self.half, -1) * sin
