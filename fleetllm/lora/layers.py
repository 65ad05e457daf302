"""LoRA on fleetllm's tensor-parallel linear layers: each rank holds its shard of every slot.

Column-parallel layers (qkv_proj, gate_up_proj) split their output: B is split like the
weight's rows, A is whole. Row-parallel layers (o_proj, down_proj) split their input: A is
split like the weight's columns, B is whole, and the delta joins the partial sum before the
layer's all-reduce. A fused layer stacks its sub-projections (q, k, v or gate, up) side by
side in A's rank dimension, and puts each one's B on its own output columns.
"""

from __future__ import annotations

import torch
from torch import nn

from fleetllm.lora.ops import LoRAMapping, add_lora
from fleetllm.model.layers.linear import ColumnParallelLinear, RowParallelLinear

# fleetllm's layer (in a decoder layer) -> the PEFT projections it fuses, in output order.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "self_attn.o_proj": ("o_proj",),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"),
    "mlp.down_proj": ("down_proj",),
}


class LoRALinear:
    """The stacked adapters of one linear layer; called by the layer as lora(x, out)."""

    def __init__(self, base: nn.Module, subs: tuple[str, ...], max_loras: int, max_rank: int,
                 mapping: LoRAMapping) -> None:
        self.subs = subs
        self.max_rank = max_rank
        self.width = len(subs) * max_rank
        self.mapping = mapping
        weight = base.weight
        out_local, in_local = weight.shape
        rank = base.pc.tp_rank
        if isinstance(base, ColumnParallelLinear):
            # (output offset here, rows here, where this rank's rows start in the full B)
            self.out_parts = [(sum(base.local_sizes[:j]), base.local_sizes[j],
                               base._shard_start(j)) for j in range(len(subs))]
            self.in_part = (0, in_local)
        elif isinstance(base, RowParallelLinear):
            self.out_parts = [(0, out_local, 0)]
            self.in_part = (in_local * rank, in_local)
        else:
            raise TypeError(f"LoRA supports column- and row-parallel linears, not {base}")
        size = max_loras * self.width
        self.a = torch.zeros(size, in_local, dtype=weight.dtype, device=weight.device)
        # B^T per sub-projection, [max_loras * max_rank, its output columns]: the expand of a
        # fused layer (qkv, gate_up) then skips the other parts' zeros.
        self.b = [torch.zeros(max_loras * max_rank, rows, dtype=weight.dtype,
                              device=weight.device) for _, rows, _ in self.out_parts]
        self.columns = [(offset, rows) for offset, rows, _ in self.out_parts]

    def set_slot(self, slot: int,
                 weights: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """Writes one adapter (per sub-projection: A [r, in], B [out, r], full size, scaled)
        into a slot, keeping this rank's shard."""
        base_row = slot * self.width
        b_row = slot * self.max_rank
        self.a[base_row:base_row + self.width].zero_()
        for b_part in self.b:
            b_part[b_row:b_row + self.max_rank].zero_()
        in_start, in_size = self.in_part
        for j, (pair, (_, rows, start)) in enumerate(zip(weights, self.out_parts)):
            if pair is None:
                continue
            a, b = pair
            r = a.shape[0]
            lo = base_row + j * self.max_rank
            self.a[lo:lo + r].copy_(a[:, in_start:in_start + in_size])
            self.b[j][b_row:b_row + r].copy_(b[start:start + rows].t())

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return add_lora(out, x, self.a, self.b, self.columns, self.max_rank, self.mapping)


def attach_lora(model: nn.Module, max_loras: int, max_rank: int,
                mapping: LoRAMapping) -> dict[int, list[LoRALinear]]:
    """Hooks a LoRALinear into every target layer of this stage, by decoder layer index."""
    hooked: dict[int, list[LoRALinear]] = {}
    for index, layer in model.layers.items():
        hooked[int(index)] = []
        for path, subs in LORA_TARGETS.items():
            linear = layer.get_submodule(path)
            linear.lora = LoRALinear(linear, subs, max_loras, max_rank, mapping)
            hooked[int(index)].append(linear.lora)
    return hooked
