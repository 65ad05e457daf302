"""Copying a request's tokens between the paged KV cache and contiguous tensors."""

from __future__ import annotations

import torch


def token_slots(block_ids: list[int], start: int, num_tokens: int, block_size: int,
                device: torch.device) -> torch.Tensor:
    """The cache slots of tokens [start, start + num_tokens) of a request."""
    pos = torch.arange(start, start + num_tokens)
    blocks = torch.tensor(block_ids, dtype=torch.int64)[pos // block_size]
    return (blocks * block_size + pos % block_size).to(device)


def gather_tokens(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[num_blocks, bs, kv_heads, d] -> [len(slots), kv_heads, d], on the CPU."""
    _, _, kvh, d = cache.shape
    return cache.view(-1, kvh, d).index_select(0, slots).cpu()


def scatter_tokens(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    _, _, kvh, d = cache.shape
    cache.view(-1, kvh, d).index_copy_(0, slots, values.to(cache.device, cache.dtype))


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
