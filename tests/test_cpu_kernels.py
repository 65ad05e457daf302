"""The native CPU kernels. Decode attention: exact to float32 against a float64 reference, on
every shape it accepts. The fused residual add + RMSNorm, SiLU-and-mul and rotary embedding:
rounded as torch's own ops round, bit for bit but for a rare last-bit flip of RMSNorm's float32
sum. The small-batch linear kernel: within a bf16 step of the exact product, as oneDNN is, on
both its AVX512-BF16 and its plain AVX-512 builds. Built once and cached; sharing torch's OpenMP runtime; and a missing compiler or
FLEETLLM_CPU_KERNELS=0 leaves the torch path in place."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fleetllm.model.layers import cpu_kernels
from fleetllm.model.layers.cpu_kernels import CpuKernels, decode_kernels_for, kernels_for
from fleetllm.model.layers.linear import PackedMatmul, pack_weight
from fleetllm.model.layers.norm import RMSNorm
from fleetllm.model.layers.rotary import RotaryEmbedding

HAS_AVX512 = platform.machine() in ("x86_64", "AMD64") and "avx512f" in cpu_kernels._cpu_flags()
needs_kernel = pytest.mark.skipif(not HAS_AVX512, reason="the kernel needs x86-64 with AVX-512")


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """load() with its own cache directory and no memory of earlier calls."""
    monkeypatch.setenv("FLEETLLM_CACHE_DIR", str(tmp_path / "cache"))
    cpu_kernels.load.cache_clear()
    yield cpu_kernels.load
    cpu_kernels.load.cache_clear()


@pytest.fixture(scope="module")
def kernels() -> CpuKernels:
    k = cpu_kernels.load()
    assert k is not None, "the kernel did not build: see the log for the compiler's message"
    return k


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lo: np.ndarray,
              hi: np.ndarray, scale: float) -> torch.Tensor:
    b, kvh, _, d = keys.shape
    g = q.shape[1] // kvh
    rows = []
    for i in range(b):
        k = keys[i, :, lo[i]:hi[i]].double()
        v = values[i, :, lo[i]:hi[i]].double()
        scores = q[i].double().view(kvh, g, d) @ k.transpose(1, 2) * scale
        rows.append((scores.softmax(-1) @ v).reshape(-1))
    return torch.stack(rows)


@needs_kernel
@pytest.mark.parametrize("b,kvh,g,d,cap", [
    (1, 3, 3, 64, 272),    # SmolLM at batch 1
    (8, 3, 3, 64, 1712),   # long contexts
    (5, 2, 7, 64, 100),    # Qwen2.5-0.5B's 7 query heads per KV head
    (3, 4, 2, 32, 37),     # the built-in model's head_dim
    (2, 8, 4, 128, 300),
    (4, 1, 1, 16, 19),
])
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_attention_is_float32_exact(kernels, b, kvh, g, d, cap, window, splits):
    gen = torch.Generator().manual_seed(b * 1000 + d + cap)
    # q as the model passes it: a slice of the rotated q+k heads, rows contiguous
    qk = torch.randn(b, kvh * g + kvh, d, generator=gen).to(torch.bfloat16)
    q = qk[:, : kvh * g]
    keys = torch.randn(b, kvh, cap, d, generator=gen).to(torch.bfloat16)
    values = torch.randn(b, kvh, cap, d, generator=gen).to(torch.bfloat16)
    lens = torch.randint(1, cap + 1, (b,), generator=gen).numpy()
    lens[0] = cap
    ranges = kernels.decode_ranges(lens, window)
    scale = d**-0.5
    out = kernels.decode_attention(q, keys, values, ranges, scale, splits=splits)
    want = reference(q, keys, values, ranges.lo.numpy(), lens, scale)
    assert out.shape == (b, kvh * g * d) and out.dtype == torch.bfloat16
    # Only the final rounding to bf16 remains: half a bf16 ulp, plus float32 noise.
    err = (out.double() - want).abs()
    assert (err <= want.abs() * 2.0**-8 + 1e-6).all(), err.max()


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 steps apart same-signed values are."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


def rows_of(t: torch.Tensor, n: int, strided: bool) -> torch.Tensor:
    """t's rows of n, either contiguous or every other block of a wider tensor."""
    if not strided:
        return t
    wide = torch.zeros(t.shape[0], 2 * n + 16, dtype=t.dtype)
    wide[:, 16:16 + n] = t
    return wide[:, 16:16 + n]


