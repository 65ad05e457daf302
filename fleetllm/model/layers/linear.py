"""Linear layers split across tensor-parallel ranks; each rank loads only its shard.

Weight loaders take either a torch.Tensor or a lazy safetensors slice, check the
checkpoint's shape against the config, and copy the rank's part into place.

On CPU, `pack_linear_weights` then moves every weight into oneDNN's blocked layout, once:
F.linear on a plain bf16 weight reorders it on every call, which costs 1.3-1.5x at every
batch size and 3-4x for the LM head at batch 1 (docs/performance.md). The results are
bit-identical, as the same kernel runs.

Where oneDNN cannot take bf16 (a CPU without AVX-512 or AVX-NE-CONVERT, such as AMD's Zen 3),
torch's bf16 and fp16 linear falls back to a kernel that runs at ~10 GFLOP/s at every batch
size: 8x slower than float32 at 64 rows and 1.5x at one row. There the weights are held as
float32 instead (`PackedMatmul.upcast`, in oneDNN's float32 layout): the input is widened and
the output rounded back to its dtype, so the same exact products are summed in float32, in
another order. Decode batches of up to 8 rows use the AVX2 small-linear kernel on a bf16
blocked copy instead (cpu_kernels.Avx2SmallLinear), which reads half the bytes. That takes
twice the weights' memory, so it is done only while the copies fit (`pack_linear_weights`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fleetllm.distributed.parallel_state import ParallelContext
from fleetllm.errors import ModelLoadError

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from fleetllm.model.layers.cpu_kernels import SmallLinearKernels


def full_shape(loaded: Any) -> tuple[int, ...]:
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def narrow(loaded: Any, dim: int, start: int, size: int) -> torch.Tensor:
    """Reads loaded[start:start+size] along dim, without reading the rest of a lazy slice."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, size)
    index = [slice(None)] * len(full_shape(loaded))
    index[dim] = slice(start, start + size)
    return loaded[tuple(index)]


def read_all(loaded: Any) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def check_shape(name: str, loaded: Any, expected: tuple[int, ...]) -> None:
    got = full_shape(loaded)
    if got != expected:
        raise ModelLoadError(
            f"tensor {name!r} has shape {list(got)} but the config implies {list(expected)}; "
            "the checkpoint does not match its config.json"
        )


# fp32 packs too, and runs 2x faster, but rounds differently from the unpacked kernel;
# float16 needs avx512_fp16.
PACKED_DTYPES = (torch.bfloat16,)
# 16-bit weights held as float32 where oneDNN cannot pack them (see the module docstring).
UPCAST_DTYPES = (torch.bfloat16, torch.float16)
# The float32 copies may take at most this share of the memory available when they are made;
# the rest stays for the KV cache and the activations.
UPCAST_MAX_MEMORY_FRACTION = 0.5


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked layout of a [out, in] CPU weight; None where oneDNN cannot take it
    (another device or dtype, a CPU without the instructions, a build without oneDNN)."""
    if (weight.device.type != "cpu" or weight.dtype not in PACKED_DTYPES
            or not torch.backends.mkldnn.is_available() or weight.numel() == 0):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    except (RuntimeError, AttributeError):
        return None


class PackedMatmul:
    """x @ weight.T (+ bias) from the plain weight, or from its packed copy once packed (its
    float32 copy where oneDNN cannot pack a 16-bit weight), when the plain weight's storage
    is freed (weight keeps its dtype, with no elements). With the
    native CPU kernels (`use_small_linear`), a small weight also keeps a blocked copy that
    serves decode batches (CpuKernels.small_rows) without oneDNN's per-call cost."""

    weight: nn.Parameter
    packed: torch.Tensor | None = None
    upcast: torch.Tensor | None = None  # the float32 copy, where oneDNN cannot pack
    kernels: SmallLinearKernels | None = None
    blocked: torch.Tensor | None = None

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        k = self.kernels
        if k is not None and k.small_rows_ok(x):
            return k.small_linear(x, self.blocked, bias)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
        if self.upcast is not None:
            wide = None if bias is None else bias.float()
            if self.upcast.is_mkldnn:
                return torch.ops.mkldnn._linear_pointwise(x.float(), self.upcast, wide, "none",
                                                          [], "").to(x.dtype)
            return F.linear(x.float(), self.upcast, wide).to(x.dtype)
        return F.linear(x, self.weight, bias)

    def pack(self) -> bool:
        packed = pack_weight(self.weight)
        if packed is None:
            return False
        self.packed = packed
        self._free_plain()
        return True

    def needs_upcast(self) -> bool:
        """A 16-bit CPU weight that oneDNN did not pack: torch's own kernel would run it."""
        w = self.weight
        return (self.packed is None and self.upcast is None and w.device.type == "cpu"
                and w.dtype in UPCAST_DTYPES and w.numel() > 0)

    def hold_as_float32(self) -> None:
        """Holds the weight as float32 (exact), in oneDNN's layout where it takes float32
        (1.2-4x torch's float32 GEMM at 4-64 rows on AVX2), and frees the 16-bit copy."""
        wide = self.weight.detach().float()
        try:
            self.upcast = torch.ops.mkldnn._reorder_linear_weight(wide, None)
        except (RuntimeError, AttributeError):
            self.upcast = wide
        self._free_plain()

    def _free_plain(self) -> None:
        self.weight.data = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)

    def holds_copy(self) -> bool:
        """Whether the weight lives in a packed or float32 copy (the parameter is empty)."""
        return self.packed is not None or self.upcast is not None

    def dense_weight(self) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.to_dense()
        if self.upcast is not None:
            wide = self.upcast.to_dense() if self.upcast.is_mkldnn else self.upcast
            return wide.to(self.weight.dtype)
        return self.weight.data

    def use_small_linear(self, kernels: SmallLinearKernels | None) -> bool:
        """Serves decode batches with the native kernel from a blocked copy of the weight, where
        the kernel takes this weight (bf16, up to SMALL_LINEAR_MAX_BYTES); None drops the
        copy. -> whether the kernel serves this layer now."""
        self.kernels = self.blocked = None
        held = self.packed if self.packed is not None else self.weight
        if kernels is None or not kernels.takes_weight(held):
            return False
        # Cheapest from the plain weight: the model turns the kernels on before packing.
        self.kernels, self.blocked = kernels, kernels.block_weight(self.dense_weight())
        return True


