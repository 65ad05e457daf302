"""Point-to-point transfer of hidden states between pipeline stages."""

from __future__ import annotations

import torch
import torch.distributed as dist

from fleetllm.distributed.parallel_state import ParallelContext


def send_to_next_stage(pc: ParallelContext, hidden: torch.Tensor) -> None:
    # Each tensor rank talks to the same tensor rank of the next stage.
    dist.send(hidden.contiguous(), dst=pc.rank + pc.tp_size)


def recv_from_prev_stage(pc: ParallelContext, shape: tuple[int, ...], dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
    buf = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(buf, src=pc.rank - pc.tp_size)
    return buf
