from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from fleetllm.model.layers.cpu_kernels import CpuKernels


class RMSNorm(nn.Module):
    """Computed in float32 and cast back before the weight, as transformers does: F.rms_norm
    on a bf16/fp16 input computes in float32 and rounds once, bit-identical to the explicit
    x.float() ... .to(dtype) of transformers, in one call instead of seven. With the native
    CPU kernels (bf16 on CPU, `kernels` set by the model) the residual add and the norm are
    one call, rounded at the same points."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps
        self.kernels: CpuKernels | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and self.kernels.rows_ok(x):
            return self.kernels.add_rms_norm(x, None, self.weight, self.eps)[0]
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + delta), x + delta): the residual stream's add and the next norm, in one
        call where the kernels apply. delta None: (norm(x), x)."""
        k = self.kernels
        if k is not None and k.rows_ok(x) and (delta is None or k.rows_ok(delta)):
            return k.add_rms_norm(x, delta, self.weight, self.eps)
        if delta is not None:
            x = x + delta
        return self.forward(x), x
