"""Which slice of the model this process holds, and the groups it talks to.

Passed explicitly to the model (no module-level globals), so several engines can live in
one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fleetllm.distributed.comm import collective


@dataclass
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: Any = None  # torch.distributed.ProcessGroup when tp_size > 1
    cpu_group: Any = None  # gloo group of all ranks (CPU-side agreement, e.g. memory)
    layer_partition: tuple[int, ...] = ()  # layers per pipeline stage; () for one stage

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """[start, end) of the layers this rank's pipeline stage holds."""
        if not self.layer_partition:
            return 0, num_layers
        start = sum(self.layer_partition[:self.pp_rank])
        return start, start + self.layer_partition[self.pp_rank]

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def is_first_pp_rank(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_rank(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def tp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return x
        _all_reduce(x, self.tp_group)
        return x

    def tp_all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        _all_gather(parts, x.contiguous(), self.tp_group)
        return torch.cat(parts, dim=dim)


@collective
def _all_reduce(x: torch.Tensor, group: Any) -> None:
    torch.distributed.all_reduce(x, group=group)


@collective
def _all_gather(parts: list[torch.Tensor], x: torch.Tensor, group: Any) -> None:
    torch.distributed.all_gather(parts, x, group=group)


def init_distributed(rank: int, tp_size: int, pp_size: int, init_method: str,
                     device: torch.device, timeout_s: float = 600.0,
                     layer_partition: tuple[int, ...] = ()) -> ParallelContext:
    """Joins the process group and builds this rank's TP group (ranks of one pipeline stage).

    Rank r is tensor rank r % tp and pipeline stage r // tp. Every rank creates every group
    in the same order, as torch.distributed requires.
    """
    import datetime

    import torch.distributed as dist

    world = tp_size * pp_size
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, world_size=world, rank=rank,
                                timeout=datetime.timedelta(seconds=timeout_s))
    tp_group = None
    for stage in range(pp_size):
        ranks = list(range(stage * tp_size, (stage + 1) * tp_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            tp_group = group
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return ParallelContext(rank % tp_size, tp_size, rank // tp_size, pp_size, tp_group,
                           cpu_group, layer_partition)


def destroy_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