def pack_linear_weights(model: nn.Module, available_bytes: int | None = None) -> int:
    """Packs every linear weight of model that oneDNN takes, and holds the 16-bit ones it
    cannot take as float32, if their copies fit in UPCAST_MAX_MEMORY_FRACTION of
    available_bytes (None: the memory available now); returns how many it packed or widened.
    Call it after loading (and after attaching LoRA, which reads the weights' shapes)."""
    layers = [m for m in model.modules() if isinstance(m, PackedMatmul)]
    done = sum(m.pack() for m in layers)
    wide = [m for m in layers if m.needs_upcast()]
    if not wide:
        return done
    need = sum(2 * m.weight.numel() * m.weight.element_size() for m in wide)
    if available_bytes is None:
        import psutil

        available_bytes = psutil.virtual_memory().available
    if need > UPCAST_MAX_MEMORY_FRACTION * available_bytes:
        logger.warning(
            "oneDNN cannot pack %s weights on this CPU, and their float32 copies (%.1f GB) "
            "do not fit in half the %.1f GB available, so torch's %s kernel runs them "
            "(several times slower); free memory, or load the model in float32",
            wide[0].weight.dtype, need / 1e9, available_bytes / 1e9, wide[0].weight.dtype)
        return done
    for m in wide:
        m.hold_as_float32()
    logger.info("holding %d %s linear weights as float32 (%.1f GB): oneDNN cannot pack them "
                "on this CPU", len(wide), wide[0].weight.dtype, need / 1e9)
    return done + len(wide)


def drop_packed_weights(model: nn.Module) -> None:
    """Frees the packed, float32 and blocked copies (sleep level 2: the weights are reloaded
    on wake-up)."""
    for m in model.modules():
        if isinstance(m, PackedMatmul):
            m.packed = m.upcast = m.blocked = m.kernels = None


def weights_as_held(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, dense tensor) of every parameter, packed and float32 weights included (in the
    parameter's own dtype)."""
    held = {f"{name}.weight" if name else "weight": m for name, m in model.named_modules()
            if isinstance(m, PackedMatmul) and m.holds_copy()}
    for name, param in model.named_parameters():
        yield name, held[name].dense_weight() if name in held else param.data


def weight_bytes_held(model: nn.Module) -> int:
    """The memory the weights take as held: each one once (float32 copies at their own size),
    plus the small-batch kernel's blocked copies."""
    dense = sum(t.numel() * t.element_size() for _, t in weights_as_held(model))
    extra = 0
    for m in model.modules():
        if isinstance(m, PackedMatmul):
            if m.blocked is not None:
                extra += m.blocked.numel() * m.blocked.element_size()
            if m.upcast is not None:  # counted above at the 16-bit size
                extra += m.upcast.numel() * (m.upcast.element_size() - m.weight.element_size())
    return dense + extra


class _Linear(PackedMatmul, nn.Module):
    # A LoRA hook (fleetllm.lora.layers.LoRALinear): lora(x, out) adds the adapters' delta
    # to this rank's output, before any all-reduce. A plain attribute, not a submodule, so
    # parameter names and state dicts stay those of the base model.
    lora: Any = None

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x, self.bias)
        return out if self.lora is None else self.lora(x, out)