# rows x n: batch 1, a decode batch, odd sizes (scalar tails), and enough to go parallel.
NORM_SHAPES = [(1, 576), (64, 576), (7, 40), (3, 17), (300, 896), (2048, 256)]


@needs_kernel
@pytest.mark.parametrize("rows,n", NORM_SHAPES)
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_rounds_as_torch_does(kernels, rows, n, strided, with_delta):
    torch.manual_seed(rows * n)
    x = rows_of((torch.randn(rows, n) * torch.rand(rows, 1) * 8).to(torch.bfloat16), n, strided)
    delta = rows_of(torch.randn(rows, n, dtype=torch.bfloat16), n, strided) if with_delta else None
    norm = RMSNorm(n, 1e-6).to(torch.bfloat16)
    norm.weight.data = torch.randn(n, dtype=torch.bfloat16)
    want, want_sum = norm.add_forward(x, delta)  # torch's ops: no kernels attached
    norm.kernels = kernels
    got, got_sum = norm.add_forward(x, delta)
    assert torch.equal(got_sum, want_sum)  # the residual add is exact
    assert got.is_contiguous() and got.shape == want.shape
    # Only a float32 sum in another order can differ: ~1e-5 of the elements, by one bf16
    # step of the normed value, which the weight's product can make two.
    assert (got != want).float().mean().item() <= 1e-3
    assert ulps_apart(got, want).max().item() <= 2
    assert torch.equal(norm(got_sum), got)  # forward() is the same kernel, without the add


@needs_kernel
def test_rms_norm_differs_from_torch_rarely_and_by_two_steps_at_most(kernels):
    torch.manual_seed(0)
    x = (torch.randn(4000, 576) * torch.rand(4000, 1) * 10).to(torch.bfloat16)
    w = torch.randn(576, dtype=torch.bfloat16)
    got, _ = kernels.add_rms_norm(x, None, w, 1e-5)
    want = w * torch.nn.functional.rms_norm(x, (576,), eps=1e-5)
    assert (got != want).float().mean().item() < 1e-4  # 2.3M elements; ~1e-5 measured
    assert ulps_apart(got, want).max().item() <= 2


