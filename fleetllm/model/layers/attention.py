"""Paged attention over a [num_blocks, block_size, num_kv_heads, head_dim] K/V cache.

The batch is ordered decodes first (one query token per sequence), then prefill chunks.
Decodes use a batched matmul against K/V gathered through the block table (on CPU this is
much faster than scaled_dot_product_attention with one query). Prefills never build a mask:
equal fresh chunks run as one causal scaled_dot_product_attention; otherwise each chunk runs
on its own, causal over its own tokens, and a chunk that continues earlier tokens (chunked
prefill, a prefix-cache hit) also attends, unmasked, to those tokens' K/V read from the
cache, the two results merged by their log-sum-exps. Only a sliding window that cuts into
a chunk's context uses a padded batch with a mask. A GPU kernel can replace
TorchAttentionBackend behind the same metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fleetllm.model.layers.cpu_kernels import CpuKernels, DecodeRanges


@dataclass
class PrefillMetadata:
    num_seqs: int
    max_query_len: int
    # Equal, fresh chunks: plain causal attention on the chunk itself.
    uniform: bool
    # Per chunk: tokens before it (in the cache already), its length, and the block ids that
    # hold those earlier tokens (None when it starts at 0).
    starts: list[int] | None = None
    counts: list[int] | None = None
    prefix_blocks: list[torch.Tensor | None] | None = None
    # A sliding window inside some chunk's context: a padded batch with a mask,
    # [num_seqs * max_query_len] -> token index, and token -> padded index.
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
        # Where this step's token goes: row (sequence * kv_heads + head) * capacity + position
        # of keys.view(-1, head_dim), for one index_copy_ per layer.
        self.write_index: torch.Tensor | None = None
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # The native kernel and each sequence's key range, when it runs this step's attention.
        self.kernels: CpuKernels | None = None
        self.ranges: DecodeRanges | None = None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] slot of each new token's K/V
    num_decodes: int
    decode_block_table: torch.Tensor | None  # [num_decodes, max_blocks]
    decode_bias: torch.Tensor | None  # [num_decodes, 1, 1, max_kv_len], 0 or -inf
    prefill: PrefillMetadata | None
    staging: DecodeStaging | None = None
    decode_mask: torch.Tensor | None = None  # decode_bias in the model's dtype
    # A KV connector (worker side): each layer waits for its loads, then saves its K/V.
    kv_connector: Any = None


# Decode batches with at most this many keys in all (sequences x staged capacity) run as one
# SDPA call: measured faster below ~600 keys, slower above (docs/performance.md).
SDPA_DECODE_MAX_KEYS = 512


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
        self.kernels: CpuKernels | None = None  # the native K/V store, set by the model
        # Decode through SDPA at every size: set where the CPU has no fast 16-bit matmul
        # (the linear layers hold float32 copies), as torch's bf16 bmm then runs ~10 GFLOP/s
        # and SDPA's flash kernel widens K and V in its own loop.
        self.sdpa_decode = False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D] -> [T, H * D]."""
        k_cache, v_cache = kv_cache
        nb, bs, kvh, d = k_cache.shape
        if meta.kv_connector is not None:
            meta.kv_connector.wait_for_layer_load(self.layer)
        nd = meta.num_decodes
        st = meta.staging
        # An unchanged decode batch appends this step's K/V to its staging copy too (a rebuilt
        # copy is gathered from the cache after this write).
        stage = st.buffers[self.layer] if nd and st is not None and not st.rebuild else None
        if self.kernels is not None and self.kernels.kv_ok(k, v, k_cache, v_cache):
            self.kernels.store_kv(k, v, meta.slot_mapping, k_cache, v_cache, stage,
                                  st.write_index if stage is not None else None)
        else:
            k_cache.view(-1, kvh, d).index_copy_(0, meta.slot_mapping, k)
            v_cache.view(-1, kvh, d).index_copy_(0, meta.slot_mapping, v)
            if stage is not None:
                for buf, new in zip(stage, (k[:nd], v[:nd])):
                    buf.view(-1, d).index_copy_(0, st.write_index, new.reshape(nd * kvh, d))
        if meta.kv_connector is not None:
            meta.kv_connector.save_kv_layer(self.layer, kv_cache)
        parts = []
        if nd and meta.staging is not None:
            parts.append(self._decode_staged(q[:nd], k_cache, v_cache, meta))
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
        qg = q.reshape(b, self.num_kv_heads, g, d)
        bias = meta.decode_bias.view(b, 1, -1)
        out = torch.empty(b, self.num_kv_heads, g, d, dtype=q.dtype, device=q.device)
        for h in range(self.num_kv_heads):
            keys = k_cache[:, :, h].index_select(0, blocks).view(b, -1, d)
            values = v_cache[:, :, h].index_select(0, blocks).view(b, -1, d)
            scores = torch.add(bias, torch.bmm(qg[:, h], keys.transpose(1, 2)), alpha=self.scale)
            torch.bmm(scores.softmax(dim=-1).to(q.dtype), values, out=out[:, h])
        return out.view(b, -1)

    def _decode_staged(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
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
        else:  # this step's token was appended in forward
            keys, values = st.buffers[self.layer]
        if st.ranges is not None:  # one pass over K and V, float32 inside
            return st.kernels.decode_attention(q, keys, values, st.ranges, self.scale)
        if ((b * cap <= SDPA_DECODE_MAX_KEYS or self.sdpa_decode)
                and meta.decode_mask is not None):
            # Small batches: one SDPA call beats two bmm calls' fixed cost. Without a causal
            # mask the g query heads of a KV head are g query rows of that head.
            out = F.scaled_dot_product_attention(q.reshape(b, kvh, g, d), keys, values,
                                                 attn_mask=meta.decode_mask, scale=self.scale)
            return out.reshape(b, -1)
        # The scale is applied in float32 with the mask, in one op (as SDPA scales inside).
        scores = torch.bmm(q.reshape(b * kvh, g, d), keys.view(b * kvh, cap, d).transpose(1, 2))
        probs = torch.add(meta.decode_bias, scores.view(b, kvh, g, cap),
                          alpha=self.scale).softmax(dim=-1)
        out = torch.bmm(probs.to(q.dtype).view(b * kvh, g, cap), values.view(b * kvh, cap, d))
        return out.view(b, -1)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: PrefillMetadata) -> torch.Tensor:
        n, ql, h, d = meta.num_seqs, meta.max_query_len, self.num_heads, self.head_dim
        if meta.uniform:
            return self._causal(q, k, v, n, ql).reshape(n * ql, h * d)
        if meta.starts is not None:
            out = torch.empty(q.shape[0], h * d, dtype=q.dtype, device=q.device)
            offset = 0
            for start, cnt, blocks in zip(meta.starts, meta.counts, meta.prefix_blocks):
                end = offset + cnt
                qi, ki, vi = q[offset:end], k[offset:end], v[offset:end]
                if blocks is None:
                    out[offset:end] = self._causal(qi, ki, vi, 1, cnt).view(cnt, h * d)
                else:
                    out[offset:end] = self._continued(qi, ki, vi, k_cache, v_cache, blocks,
                                                      start)
                offset = end
            return out
        qs = q.index_select(0, meta.pad_index).view(n, ql, h, d).transpose(1, 2)
        ks = _gather(k_cache, meta.block_table)
        vs = _gather(v_cache, meta.block_table)
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=meta.bias.to(q.dtype),
                                             scale=self.scale, enable_gqa=self.group > 1)
        out = out.transpose(1, 2).reshape(n * ql, h * d)
        return out.index_select(0, meta.unpad_index)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int,
                ql: int) -> torch.Tensor:
        """n fresh chunks of ql tokens each, causal within each: [n, ql, H, D]."""
        d = self.head_dim
        qs = q.view(n, ql, self.num_heads, d).transpose(1, 2)
        ks = k.view(n, ql, self.num_kv_heads, d).transpose(1, 2)
        vs = v.view(n, ql, self.num_kv_heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale,
                                             enable_gqa=self.group > 1)
        return out.transpose(1, 2)

    def _continued(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                   start: int) -> torch.Tensor:
        """One chunk of T tokens after start cached ones: [T, H * D].

        Softmax over (earlier keys, own keys) equals the two partial attentions weighted by
        their log-sum-exps: earlier keys need no mask (every query sees all of them), own
        keys the plain causal one. For the earlier part the g query heads that share a KV
        head are stacked as one longer query, so K/V are read once and never repeated."""
        t, h, kvh, g, d = q.shape[0], self.num_heads, self.num_kv_heads, self.group, self.head_dim
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        keys = k_cache.index_select(0, blocks).view(-1, kvh, d)[:start].transpose(0, 1)
        values = v_cache.index_select(0, blocks).view(-1, kvh, d)[:start].transpose(0, 1)
        q_grouped = q.view(t, kvh, g, d).permute(1, 2, 0, 3).reshape(1, kvh, g * t, d)
        out_a, lse_a = flash(q_grouped, keys.unsqueeze(0), values.unsqueeze(0),
                             scale=self.scale)
        out_a, lse_a = out_a.reshape(h, t, d), lse_a.reshape(h, t)
        qs = q.transpose(0, 1).unsqueeze(0)
        ks, vs = k.transpose(0, 1), v.transpose(0, 1)
        if g > 1:
            ks, vs = ks.repeat_interleave(g, 0), vs.repeat_interleave(g, 0)
        out_b, lse_b = flash(qs, ks.unsqueeze(0), vs.unsqueeze(0), is_causal=True,
                             scale=self.scale)
        out_b, lse_b = out_b.reshape(h, t, d), lse_b.reshape(h, t)
        lse = torch.logaddexp(lse_a, lse_b)
        merged = (out_a * (lse_a - lse).exp().unsqueeze(-1)
                  + out_b * (lse_b - lse).exp().unsqueeze(-1))
        return merged.to(q.dtype).transpose(0, 1).reshape(t, h * d)
