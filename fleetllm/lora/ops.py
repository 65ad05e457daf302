"""The batched LoRA delta: the one seam a GPU kernel (Punica's sgmv/bgmv) would replace.

Each linear layer keeps the adapters of all slots stacked: A as [slots * width, in] and
B^T as [slots * width, out], where width = sub-projections x max_lora_rank and slot s owns
rows [s * width, (s + 1) * width) (zeros past its rank). Each token carries its slot (-1:
the base model). Two pure-torch strategies, neither looping over tokens or requests:

- dense (small batches, decode): shrink every token with the used slots' A at once, zero
  the columns of the slots a token does not use, expand with B: three ops per layer;
- segmented (the rest): tokens gathered in slot order once (one index_select), then per
  used slot a shrink and an expand of its contiguous rows, and one gather back: no wasted
  FLOPs, two ops per slot. (index_add_ would scatter instead, but on CPU in bfloat16 it is
  ~20x slower than these gathers.)

LoRAMapping.prepare picks one per step from the tokens, the slots used and the rank
(crossover measured with scripts/bench_lora_ops.py, see DENSE_MAX_WORK).
"""

from __future__ import annotations

import numpy as np
import torch

# Dense while tokens x used slots x max_lora_rank <= DENSE_MAX_WORK (decode batches: its
# few large ops beat the segmented strategy's many small ones, most of all when threads
# contend; in the engine, SmolLM-135M shapes in bfloat16 on 2 threads, 32 sequences over 4
# adapters of rank 16 spent 5.9 s in dense LoRA decode layers against 18.2 s segmented),
# or used slots x max_lora_rank <= DENSE_MAX_SLOT_RANK (its waste is small: one layer of
# 1024 tokens x 1 slot x rank 16, 2.5 vs 7.8 ms in bfloat16); else segmented (1024 x 4 x
# 64: 12 vs 28 ms in bfloat16, 17 vs 67 ms in float32). Rough figures from a shared 2-core
# machine; scripts/bench_lora_ops.py measures one layer.
DENSE_MAX_WORK = 256 * 4 * 16
DENSE_MAX_SLOT_RANK = 32


class LoRAMapping:
    """This step's per-token slots, as every LoRA layer of the model reads them."""

    def __init__(self) -> None:
        self.active = False
        self.dense = True
        self.num_slots = 0  # highest used slot + 1: the dense strategy's slot range
        self.onehot: torch.Tensor | None = None  # [tokens, num_slots], dense only
        # segmented: (slot, start, end) rows in slot order; the tokens' permutation into
        # that order and back (None: already in it); the leading rows of base-model tokens
        self.segments: list[tuple[int, int, int]] = []
        self.order: torch.Tensor | None = None
        self.inverse: torch.Tensor | None = None
        self.num_base = 0

    def prepare(self, token_slots: np.ndarray, dtype: torch.dtype, device: torch.device,
                max_rank: int, dense: bool | None = None) -> None:
        """dense: force a strategy (None: choose by DENSE_MAX_WORK, DENSE_MAX_SLOT_RANK)."""
        used = np.unique(token_slots[token_slots >= 0])
        self.active = used.size > 0
        self.onehot, self.segments, self.order, self.inverse = None, [], None, None
        if not self.active:
            return
        self.num_slots = int(used[-1]) + 1
        total = token_slots.shape[0]
        if dense is None:
            dense = (total * self.num_slots * max_rank <= DENSE_MAX_WORK
                     or self.num_slots * max_rank <= DENSE_MAX_SLOT_RANK)
        self.dense = dense
        if self.dense:
            slots = torch.from_numpy(token_slots).to(device)
            onehot = slots[:, None] == torch.arange(self.num_slots, device=device)[None, :]
            self.onehot = onehot.to(dtype)
            return
        order = np.argsort(token_slots, kind="stable")
        ranked = token_slots[order]
        if not np.array_equal(order, np.arange(total)):
            inverse = np.empty_like(order)
            inverse[order] = np.arange(total)
            self.order = torch.from_numpy(order).to(device)
            self.inverse = torch.from_numpy(inverse).to(device)
        self.num_base = int(np.searchsorted(ranked, 0))
        bounds = np.searchsorted(ranked, used, side="right")
        starts = np.searchsorted(ranked, used)
        self.segments = list(zip(used.tolist(), starts.tolist(), bounds.tolist()))

    def clear(self) -> None:
        self.active, self.onehot, self.segments = False, None, []
        self.order = self.inverse = None


def add_lora(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: list[torch.Tensor],
             columns: list[tuple[int, int]], rank: int, mapping: LoRAMapping) -> torch.Tensor:
    """out + (x @ A_s^T) @ B_s^T for each token's slot s (in place on out).

    a: [slots * parts * rank, in], slot-major then sub-projection (q, k, v or gate, up);
    b[j]: part j's B^T, [slots * rank, its columns], written to out's columns[j] =
    (offset, width): a fused layer's expand touches only each part's own columns."""
    if not mapping.active:
        return out
    parts, tokens = len(b), x.shape[0]
    width = parts * rank
    if mapping.dense:
        slots = mapping.num_slots
        h = x @ a[:slots * width].t()  # shrink: [tokens, slots * parts * rank]
        h = h.view(tokens, slots, parts, rank).mul_(mapping.onehot[:, :, None, None])
        if parts == 1:
            return out.addmm_(h.view(tokens, slots * rank), b[0][:slots * rank])
        for j, (offset, cols) in enumerate(columns):  # expand, part by part
            hj = h[:, :, j].reshape(tokens, slots * rank)
            out[:, offset:offset + cols].addmm_(hj, b[j][:slots * rank])
        return out
    xs = x if mapping.order is None else x.index_select(0, mapping.order)
    delta = out.new_zeros(out.shape) if parts > 1 or mapping.num_base else out.new_empty(
        out.shape)
    for slot, start, end in mapping.segments:
        h = xs[start:end] @ a[slot * width:(slot + 1) * width].t()
        for j, (offset, cols) in enumerate(columns):
            delta[start:end, offset:offset + cols] = (
                h[:, j * rank:(j + 1) * rank] @ b[j][slot * rank:(slot + 1) * rank])
    return out.add_(delta if mapping.inverse is None else delta.index_select(0, mapping.inverse))
