"""Point-to-point transfer of hidden states between pipeline stages, and the typed signal
for a broken collective."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from fleetllm.errors import WorkerCrashedError

F = TypeVar("F", bound=Callable[..., Any])


def collective(fn: F) -> F:
    """A collective or send/recv that fails means a peer is gone or the group is broken:
    raise it as WorkerCrashedError, which the executor treats as a crash of the group (a
    typed signal, instead of matching "gloo" or "NCCL" in error text)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, OSError) as e:  # c10d's DistError is a RuntimeError
            raise WorkerCrashedError(f"{fn.__name__} failed ({type(e).__name__}: {e}); a "
                                     "peer rank is gone or the process group is broken") from e

    return wrapper  # type: ignore[return-value]


@collective
def send_to_next_stage(pc: Any, hidden: torch.Tensor) -> None:
    # Each tensor rank talks to the same tensor rank of the next stage.
    dist.send(hidden.contiguous(), dst=pc.rank + pc.tp_size)


@collective
def recv_from_prev_stage(pc: Any, shape: tuple[int, ...], dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
    buf = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(buf, src=pc.rank - pc.tp_size)
    return buf