@needs_kernel
@pytest.mark.parametrize("rows,n", [(1, 1536), (64, 1536), (5, 24), (3, 17), (256, 4864)])
@pytest.mark.parametrize("strided", [False, True])
def test_silu_and_mul_rounds_as_torch_does(kernels, rows, n, strided):
    torch.manual_seed(n)
    gate_up = rows_of((torch.randn(rows, 2 * n) * 6).to(torch.bfloat16), 2 * n, strided)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp's clamps, signed zeros
    gate, up = gate_up.split(n, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    got = kernels.silu_and_mul(gate_up)
    assert got.is_contiguous()
    assert (got != want).float().mean().item() <= 1e-4  # none seen in 35M elements
    assert ulps_apart(got, want).max().item() <= 1


@needs_kernel
@pytest.mark.parametrize("d,heads,tokens", [(64, 12, 1), (64, 12, 300), (32, 12, 5),
                                            (128, 4, 3), (40, 3, 4), (16, 2, 9)])
def test_rotary_in_place_is_bit_identical_to_torch(kernels, d, heads, tokens):
    torch.manual_seed(d * heads + tokens)
    rotary = RotaryEmbedding(d, 2048, 10000.0, None, torch.bfloat16)
    rope = rotary.cos_sin(torch.randint(0, 2048, (tokens,)))
    # q and k heads rotated inside a wider qkv row, as the model does, v left alone
    qkv = torch.randn(tokens, (heads + 2) * d, dtype=torch.bfloat16)
    before = qkv.clone()
    x = qkv[:, : heads * d].view(tokens, heads, d)
    want = rotary.rotate(rope, x)
    rotary.kernels = kernels
    got = rotary.rotate(rope, x)
    assert got.data_ptr() == qkv.data_ptr()  # in place
    assert torch.equal(got, want)
    assert torch.equal(qkv[:, heads * d:], before[:, heads * d:])


@needs_kernel
@pytest.mark.parametrize("tokens,staged,kvh,d", [(1, 1, 3, 64), (9, 4, 3, 64), (300, 0, 2, 64),
                                                (5, 5, 4, 32), (40, 8, 1, 128)])
def test_kv_store_writes_what_index_copy_writes(kernels, tokens, staged, kvh, d):
    torch.manual_seed(tokens * kvh + d)
    heads, slots_total, cap = 2 * kvh, 512, 24
    qkv = torch.randn(tokens, (heads + 2 * kvh) * d, dtype=torch.bfloat16)
    # As the model leaves them: k from the rotated q|k view, v viewed on its own. At one
    # token the two views' token strides differ ((heads + kvh) * d against kvh * d).
    k = qkv[:, :(heads + kvh) * d].view(tokens, heads + kvh, d)[:, heads:]
    v = qkv[:, (heads + kvh) * d:].view(tokens, kvh, d)
    slots = torch.randperm(slots_total)[:tokens]
    rows = (torch.arange(staged * kvh) * cap + torch.randint(0, cap, (staged * kvh,)))
    caches = [torch.randn(slots_total // 16, 16, kvh, d, dtype=torch.bfloat16) for _ in range(4)]
    stages = [torch.randn(staged, kvh, cap, d, dtype=torch.bfloat16) for _ in range(4)]
    want_k, want_v, got_k, got_v = caches
    want_ks, want_vs = stages[0], stages[1]
    got_ks, got_vs = stages[2].copy_(want_ks), stages[3].copy_(want_vs)
    got_k.copy_(want_k), got_v.copy_(want_v)
    for cache, new in ((want_k, k), (want_v, v)):
        cache.view(-1, kvh, d).index_copy_(0, slots, new)
    for buf, new in ((want_ks, k), (want_vs, v)):
        buf.view(-1, d).index_copy_(0, rows, new[:staged].reshape(-1, d))
    assert kernels.kv_ok(k, v, got_k, got_v)
    kernels.store_kv(k, v, slots, got_k, got_v, (got_ks, got_vs) if staged else None,
                     rows if staged else None)
    for got, want in ((got_k, want_k), (got_v, want_v), (got_ks, want_ks), (got_vs, want_vs)):
        assert torch.equal(got, want)


@needs_kernel
def test_kv_store_refuses_an_index_outside_the_cache_and_writes_nothing(kernels):
    k = v = torch.randn(3, 2, 32, dtype=torch.bfloat16)
    cache = torch.zeros(4, 16, 2, 32, dtype=torch.bfloat16)
    stage = torch.zeros(2, 2, 8, 32, dtype=torch.bfloat16)
    with pytest.raises(IndexError, match="slot 64 of token 2 is outside the cache"):
        kernels.store_kv(k, v, torch.tensor([0, 1, 64]), cache, cache.clone())
    with pytest.raises(IndexError, match="staging row 32 is outside the staging copy"):
        kernels.store_kv(k, v, torch.tensor([0, 1, 2]), cache, cache.clone(), (stage, stage),
                         torch.tensor([0, 8, 32, 1]))
    with pytest.raises(TypeError, match="slots must be contiguous int64"):
        kernels.store_kv(k, v, torch.tensor([0, 1, 2], dtype=torch.int32), cache, cache.clone())
    assert not cache.any() and not stage.any()
    assert not kernels.kv_ok(k.transpose(0, 1), v.transpose(0, 1), cache, cache)  # heads apart
    assert not kernels.kv_ok(k.float(), v.float(), cache, cache)
    assert not kernels.kv_ok(k, v, cache, cache[:2])


def check_small_linear(kernels: CpuKernels, rows: int, out: int, inp: int, bias: bool,
                       strided: bool) -> None:
    torch.manual_seed(rows * out + inp)
    w = torch.randn(out, inp, dtype=torch.bfloat16)
    b = torch.randn(out, dtype=torch.bfloat16) if bias else None
    x = torch.randn(rows, inp + (48 if strided else 0), dtype=torch.bfloat16)[:, :inp]
    exact = x.double() @ w.double().T + (0 if b is None else b.double())
    got = kernels.small_linear(x, kernels.block_weight(w), b)
    packed = pack_weight(w)
    if packed is not None:
        onednn = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
    else:  # no bf16 oneDNN (AVX2): the float32 copies' path, one float32 sum rounded once
        onednn = F.linear(x.float(), w.float(), None if b is None else b.float()).bfloat16()
    assert got.shape == (rows, out) and got.dtype == torch.bfloat16
    # Each output is one float32 sum rounded once to bf16: within a bf16 step of the exact
    # product, plus what a float32 sum of `inp` terms can lose, as oneDNN's is (their float32
    # sums run in different orders).
    step = (exact.abs().clamp_min(2 ** -100).log2().floor() - 7).exp2()  # a bf16 step
    magnitude = x.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs())
    bound = step + inp * 2 ** -24 * magnitude
    for result in (got, onednn):
        assert ((result.double() - exact).abs() <= bound).all()
    assert (got != onednn).double().mean() < 0.05


HAS_AMX = {"amx_bf16", "amx_tile"} <= cpu_kernels._cpu_flags()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 17, 64])
@pytest.mark.parametrize("out,inp", [(256, 256), (80, 34), (4096, 256), (960, 576),
                                     (3072, 576)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("amx", [True, False])
def test_small_linear_is_one_rounding_from_the_exact_product(kernels, rows, out, inp, bias,
                                                            amx, monkeypatch):
    if amx and not kernels.amx:
        pytest.skip("no AMX tiles on this CPU (or not granted): the AVX-512 path serves")
    monkeypatch.setattr(kernels, "amx", amx)
    check_small_linear(kernels, rows, out, inp, bias, strided=rows in (2, 17))


@pytest.mark.skipif(not HAS_AMX, reason="the CPU has no AMX tiles")
def test_amx_tiles_are_granted_and_serve_up_to_64_rows(kernels):
    assert kernels.amx, "Linux did not grant this process the AMX tile state"
    assert kernels.small_rows == cpu_kernels.SMALL_LINEAR_ROWS_AMX == 64


@needs_kernel
def test_small_linear_without_avx512_bf16_gives_the_same_answers(fresh_load, tmp_path,
                                                                 monkeypatch):
    """CPUs with AVX-512 but not its bf16 dot products build the widening path."""
    fallback = CpuKernels(cpu_kernels.build(extra_flags=("-mno-avx512bf16", "-mno-amx-bf16",
                                                         "-mno-amx-tile")))
    assert not fallback.amx  # built without the tiles: fl_amx_init says no
    for rows, out, inp, bias in ((1, 256, 256, True), (2, 80, 34, False), (3, 960, 576, True)):
        check_small_linear(fallback, rows, out, inp, bias, strided=True)


@needs_kernel
def test_small_linear_refuses_what_it_cannot_take(kernels):
    bf = torch.bfloat16
    assert kernels.block_weight(torch.randn(64, 32)) is None  # float32 keeps oneDNN / F.linear
    assert kernels.block_weight(torch.randn(40, 32, dtype=bf)) is None  # out not 16k
    assert kernels.block_weight(torch.randn(64, 33, dtype=bf)) is None  # in odd
    big = cpu_kernels.SMALL_LINEAR_MAX_BYTES // 2 // 1024 + 16
    assert kernels.block_weight(torch.empty(big, 1024, dtype=bf)) is None  # not doubled
    assert kernels.small_rows_ok(torch.randn(kernels.small_rows, 32, dtype=bf))
    assert not kernels.small_rows_ok(torch.randn(kernels.small_rows + 1, 32, dtype=bf))
    assert not kernels.small_rows_ok(torch.randn(32, 2, dtype=bf).t())
    blocked = kernels.block_weight(torch.randn(64, 32, dtype=bf))
    with pytest.raises(ValueError, match="x has 30 features, the weight 32"):
        kernels.small_linear(torch.randn(1, 30, dtype=bf), blocked)
    with pytest.raises(TypeError, match="bias must be contiguous bf16"):
        kernels.small_linear(torch.randn(1, 32, dtype=bf), blocked, torch.randn(64))


@needs_kernel
@pytest.mark.parametrize("rows,n", [(64, 49152), (1, 49152), (3, 17), (2, 1), (7, 100),
                                    (2, 151936)])
def test_argmax_picks_what_torch_picks(kernels, rows, n):
    torch.manual_seed(rows + n)
    cases = [torch.randn(rows, n), torch.randint(-3, 3, (rows, n)).float(),  # ties: the first
             torch.full((rows, n), float("-inf")),
             torch.randn(rows, n + 40)[:, 5:n + 5]]  # rows further apart than n
    nans = torch.randint(-3, 3, (rows, n)).float()
    nans[:, -1] = float("nan")  # in the tail
    cases.append(nans.clone())
    if n > 40:
        nans[0, 33], nans[-1, 20] = float("nan"), float("nan")  # in the vector part: the first
        cases.append(nans)
    for x in cases:
        assert kernels.argmax_ok(x)
        assert torch.equal(kernels.argmax(x), x.argmax(-1))
    assert not kernels.argmax_ok(torch.randn(rows, n, dtype=torch.bfloat16))
    assert not kernels.argmax_ok(torch.randn(n, rows + 1).t())  # last stride rows + 1
    assert not kernels.argmax_ok(torch.randn(rows, 0))


@needs_kernel
def test_layouts_the_kernels_do_not_take_keep_torchs_ops(kernels):
    norm = RMSNorm(8, 1e-6).to(torch.bfloat16)
    norm.kernels = kernels
    x = torch.randn(8, 3, dtype=torch.bfloat16).t()  # last stride 3: torch's ops
    assert not kernels.rows_ok(x)
    assert torch.equal(norm(x), torch.nn.functional.rms_norm(x, (8,), eps=1e-6) * norm.weight)
    rotary = RotaryEmbedding(8, 16, 10000.0, None, torch.bfloat16)
    rotary.kernels = kernels
    y = torch.randn(2, 8, 3, dtype=torch.bfloat16).transpose(1, 2)  # heads not d apart
    rope = rotary.cos_sin(torch.tensor([1, 2]))
    before = y.clone()
    out = rotary.rotate(rope, y)
    assert out.data_ptr() != y.data_ptr() and torch.equal(y, before)


@needs_kernel
def test_the_kernel_serves_a_bf16_engine_as_closely_as_the_torch_path(monkeypatch):
    from fleetllm import LLM, SamplingParams
    from fleetllm.default_model import default_model_path

    prompts = [{"prompt_token_ids": list(range(3 + i, 40 + 7 * i))} for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    runs = {}
    for name, on, dtype in (("kernel", "1", "bfloat16"), ("torch", "0", "bfloat16"),
                            ("float32", "1", "float32")):
        monkeypatch.setenv("FLEETLLM_CPU_KERNELS", on)
        cpu_kernels.load.cache_clear()
        llm = LLM(str(default_model_path()), dtype=dtype, skip_tokenizer_init=True)
        try:
            runner = llm.engine_core.executor.driver_worker.worker.model_runner
            assert (runner.cpu_kernels is not None) == (name == "kernel")
            fused = [m.kernels is not None for m in runner.model.modules()
                     if hasattr(m, "kernels") and not isinstance(m, PackedMatmul)]
            assert len(fused) == 6 * 3 + 2 and set(fused) == {name == "kernel"}
            stores = [m.attn.kernels is not None for m in runner.model.modules()
                      if hasattr(m, "attn")]
            assert len(stores) == 6 and set(stores) == {name == "kernel"}
            # Every linear layer (4 a layer and the 2 MiB head) has its blocked copy.
            small = [m.blocked is not None for m in runner.model.modules()
                     if isinstance(m, PackedMatmul)]
            assert len(small) == 6 * 4 + 1 and set(small) == {name == "kernel"}
            # Greedy picks are torch's either way: the native argmax serves every CPU dtype.
            assert (runner.sampler.kernels is not None) == (name != "torch")
            # Decodes of 6, 1 and 3 rows: the small linear kernel serves all three on AMX,
            # and 1 and 3 on AVX-512 alone (6 rows: oneDNN).
            outs = [*llm.generate(prompts, params, use_tqdm=False),
                    *llm.generate(prompts[:1], params, use_tqdm=False),
                    *llm.generate(prompts[1:4], params, use_tqdm=False)]
            assert runner.staging is not None
            assert (runner.staging.ranges is not None) == (name == "kernel")
        finally:
            llm.shutdown()
        runs[name] = [o.outputs[0] for o in outs]
    cpu_kernels.load.cache_clear()

    def drift(name: str) -> float:  # log-probabilities of float32's tokens, against float32
        worst = 0.0
        for got, ref in zip(runs[name], runs["float32"]):
            for lp, lp_ref, tok in zip(got.logprobs, ref.logprobs, ref.token_ids):
                if tok in lp:
                    worst = max(worst, abs(lp[tok].logprob - lp_ref[tok].logprob))
        return worst

    assert [o.token_ids for o in runs["kernel"]] == [o.token_ids for o in runs["torch"]]
    # The torch path rounds the scores to bf16, the kernel keeps them in float32: it is no
    # further from float32 than the torch path is (bf16's own rounding dominates both).
    assert drift("kernel") <= 1.25 * drift("torch") + 0.01, (drift("kernel"), drift("torch"))


@needs_kernel
def test_a_batch_one_decode_stores_its_kv_with_the_kernel(monkeypatch):
    """At one token a view's token stride is whatever the view made it, so k and v disagree:
    the store must still take the kernel, every layer, every step."""
    from fleetllm import LLM, SamplingParams
    from fleetllm.default_model import default_model_path

    llm = LLM(str(default_model_path()), dtype="bfloat16", skip_tokenizer_init=True)
    try:
        kernels = llm.engine_core.executor.driver_worker.worker.model_runner.cpu_kernels
        calls: list[int] = []
        store = kernels.store_kv
        monkeypatch.setattr(kernels, "store_kv", lambda k, *a: calls.append(len(k)) or store(k, *a))
        llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                     SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                     use_tqdm=False)
    finally:
        llm.shutdown()
    assert calls == [3] * 6 + [1] * 6 * 3  # the prefill, then three decode steps of 6 layers


@needs_kernel
def test_built_once_then_taken_from_the_cache(fresh_load, tmp_path):
    first = fresh_load()
    assert first is not None and first.path.parent == tmp_path / "cache" / "kernels"
    stamp = first.path.stat().st_mtime_ns
    fresh_load.cache_clear()
    second = fresh_load()
    assert second.path == first.path and second.path.stat().st_mtime_ns == stamp
    assert [p.name for p in first.path.parent.iterdir()] == [first.path.name]  # no temp left


@needs_kernel
def test_the_kernel_shares_torchs_openmp_runtime(kernels):
    maps = Path("/proc/self/maps").read_text().splitlines()
    gomp = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(gomp) == 1, gomp  # a second runtime would be a second, oversubscribing pool


def test_a_failed_build_keeps_the_torch_path_and_says_why(fresh_load, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # found on PATH, and fails
    monkeypatch.setattr(cpu_kernels, "_why_unavailable", lambda: None)
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert fresh_load() is None
    assert "FLEETLLM_CPU_KERNELS=0" in caplog.text and "false" in caplog.text
    assert not list((Path(cpu_kernels.cache_dir())).glob("*.so"))


@pytest.mark.parametrize("env,reason", [
    ({"FLEETLLM_CPU_KERNELS": "0"}, "FLEETLLM_CPU_KERNELS=0"),
    ({"CC": "no-such-compiler-here"}, "no C compiler (no-such-compiler-here)"),
])
def test_unavailable_kernels_say_why(fresh_load, monkeypatch, caplog, env, reason):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with caplog.at_level(logging.INFO, logger=cpu_kernels.__name__):
        assert fresh_load() is None
    if HAS_AVX512:
        assert reason in caplog.text


def test_only_bf16_cpu_models_with_a_supported_head_dim_use_it(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "load", lambda: "kernels")
    cpu = torch.device("cpu")
    assert kernels_for(cpu, torch.bfloat16) == "kernels"  # the pointwise kernels: any head_dim
    assert kernels_for(cpu, torch.float32) is None
    assert kernels_for(torch.device("meta"), torch.bfloat16) is None
    assert decode_kernels_for(cpu, torch.bfloat16, 64) == "kernels"
    assert decode_kernels_for(cpu, torch.float32, 64) is None  # stays bit-identical to HF
    assert decode_kernels_for(cpu, torch.bfloat16, 80) is None
    assert decode_kernels_for(cpu, torch.bfloat16, 256) is None
    assert decode_kernels_for(torch.device("meta"), torch.bfloat16, 64) is None


@pytest.mark.parametrize("value", ["off", "true", "", "2"])
def test_a_bad_switch_value_is_refused_naming_the_choices(fresh_load, monkeypatch, value):
    monkeypatch.setenv("FLEETLLM_CPU_KERNELS", value)
    with pytest.raises(ValueError, match="FLEETLLM_CPU_KERNELS must be 0 .off. or 1"):
        fresh_load()


@needs_kernel
def test_an_unwritable_cache_keeps_the_torch_path_and_says_why(fresh_load, monkeypatch,
                                                               tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FLEETLLM_CACHE_DIR", str(blocker))  # kernels/ cannot go under a file
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert fresh_load() is None
    assert "not built" in caplog.text and "a-file" in caplog.text


# ---- the AVX2 build of the small linear kernel ------------------------------------------
HAS_AVX2 = (platform.machine() in ("x86_64", "AMD64")
            and {"avx2", "fma"} <= cpu_kernels._cpu_flags())
needs_avx2 = pytest.mark.skipif(not HAS_AVX2, reason="the AVX2 kernel needs AVX2 and FMA")


def avx2_build() -> cpu_kernels.Avx2SmallLinear:
    return cpu_kernels.Avx2SmallLinear(cpu_kernels.build(cpu_kernels.AVX2_SOURCES, ()))


@pytest.fixture(scope="module")
def avx2() -> cpu_kernels.Avx2SmallLinear:
    """Built on any AVX2 CPU, AVX-512 ones included (where the engine does not use it)."""
    return avx2_build()


@needs_avx2
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 17])
@pytest.mark.parametrize("out,inp", [(256, 256), (80, 34), (960, 576), (3072, 576),
                                     (16, 2)])
@pytest.mark.parametrize("bias", [False, True])
def test_avx2_small_linear_is_one_rounding_from_the_exact_product(avx2, rows, out, inp, bias):
    check_small_linear(avx2, rows, out, inp, bias, strided=rows in (2, 17))


@needs_avx2
def test_avx2_kernel_takes_any_size_up_to_8_rows_and_keeps_nan(avx2):
    bf = torch.bfloat16
    big = torch.randn(cpu_kernels.SMALL_LINEAR_MAX_BYTES // 2 // 64 + 16, 64, dtype=bf)
    assert avx2.block_weight(big) is not None  # the LM head too: no copy is doubled here
    assert avx2.block_weight(torch.randn(40, 32, dtype=bf)) is None  # out not 16k
    assert avx2.small_rows == cpu_kernels.AVX2_LINEAR_ROWS == 8 and not avx2.amx
    assert avx2.small_rows_ok(torch.randn(8, 32, dtype=bf))
    assert not avx2.small_rows_ok(torch.randn(9, 32, dtype=bf))
    x = torch.tensor([[float("nan"), 1.0], [1.0, 2.0]], dtype=bf)
    y = avx2.small_linear(x, avx2.block_weight(torch.ones(16, 2, dtype=bf)))
    assert y[0].isnan().all() and (y[1] == 3).all()
    with pytest.raises(ValueError, match="x has 30 features, the weight 32"):
        avx2.small_linear(torch.randn(1, 30, dtype=bf), avx2.block_weight(
            torch.randn(64, 32, dtype=bf)))


def test_the_avx2_kernel_is_chosen_only_without_avx512(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(cpu_kernels, "load", lambda: "avx512")
    assert cpu_kernels.linear_kernels_for(cpu, torch.bfloat16) == "avx512"
    assert cpu_kernels.linear_kernels_for(cpu, torch.float32) is None
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    monkeypatch.setattr(cpu_kernels, "load_avx2_linear", lambda: "avx2")
    assert cpu_kernels.linear_kernels_for(cpu, torch.bfloat16) == "avx2"
    assert cpu_kernels.linear_kernels_for(torch.device("meta"), torch.bfloat16) is None
    monkeypatch.undo()
    for flags, env in (({"avx2", "fma", "avx512f"}, "1"), ({"avx2"}, "1"),
                       ({"avx2", "fma"}, "0")):
        monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda f=flags: f)
        monkeypatch.setenv("FLEETLLM_CPU_KERNELS", env)
        cpu_kernels.load_avx2_linear.cache_clear()
        assert cpu_kernels.load_avx2_linear() is None, (flags, env)
    cpu_kernels.load_avx2_linear.cache_clear()


@needs_avx2
def test_an_avx2_engine_decodes_with_the_kernel_as_the_float32_copies_do(monkeypatch):
    """As on an AVX2-only CPU (no AVX-512 kernels, no bf16 oneDNN): every linear layer holds
    a float32 copy, decode batches of up to 8 rows run the AVX2 kernel from a bf16 blocked
    copy (the LM head's too), and decode attention goes through SDPA."""
    import fleetllm.model.layers.linear as linear
    from fleetllm import LLM, SamplingParams
    from fleetllm.default_model import default_model_path

    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    monkeypatch.setattr(linear, "pack_weight", lambda w: None)
    prompts = [{"prompt_token_ids": list(range(3 + i, 40 + 7 * i))} for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    runs = {}
    for name in ("avx2", "float32_copies"):
        monkeypatch.setattr(cpu_kernels, "load_avx2_linear",
                            lambda n=name: avx2_build() if n == "avx2" else None)
        llm = LLM(str(default_model_path()), dtype="bfloat16", skip_tokenizer_init=True)
        try:
            runner = llm.engine_core.executor.driver_worker.worker.model_runner
            layers = [m for m in runner.model.modules() if isinstance(m, PackedMatmul)]
            assert len(layers) == 6 * 4 + 1
            assert all(m.upcast is not None for m in layers)
            assert all((m.blocked is not None) == (name == "avx2") for m in layers)
            assert all(m.attn.sdpa_decode for m in runner.model.modules() if hasattr(m, "attn"))
            # Decodes of 6 rows and of 1 row: both within the kernel's 8.
            outs = [*llm.generate(prompts, params, use_tqdm=False),
                    *llm.generate(prompts[:1], params, use_tqdm=False)]
        finally:
            llm.shutdown()
        runs[name] = [o.outputs[0] for o in outs]
    same = sum(a.token_ids == b.token_ids for a, b in zip(runs["avx2"], runs["float32_copies"]))
    assert same >= 6, same  # one float32 sum each, in two orders: near-ties may swap late
    for a, b in zip(runs["avx2"], runs["float32_copies"]):
        n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                 len(a.token_ids))
        for i in range(n):
            tok = a.token_ids[i]
            assert a.logprobs[i][tok].logprob == pytest.approx(b.logprobs[i][tok].logprob,
                                                              abs=0.05)
