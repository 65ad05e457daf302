"""The native CPU decode-attention kernel: exact to float32 against a float64 reference, on
every shape it accepts; built once and cached; sharing torch's OpenMP runtime; and a missing
compiler or FLEETLLM_CPU_KERNELS=0 leaves the torch path in place."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import numpy as np
import pytest
import torch

from fleetllm.model.layers import cpu_kernels
from fleetllm.model.layers.cpu_kernels import CpuKernels, decode_kernels_for

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


@needs_kernel
def test_the_kernel_serves_a_bf16_engine_as_closely_as_the_torch_path(monkeypatch):
    from fleetllm import LLM, SamplingParams
    from fleetllm.default_model import default_model_path

    prompts = [{"prompt_token_ids": list(range(3 + i, 40 + 7 * i))} for i in range(3)]
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
            outs = llm.generate(prompts, params, use_tqdm=False)
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
