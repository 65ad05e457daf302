"""The attention backend's paths against one reference (float64, explicit causal mask), and
the packed linear weights against F.linear."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fleetllm.model.layers.attention import (
    SDPA_DECODE_MAX_KEYS,
    AttentionMetadata,
    DecodeStaging,
    TorchAttentionBackend,
)
from fleetllm.model.layers.linear import (
    PackedMatmul,
    drop_packed_weights,
    pack_linear_weights,
    pack_weight,
    weight_bytes_held,
    weights_as_held,
)
from fleetllm.model.layers.rotary import RotaryEmbedding

HEADS, KV_HEADS, DIM, BS, NUM_BLOCKS = 6, 2, 16, 4, 64


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
              window: int | None = None) -> torch.Tensor:
    """q [T, H, D] at positions start.., keys/values [start + T, KVH, D] -> [T, H * D]."""
    t, total = q.shape[0], keys.shape[0]
    g = HEADS // KV_HEADS
    k = keys.double().repeat_interleave(g, 1).transpose(0, 1)
    v = values.double().repeat_interleave(g, 1).transpose(0, 1)
    scores = q.double().transpose(0, 1) @ k.transpose(1, 2) * DIM**-0.5
    q_pos = torch.arange(start, start + t)[:, None]
    k_pos = torch.arange(total)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    return out.transpose(0, 1).reshape(t, HEADS * DIM)


def run_step(seqs: list[tuple[int, int]], dtype: torch.dtype, window: int | None = None,
             seed: int = 0, staged_capacity: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One step over sequences (tokens already cached, new tokens), decodes (1 new token)
    first, through the model runner's own metadata; returns (backend output, reference)."""
    from fleetllm.worker.model_runner import ModelRunner

    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.zeros(NUM_BLOCKS, BS, KV_HEADS, DIM, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    runner = ModelRunner.__new__(ModelRunner)
    runner.block_size, runner.sliding_window = BS, window
    t = torch.from_numpy
    starts = np.array([s for s, _ in seqs])
    counts = np.array([c for _, c in seqs])
    blocks = np.random.default_rng(seed).permutation(NUM_BLOCKS)
    max_blocks = -(-int((starts + counts).max()) // BS)
    table = np.zeros((len(seqs), max_blocks), dtype=np.int64)
    used = 0
    for i, (s, c) in enumerate(seqs):
        nb = -(-(s + c) // BS)
        table[i, :nb] = blocks[used:used + nb]
        used += nb
    qs, ks, vs, refs, slots = [], [], [], [], []
    for i, (s, c) in enumerate(seqs):
        earlier = torch.randn(s + c, KV_HEADS, DIM, generator=gen).to(dtype)
        earlier_v = torch.randn(s + c, KV_HEADS, DIM, generator=gen).to(dtype)
        pos = np.arange(s + c)
        seq_slots = table[i, pos // BS] * BS + pos % BS
        k_cache.view(-1, KV_HEADS, DIM)[t(seq_slots[:s])] = earlier[:s]
        v_cache.view(-1, KV_HEADS, DIM)[t(seq_slots[:s])] = earlier_v[:s]
        q = torch.randn(c, HEADS, DIM, generator=gen).to(dtype)
        qs.append(q)
        ks.append(earlier[s:])
        vs.append(earlier_v[s:])
        slots.append(seq_slots[s:])
        refs.append(reference(q, earlier, earlier_v, s, window))
    nd = int((counts == 1).sum())
    decode_table = decode_bias = decode_mask = staging = None
    if staged_capacity:
        staging = DecodeStaging()
        staging.capacity, staging.rebuild = staged_capacity, True
    if nd:
        lens = starts[:nd] + 1
        key_pos = np.arange(staged_capacity or max_blocks * BS)
        allowed = key_pos[None, :] < lens[:, None]
        if window:
            allowed &= key_pos[None, :] > (lens - 1 - window)[:, None]
        decode_table = t(table[:nd])
        decode_bias = t(np.where(allowed, 0.0, -np.inf).astype(np.float32)).view(nd, 1, 1, -1)
        decode_mask = decode_bias.to(dtype)
    prefill = (runner._prefill_meta(starts[nd:], counts[nd:], table[nd:], t)
               if nd < len(seqs) else None)
    meta = AttentionMetadata(t(np.concatenate(slots)), nd, decode_table, decode_bias, prefill,
                             staging, decode_mask)
    backend = TorchAttentionBackend(HEADS, KV_HEADS, DIM, DIM**-0.5)
    out = backend.forward(torch.cat(qs), torch.cat(ks), torch.cat(vs), (k_cache, v_cache), meta)
    return out, torch.cat(refs)


CASES = {
    "uniform fresh chunks": [(0, 9), (0, 9), (0, 9)],
    "fresh chunks of other lengths": [(0, 3), (0, 17), (0, 1 + 8)],
    "continued chunks (chunked prefill, prefix hits)": [(5, 7), (16, 16), (33, 2), (0, 11)],
    "decodes then prefills": [(7, 1), (30, 1), (12, 6), (0, 5)],
    "decodes only": [(3, 1), (40, 1), (17, 1)],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_paths_match_reference(case: str, dtype: torch.dtype) -> None:
    out, ref = run_step(CASES[case], dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("capacity", [64, SDPA_DECODE_MAX_KEYS])  # one SDPA call; two bmm
def test_staged_decode_matches_reference(capacity: int) -> None:
    out, ref = run_step([(7, 1), (30, 1), (12, 1), (0, 5)], torch.bfloat16,
                        staged_capacity=capacity)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_sliding_window_cuts_into_the_context() -> None:
    out, ref = run_step([(12, 1), (20, 6), (9, 9)], torch.float32, window=8)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_continued_chunk_uses_no_mask() -> None:
    from fleetllm.worker.model_runner import ModelRunner

    runner = ModelRunner.__new__(ModelRunner)
    runner.block_size, runner.sliding_window = BS, None
    meta = runner._prefill_meta(np.array([8, 0]), np.array([4, 6]),
                                np.arange(8).reshape(2, 4), torch.from_numpy)
    assert meta.bias is None and meta.starts == [8, 0] and meta.counts == [4, 6]
    assert meta.prefix_blocks[0].tolist() == [0, 1] and meta.prefix_blocks[1] is None


def test_rotary_matches_rotate_half() -> None:
    rotary = RotaryEmbedding(DIM, 64, 10000.0, None, torch.bfloat16)
    x = torch.randn(5, 3, DIM).bfloat16()
    positions = torch.tensor([0, 7, 3, 63, 12])
    half = DIM // 2
    freqs = torch.outer(positions.float(), 1.0 / 10000.0 ** (torch.arange(0, DIM, 2) / DIM))
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().bfloat16().unsqueeze(1), emb.sin().bfloat16().unsqueeze(1)
    expected = x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin
    assert torch.equal(rotary.rotate(rotary.cos_sin(positions), x), expected)


class _Lin(PackedMatmul, torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)


@pytest.mark.skipif(pack_weight(torch.zeros(2, 2, dtype=torch.bfloat16)) is None,
                    reason="oneDNN cannot pack bf16 weights on this CPU")
def test_packed_weights_are_bit_identical_and_still_readable() -> None:
    w = torch.randn(48, 32).bfloat16()
    layer = _Lin(w.clone())
    bias = torch.randn(48).bfloat16()
    xs = [torch.randn(m, 32).bfloat16() for m in (1, 3, 64)]
    plain = [F.linear(x, w, bias) for x in xs]
    assert layer.pack() and layer.weight.numel() == 0
    for x, y in zip(xs, plain):
        assert torch.equal(layer.matmul(x, bias), y)
    assert torch.equal(dict(weights_as_held(layer))["weight"], w)
    assert pack_weight(torch.zeros(2, 2)) is None  # float32 keeps the unpacked kernel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_copy_where_onednn_cannot_pack(dtype: torch.dtype) -> None:
    """Where oneDNN cannot pack (AVX2-only CPUs), a 16-bit weight is held as float32: the
    output is the float32 sum of the same products, rounded once to the input's dtype, so it
    is within one rounding of torch's 16-bit kernel; the weight reads back exactly."""
    torch.manual_seed(0)
    w = torch.randn(48, 32).to(dtype)
    bias = torch.randn(48).to(dtype)
    layer = _Lin(w.clone())
    assert layer.needs_upcast()
    layer.hold_as_float32()
    assert layer.weight.numel() == 0 and layer.weight.dtype == dtype
    assert layer.upcast.dtype == torch.float32 and not layer.needs_upcast()
    assert layer.upcast.is_mkldnn or not torch.backends.mkldnn.is_available()
    for m in (1, 3, 64):
        x = torch.randn(m, 32).to(dtype)
        got = layer.matmul(x, bias)
        assert got.dtype == dtype
        # One float32 sum of the exact products (in oneDNN's order), rounded once.
        want = F.linear(x.float(), w.float(), bias.float())
        torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-5)
        torch.testing.assert_close(got, F.linear(x, w, bias))  # dtype's default tolerance
    held = dict(weights_as_held(layer))["weight"]
    assert held.dtype == dtype and torch.equal(held, w)
    assert weight_bytes_held(layer) == w.numel() * 4
    drop_packed_weights(layer)
    assert layer.upcast is None


def test_float32_copies_only_where_they_fit(caplog: pytest.LogCaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """pack_linear_weights widens the 16-bit weights oneDNN did not pack only while their
    float32 copies take at most half the memory available, else it says what to change."""
    import fleetllm.model.layers.linear as linear

    monkeypatch.setattr(linear, "pack_weight", lambda w: None)  # as on an AVX2-only CPU
    model = torch.nn.ModuleList([_Lin(torch.randn(64, 64).bfloat16()) for _ in range(2)])
    need = 2 * 2 * 64 * 64 * 2  # float32 copies of both
    assert pack_linear_weights(model, available_bytes=need) == 0
    assert all(m.upcast is None and m.weight.numel() > 0 for m in model)
    assert "load the model in float32" in caplog.text
    assert pack_linear_weights(model, available_bytes=2 * need) == 2
    assert all(m.holds_copy() and m.upcast is not None for m in model)
    fp32 = _Lin(torch.randn(8, 8))
    assert not fp32.needs_upcast() and pack_linear_weights(fp32) == 0
