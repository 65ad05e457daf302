"""Paged attention over a [num_blocks, block_size, num_kv_heads, head_dim] K/V cache.

The batch is ordered decodes first (one query token per sequence), then prefill chunks.
Decodes use a batched matmul against K/V gathered through the block table (on CPU this is
much faster than scaled_dot_product_attention with one query); prefills use
scaled_dot_product_attention, causal without a mask when every chunk is fresh and equally
long. A GPU kernel can replace TorchAttentionBackend behind the same metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class PrefillMetadata:
    num_seqs: int
    max_query_len: int
    # Equal, fresh chunks: plain causal attention on the chunk itself.
    uniform: bool
    # Otherwise: padded [num_seqs * max_query_len] -> token index, and token -> padded index.
    pad_index: torch.Tensor | None = None
    unpad_index: torch.Tensor | None = None
    block_table: torch.Tensor | None = None
    bias: torch.Tensor | None = None  # [num_seqs, 1, max_query_len, max_kv_len], 0 or -inf


class DecodeStaging:
    """A contiguous copy of the decode batch's K/V, [batch, kv_heads, capacity, head_dim]
    per layer, kept across steps while the batch is unchanged: each step then appends one
    token per sequence instead of gathering every block again, and attention runs as one
    pair of batched matmuls. The paged cache stays the source of truth; the runner marks the
    copy stale (rebuild) whenever the batch changes."""

    def __init__(self) -> None:
        self.req_ids: tuple[str, ...] = ()
        self.lens = None  # tokens held per sequence after the current step
        self.capacity = 0
        self.rebuild = True
        self.positions: torch.Tensor | None = None  # where this step's token goes
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] slot of each new token's K/V
    num_decodes: int
    decode_block_table: torch.Tensor | None  # [num_decodes, max_blocks]
    decode_bias: torch.Tensor | None  # [num_decodes, 1, 1, max_kv_len], 0 or -inf
    prefill: PrefillMetadata | None
    staging: DecodeStaging | None = None
    # A KV connector (worker side): each layer waits for its loads, then saves its K/V.
    kv_connector: Any = None


def _gather(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[num_blocks, bs, kvh, d] gathered to [batch, kvh, max_blocks * bs, d]."""
    nb, bs, kvh, d = cache.shape
    b, m = block_table.shape
    out = cache.view(nb, -1).index_select(0, block_table.reshape(-1))
    return out.view(b, m * bs, kvh, d).transpose(1, 2)


class TorchAttentionBackend:
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 layer: int = 0) -> None:
        self.layer = layer
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D] -> [T, H * D]."""
        k_cache, v_cache = kv_cache
        nb, bs, kvh, d = k_cache.shape
        if meta.kv_connector is not None:
            meta.kv_connector.wait_for_layer_load(self.layer)
        k_cache.view(-1, kvh, d).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, kvh, d).index_copy_(0, meta.slot_mapping, v)
        if meta.kv_connector is not None:
            meta.kv_connector.save_kv_layer(self.layer, kv_cache)
        parts = []
        nd = meta.num_decodes
        if nd and meta.staging is not None:
            parts.append(self._decode_staged(q[:nd], k[:nd], v[:nd], k_cache, v_cache, meta))
        elif nd:
            parts.append(self._decode(q[:nd], k_cache, v_cache, meta))
        if meta.prefill is not None:
            parts.append(self._prefill(q[nd:], k[nd:], v[nd:], k_cache, v_cache, meta.prefill))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # One KV head at a time: gathering a head's strided slice lands keys in the layout
        # bmm wants, which saves a transposing copy of the whole gathered cache.
        b, g, d = q.shape[0], self.group, self.head_dim
        blocks = meta.decode_block_table.reshape(-1)
        qg = (q * self.scale).view(b, self.num_kv_heads, g, d)
        bias = meta.decode_bias.view(b, 1, -1)
        out = torch.empty(b, self.num_kv_heads, g, d, dtype=q.dtype, device=q.device)
        for h in range(self.num_kv_heads):
            keys = k_cache[:, :, h].index_select(0, blocks).view(b, -1, d)
            values = v_cache[:, :, h].index_select(0, blocks).view(b, -1, d)
            scores = torch.bmm(qg[:, h], keys.transpose(1, 2)).float() + bias
            torch.bmm(scores.softmax(dim=-1).to(q.dtype), values, out=out[:, h])
        return out.view(b, -1)

    def _decode_staged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor,
                       meta: AttentionMetadata) -> torch.Tensor:
        st = meta.staging
        b, kvh, g, d = q.shape[0], self.num_kv_heads, self.group, self.head_dim
        cap = st.capacity
        if st.rebuild:
            keys = torch.empty((b, kvh, cap, d), dtype=k_cache.dtype, device=k_cache.device)
            values = torch.empty_like(keys)
            gathered = meta.decode_block_table.shape[1] * k_cache.shape[1]
            for buf, cache in ((keys, k_cache), (values, v_cache)):
                buf[:, :, :gathered] = _gather(cache, meta.decode_block_table)
                buf[:, :, gathered:] = 0  # masked, but must be finite: 0 * NaN is NaN
            st.buffers[self.layer] = (keys, values)
        else:
            keys, values = st.buffers[self.layer]
            rows = torch.arange(b, device=q.device)
            keys[rows, :, st.positions] = k
            values[rows, :, st.positions] = v
        qg = (q * self.scale).view(b * kvh, g, d)
        scores = torch.bmm(qg, keys.view(b * kvh, cap, d).transpose(1, 2))
        probs = (scores.float().view(b, kvh, g, cap) + meta.decode_bias).softmax(dim=-1)
        out = torch.bmm(probs.to(q.dtype).view(b * kvh, g, cap), values.view(b * kvh, cap, d))
        return out.view(b, -1)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: PrefillMetadata) -> torch.Tensor:
        n, ql, h, d = meta.num_seqs, meta.max_query_len, self.num_heads, self.head_dim
        if meta.uniform:
            qs = q.view(n, ql, h, d).transpose(1, 2)
            ks = k.view(n, ql, self.num_kv_heads, d).transpose(1, 2)
            vs = v.view(n, ql, self.num_kv_heads, d).transpose(1, 2)
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale,
                                                 enable_gqa=self.group > 1)
            return out.transpose(1, 2).reshape(n * ql, h * d)
        qs = q.index_select(0, meta.pad_index).view(n, ql, h, d).transpose(1, 2)
        ks = _gather(k_cache, meta.block_table)
        vs = _gather(v_cache, meta.block_table)
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=meta.bias.to(q.dtype),
                                             scale=self.scale, enable_gqa=self.group > 1)
        out = out.transpose(1, 2).reshape(n * ql, h * d)
        return out.index_select(0, meta.unpad_index)
