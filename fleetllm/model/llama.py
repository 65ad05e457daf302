"""Llama-family decoder: Llama, Mistral, Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fleetllm.config import ModelConfig
from fleetllm.distributed.parallel_state import ParallelContext
from fleetllm.errors import ModelLoadError
from fleetllm.model.layers.attention import AttentionMetadata, TorchAttentionBackend
from fleetllm.model.layers.cpu_kernels import CpuKernels, SmallLinearKernels
from fleetllm.model.layers.linear import (
    ColumnParallelLinear,
    PackedMatmul,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    check_shape,
    read_all,
)
from fleetllm.model.layers.norm import RMSNorm
from fleetllm.model.layers.rotary import Rope, RotaryEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, pc: ParallelContext,
                 rotary: RotaryEmbedding, layer: int) -> None:
        super().__init__()
        d = cfg.head_dim
        self.num_heads = cfg.num_attention_heads // pc.tp_size
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, d, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, cfg.qkv_bias, dtype, pc)
        self.num_kv_heads = self.qkv_proj.local_kv_heads
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * d, cfg.hidden_size,
                                        cfg.o_bias, dtype, pc)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = rotary
        self.split = [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d]
        self.head_dim = d
        self.attn = TorchAttentionBackend(self.num_heads, self.num_kv_heads, d, d**-0.5, layer)

    def forward(self, rope: Rope, x: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        t, h, kvh, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        v = qkv[:, self.split[0] + self.split[1]:].view(t, kvh, d)
        if self.q_norm is None:  # q and k heads rotated together, in one pass
            qk = self.rotary.rotate(rope, qkv[:, : self.split[0] + self.split[1]].view(t, h + kvh, d))
            q, k = qk[:, :h], qk[:, h:]
        else:
            q, k, _ = qkv.split(self.split, dim=-1)
            q = self.rotary.rotate(rope, self.q_norm(q.view(t, h, d)))
            k = self.rotary.rotate(rope, self.k_norm(k.view(t, kvh, d)))
        return self.o_proj(self.attn.forward(q, k, v, kv_cache, meta))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, pc: ParallelContext) -> None:
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [inter, inter], cfg.mlp_bias,
                                                 dtype, pc)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, cfg.mlp_bias, dtype, pc)
        self.local = inter // pc.tp_size
        self.kernels: CpuKernels | None = None  # the native SiLU-and-mul, set by the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.kernels is not None and self.kernels.rows_ok(gate_up):
            return self.down_proj(self.kernels.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.local, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, pc: ParallelContext,
                 rotary: RotaryEmbedding, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, dtype, pc, rotary, layer)
        self.mlp = MLP(cfg, dtype, pc)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, rope: Rope, h: torch.Tensor, delta: torch.Tensor | None,
                kv_cache: KVCache, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """h: the residual stream, and delta: the previous layer's output not yet added to
        it (None at the first layer) -> (the stream, this layer's output). Each add happens
        inside the norm that follows it, one call with the CPU kernels; the sums are the
        same bf16 additions in the same order either way."""
        x, h = self.input_layernorm.add_forward(h, delta)
        x, h = self.post_attention_layernorm.add_forward(h, self.self_attn(rope, x, kv_cache,
                                                                           meta))
        return h, self.mlp(x)


# checkpoint name piece -> (our parameter name piece, shard index)
_STACKED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, pc: ParallelContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.pc = pc
        self.dtype = dtype
        self.start_layer, self.end_layer = pc.layer_range(cfg.num_hidden_layers)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_model_len, cfg.rope_theta,
                                 cfg.rope_scaling, dtype)
        self.rotary = rotary
        if pc.is_first_pp_rank:
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, pc)
        self.layers = nn.ModuleDict({
            str(i): DecoderLayer(cfg, dtype, pc, rotary, i)
            for i in range(self.start_layer, self.end_layer)
        })
        if pc.is_last_pp_rank:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype, pc)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.data = module.weight.data.to(dtype)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                kv_caches: dict[int, KVCache], meta: AttentionMetadata,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed_tokens(input_ids) if hidden is None else hidden
        rope = self.rotary.cos_sin(positions)
        delta = None
        for i, layer in self.layers.items():
            h, delta = layer(rope, h, delta, kv_caches[int(i)], meta)
        if self.pc.is_last_pp_rank:
            return self.norm.add_forward(h, delta)[0]
        return h if delta is None else h + delta

    def use_cpu_kernels(self, kernels: CpuKernels | None,
                        linear: SmallLinearKernels | None = None) -> None:
        """Routes the norms, the SiLU-and-mul, the rotary embedding, the K/V writes and the
        small linear layers' decode-batch products through the native CPU kernels (bf16 on CPU;
        None: torch's and oneDNN's ops). linear: another small-linear kernel (the AVX2 build,
        where `kernels` is None); None takes kernels'."""
        linear = kernels if linear is None else linear
        for module in self.modules():
            if isinstance(module, (RMSNorm, MLP, RotaryEmbedding)):
                module.kernels = kernels
            elif isinstance(module, PackedMatmul):
                module.use_small_linear(linear)
            elif isinstance(module, Attention):
                module.attn.kernels = kernels

    def use_float32_matmuls(self, on: bool) -> None:
        """Tells attention that 16-bit matmuls are slow here (the linear layers hold float32
        copies): decode then runs through SDPA at every batch size."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.attn.sdpa_decode = on

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def _target(self, name: str) -> tuple[str, int] | None:
        """Maps a checkpoint tensor name to (our parameter name, shard), None to skip it."""
        if name.startswith("model."):
            name = name[len("model."):]
        if name.startswith("layers."):
            idx = int(name.split(".")[1])
            if not self.start_layer <= idx < self.end_layer:
                return None
        elif name.startswith("embed_tokens."):
            if not self.pc.is_first_pp_rank:
                return None
        elif name.startswith(("norm.", "lm_head.")):
            if not self.pc.is_last_pp_rank:
                return None
        else:
            return None  # rotary_emb.inv_freq and other buffers
        for piece, (ours, shard) in _STACKED.items():
            if f".{piece}." in name:
                return name.replace(piece, ours), shard
        return name, 0

    def load_weights(self, weights: Iterable[tuple[str, Any]], source: str) -> None:
        params = dict(self.named_parameters())
        loaded: set[tuple[str, int]] = set()
        tied = self.cfg.tie_word_embeddings and self.pc.is_last_pp_rank
        for ckpt_name, tensor in weights:
            target = self._target(ckpt_name)
            if target is None:
                continue
            name, shard = target
            names = [name]
            if tied and name == "embed_tokens.weight":
                names.append("lm_head.weight")
            for n in names:
                param = params.get(n)
                if param is None:
                    if n == "embed_tokens.weight":
                        continue  # tied embeddings on a stage that only has the head
                    raise ModelLoadError(f"{source}: unexpected tensor {ckpt_name!r}")
                owner = self.get_submodule(n.rsplit(".", 1)[0])
                with torch.no_grad():
                    if hasattr(owner, "weight_loader"):
                        owner.weight_loader(param, tensor, ckpt_name, shard)
                    else:
                        check_shape(ckpt_name, tensor, tuple(param.shape))
                        param.data.copy_(read_all(tensor))
                loaded.add((n, shard))
        missing = []
        for n in params:
            for piece, (ours, shard) in _STACKED.items():
                if ours in n and (n, shard) not in loaded:
                    missing.append("model." + n.replace(ours, piece))
            if not any(ours in n for ours, _ in _STACKED.values()) and (n, 0) not in loaded:
                missing.append(n if n.startswith("lm_head") else "model." + n)
        if missing:
            raise ModelLoadError(
                f"{source}: the checkpoint lacks {len(missing)} tensor(s) the config needs, "
                f"e.g. {', '.join(missing[:3])}"
            )