class ColumnParallelLinear(_Linear):
    """Output features split across ranks; shards are listed in output_sizes (global sizes)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool,
                 dtype: torch.dtype, pc: ParallelContext) -> None:
        self.pc = pc
        self.output_sizes = output_sizes
        self.local_sizes = [self._local(s, i) for i, s in enumerate(output_sizes)]
        super().__init__(in_features, sum(self.local_sizes), bias, dtype)

    def _local(self, size: int, shard: int) -> int:
        return size // self.pc.tp_size

    def _shard_start(self, shard: int) -> int:
        """Where this rank's part starts inside the checkpoint tensor of one shard."""
        return self.local_sizes[shard] * self.pc.tp_rank

    def weight_loader(self, param: nn.Parameter, loaded: Any, name: str, shard: int = 0) -> None:
        is_weight = param.dim() == 2
        expected = (self.output_sizes[shard], param.shape[1]) if is_weight else (
            self.output_sizes[shard],)
        check_shape(name, loaded, expected)
        offset = sum(self.local_sizes[:shard])
        size = self.local_sizes[shard]
        param.data[offset:offset + size].copy_(narrow(loaded, 0, self._shard_start(shard), size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v heads split across ranks; KV heads replicated when tp > num_kv_heads."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool, dtype: torch.dtype, pc: ParallelContext) -> None:
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.local_kv_heads = max(1, num_kv_heads // pc.tp_size)
        super().__init__(hidden, [num_heads * head_dim, num_kv_heads * head_dim,
                                  num_kv_heads * head_dim], bias, dtype, pc)

    def _local(self, size: int, shard: int) -> int:
        return size // self.pc.tp_size if shard == 0 else self.local_kv_heads * self.head_dim

    def _shard_start(self, shard: int) -> int:
        if shard == 0:
            return super()._shard_start(shard)
        kv_head = self.pc.tp_rank * self.num_kv_heads // self.pc.tp_size
        return kv_head * self.head_dim


class RowParallelLinear(_Linear):
    """Input features split across ranks; partial sums all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 pc: ParallelContext) -> None:
        self.pc = pc
        self.in_features = in_features
        super().__init__(in_features // pc.tp_size, out_features, bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = self.matmul(x)
        if self.lora is not None:
            partial = self.lora(x, partial)
        out = self.pc.tp_all_reduce(partial)
        return out if self.bias is None else out + self.bias

    def weight_loader(self, param: nn.Parameter, loaded: Any, name: str, shard: int = 0) -> None:
        if param.dim() == 1:
            check_shape(name, loaded, tuple(param.shape))
            param.data.copy_(read_all(loaded))
            return
        check_shape(name, loaded, (param.shape[0], self.in_features))
        size = param.shape[1]
        param.data.copy_(narrow(loaded, 1, size * self.pc.tp_rank, size))


class VocabParallelEmbedding(nn.Module):
    """Vocabulary rows split across ranks (padded to a multiple of tp)."""

    def __init__(self, vocab_size: int, hidden: int, dtype: torch.dtype,
                 pc: ParallelContext) -> None:
        super().__init__()
        self.pc = pc
        self.vocab_size = vocab_size
        self.hidden = hidden
        self.per_rank = -(-vocab_size // pc.tp_size)
        self.start = self.per_rank * pc.tp_rank
        self.end = min(self.start + self.per_rank, vocab_size)
        self.weight = nn.Parameter(torch.zeros(self.per_rank, hidden, dtype=dtype),
                                   requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: Any, name: str, shard: int = 0) -> None:
        check_shape(name, loaded, (self.vocab_size, self.hidden))
        n = self.end - self.start
        param.data[:n].copy_(narrow(loaded, 0, self.start, n))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.pc.tp_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.end)
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return self.pc.tp_all_reduce(out)


class ParallelLMHead(PackedMatmul, VocabParallelEmbedding):
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.matmul(hidden)
        if self.pc.tp_size > 1:
            logits = self.pc.tp_all_gather(logits, dim=-1)
        return logits[:, : self.vocab_size].float()
