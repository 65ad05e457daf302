from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Computed in float32 and cast back before the weight, as transformers does: F.rms_norm
    on a bf16/fp16 input computes in float32 and rounds once, bit-identical to the explicit
    x.float() ... .to(dtype) of transformers, in one call instead of seven."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)
