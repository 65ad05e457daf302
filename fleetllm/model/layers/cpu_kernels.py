"""Native CPU kernels, built on first use with the host's C compiler and called through ctypes.

- decode_attention.c: torch has no fused decode attention on CPU. Its SDPA with one query row,
  or two bmm calls around a softmax, read the staged K/V at a half to a third of the memory
  bandwidth (docs/performance.md); the kernel reads K and V once, in float32.
- pointwise.c: residual add + RMSNorm, SiLU-and-mul, rotary embedding and the K/V cache (and
  staging) writes, one call each where torch takes 4-12 small ops (~10 us per norm at batch 1,
  most of it dispatch).
- pointwise.c also has each row's argmax over float32 logits (greedy sampling), which torch
  runs at ~5 GB/s on CPU.
- small_linear.c: x @ w.T for decode batches (up to 64 rows on AMX tiles, 4 without) from a
  blocked copy of a small weight; oneDNN's packed linear costs ~20 us a call at any size,
  2-3x this kernel's time on a matrix of up to a few MiB.

Plain C with AVX-512 intrinsics and no torch headers, so a build takes about a second. It is
compiled with -march=native for the machine at hand and cached under $FLEETLLM_CACHE_DIR
(default $XDG_CACHE_HOME/fleetllm, else ~/.cache/fleetllm), keyed by a hash of the sources, the
compiler, its flags and the CPU's flags. Its OpenMP loops run on the runtime torch has already
loaded (libgomp.so.1), so one thread pool serves both.

Where no kernel can be had (FLEETLLM_CPU_KERNELS=0, not x86-64, no AVX-512, no compiler, a
failed build) `load()` returns None and the caller keeps its pure-torch path; the reason is
logged once per process.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

_HERE = Path(__file__).parent
SOURCES = (_HERE / "decode_attention.c", _HERE / "pointwise.c", _HERE / "small_linear.c")
HEADERS = (_HERE / "kernels.h",)
# head_dim / 16 values the kernel has register-blocked loops for.
_HEAD_DIM_BLOCKS = (1, 2, 4, 8)
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
# The small-batch linear kernel serves up to this many rows and weights of up to this many
# bytes, which it keeps a second, blocked copy of (so larger models' weights are not doubled).
# On AMX tiles it beats oneDNN's packed linear at every row count up to 64 on such weights
# (docs/performance.md); with AVX-512 dot products alone, up to 4 rows (in a decode step
# +19% at 4 rows, -5% at 8).
SMALL_LINEAR_ROWS = 4
SMALL_LINEAR_ROWS_AMX = 64
SMALL_LINEAR_MAX_BYTES = 4 << 20
# The AVX2 build (no AVX-512) serves up to this many rows, from weights of any size.
AVX2_LINEAR_ROWS = 8


def cache_dir() -> Path:
    root = os.environ.get("FLEETLLM_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "fleetllm")
    return Path(root) / "kernels"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _torch_uses_libgomp() -> bool:
    """True when this process has GNU OpenMP loaded (torch's CPU wheels bring it)."""
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _why_unavailable() -> str | None:
    switch = os.environ.get("FLEETLLM_CPU_KERNELS", "1")
    if switch not in ("0", "1"):
        raise ValueError(f"FLEETLLM_CPU_KERNELS must be 0 (off) or 1 (on, the default), "
                         f"not {switch!r}")
    if switch == "0":
        return "FLEETLLM_CPU_KERNELS=0"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"the kernels are x86-64 only (this is {platform.machine()})"
    if "avx512f" not in _cpu_flags():
        return "this CPU has no AVX-512"
    if shutil.which(os.environ.get("CC") or "cc") is None:
        return f"no C compiler ({os.environ.get('CC') or 'cc'}) on PATH: install gcc, or set CC"
    return None


def build(sources: tuple[Path, ...] = SOURCES, headers: tuple[Path, ...] = HEADERS,
          extra_flags: tuple[str, ...] = ()) -> Path:
    """Compiles `sources` into one library in the cache (once per source text, compiler, flags
    and CPU) -> the .so. extra_flags: e.g. ("-mno-avx512bf16",) to build a fallback path."""
    cc = os.environ.get("CC") or "cc"
    flags = ["-O3", "-march=native", *extra_flags, "-shared", "-fPIC", "-std=gnu11"]
    if _torch_uses_libgomp():
        flags.append("-fopenmp")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30,
                             check=True).stdout
    texts = [f.read_text() for f in (*sources, *headers)]
    key = hashlib.sha256("\0".join([*texts, cc, version, *flags,
                                    *sorted(_cpu_flags())]).encode()).hexdigest()[:16]
    out_dir = cache_dir()
    target = out_dir / f"fleetllm-kernels-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed into place: processes that build at the same
    # time each get a whole file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, "-o", tmp, *map(str, sources), "-lm"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            names = ", ".join(f.name for f in sources)
            raise RuntimeError(f"{cc} failed on {names}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@dataclass
class DecodeRanges:
    """Each decode sequence's key range [lo, hi) in the staging copy, for one step."""

    lo: torch.Tensor  # int64 [num_seqs]
    hi: torch.Tensor
    longest: int


class SmallLinearKernels:
    """The small-batch linear kernel's side of a kernel library: which rows and weights it
    takes, the blocked copy, and the product. CpuKernels (AVX-512) and Avx2SmallLinear (AVX2
    and FMA, this kernel only) both have it, and the linear layers need nothing more."""

    amx = False
    max_rows = SMALL_LINEAR_ROWS
    max_bytes: int | None = SMALL_LINEAR_MAX_BYTES

    @staticmethod
    def rows_ok(x: torch.Tensor) -> bool:
        return x.dim() == 2 and x.dtype == torch.bfloat16 and x.stride(1) == 1

    @property
    def small_rows(self) -> int:
        """The most rows the small-batch linear kernel serves."""
        return SMALL_LINEAR_ROWS_AMX if self.amx else self.max_rows

    def small_rows_ok(self, x: torch.Tensor) -> bool:
        """x is few enough rows (small_rows) for the small-batch linear kernel."""
        return x.dim() == 2 and x.shape[0] <= self.small_rows and self.rows_ok(x)

    @classmethod
    def takes_weight(cls, w: torch.Tensor) -> bool:
        """The small-batch linear kernel takes this [out, in] weight (plain or packed): bf16
        on CPU, out a multiple of 16, in even, at most max_bytes (None: any size)."""
        if w.dim() != 2 or w.dtype != torch.bfloat16 or w.device.type != "cpu":
            return False
        out, inp = w.shape
        small = cls.max_bytes is None or w.numel() * 2 <= cls.max_bytes
        return 0 < out and out % 16 == 0 and inp % 2 == 0 and small

    @classmethod
    def block_weight(cls, w: torch.Tensor) -> torch.Tensor | None:
        """The small-batch linear kernel's copy of a plain [out, in] weight: blocks of 16
        output rows with the inputs paired, [out / 16, in / 2, 16, 2]; None where the kernel
        does not take it (takes_weight)."""
        if not cls.takes_weight(w):
            return None
        out, inp = w.shape
        # Each input pair moved as one int32: 2.2x faster than permuting 2-byte elements.
        pairs = w.contiguous().view(torch.int32).reshape(out // 16, 16, inp // 2)
        return pairs.transpose(1, 2).contiguous().view(torch.bfloat16).reshape(
            out // 16, inp // 2, 16, 2)

    def small_linear(self, x: torch.Tensor, blocked: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [rows, in] bf16 (rows_ok) @ w.T (+ bias), from block_weight(w) -> [rows, out],
        each output summed in float32 and rounded once, as oneDNN rounds it."""
        nb, half, _, _ = blocked.shape
        rows, inp = x.shape
        if inp != 2 * half:
            raise ValueError(f"small linear: x has {inp} features, the weight {2 * half}")
        if bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_contiguous()):
            raise TypeError("small linear: the bias must be contiguous bf16")
        out = torch.empty(rows, nb * 16, dtype=torch.bfloat16)
        self._linear(x.data_ptr(), x.stride(0), rows, blocked.data_ptr(), nb * 16, inp,
                     None if bias is None else bias.data_ptr(), out.data_ptr())
        return out

    def _linear(self, *args: int | None) -> None:
        raise NotImplementedError



class Avx2SmallLinear(SmallLinearKernels):
    """small_linear_avx2.c: the small-batch linear kernel alone, for CPUs with AVX2 and FMA
    but no AVX-512, where the other kernels cannot run. There the linear layers' other path is
    oneDNN's float32 GEMM on float32 copies (linear.py), which reads twice the bytes: this
    kernel beats it up to 8 rows (2.6x at one row on a 1536 x 576 weight, 3.4x on SmolLM's
    49,152 x 576 LM head) on weights of any size."""

    max_rows = AVX2_LINEAR_ROWS
    max_bytes = None

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        self._fn = self._lib.fl_small_linear_avx2
        self._fn.argtypes = [_PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR]
        self._fn.restype = None

    def _linear(self, *args: int | None) -> None:
        self._fn(*args)


class CpuKernels(SmallLinearKernels):
    """The loaded library, with typed wrappers around its entry points."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        fn = self._lib.fl_decode_attention
        fn.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _I64,
                       ctypes.c_float, _I64, _PTR]
        fn.restype = ctypes.c_int
        self._decode = fn
        self._add_rms_norm = self._lib.fl_add_rms_norm
        self._add_rms_norm.argtypes = [_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, ctypes.c_float,
                                       _PTR, _PTR]
        self._add_rms_norm.restype = None
        self._silu_and_mul = self._lib.fl_silu_and_mul
        self._silu_and_mul.argtypes = [_PTR, _I64, _I64, _I64, _PTR]
        self._silu_and_mul.restype = None
        self._rotate = self._lib.fl_rotate
        self._rotate.argtypes = [_PTR, _I64, _I64, _I64, _I64, _PTR, _PTR]
        self._rotate.restype = None
        self._store_kv = self._lib.fl_store_kv
        self._store_kv.argtypes = [_PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _I64, _PTR,
                                   _PTR, _I64, _PTR, _I64, _PTR, _PTR]
        self._store_kv.restype = _I64
        self._small_linear = self._lib.fl_small_linear
        self._small_linear.argtypes = [_PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR,
                                       ctypes.c_int]
        self._small_linear.restype = None
        # AMX tiles for the small linear layers: the CPU has them, the library was built
        # with them, and Linux grants the tile state to this process.
        flags = _cpu_flags()
        self.amx = ("amx_bf16" in flags and "amx_tile" in flags
                    and bool(self._lib.fl_amx_init()))
        self._argmax = self._lib.fl_argmax
        self._argmax.argtypes = [_PTR, _I64, _I64, _I64, _PTR]
        self._argmax.restype = None

    def _linear(self, *args: int | None) -> None:
        self._small_linear(*args, int(self.amx))

    # The pointwise kernels take bf16 rows with a unit last stride (any row stride, rows_ok)
    # and return fresh contiguous tensors; callers check `rows_ok` and keep torch's ops
    # otherwise.

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight * rms_norm(x + delta), x + delta), rounded as torch's ops round them;
        delta None: (weight * rms_norm(x), x)."""
        rows, n = x.shape
        out = torch.empty(rows, n, dtype=x.dtype)
        total = x if delta is None else torch.empty(rows, n, dtype=x.dtype)
        self._add_rms_norm(x.data_ptr(), x.stride(0),
                           None if delta is None else delta.data_ptr(),
                           0 if delta is None else delta.stride(0), weight.data_ptr(), rows, n,
                           eps, total.data_ptr(), out.data_ptr())
        return out, total

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x: [rows, 2n] (gate | up) -> silu(gate) * up, [rows, n]."""
        rows, n = x.shape[0], x.shape[1] // 2
        out = torch.empty(rows, n, dtype=x.dtype)
        self._silu_and_mul(x.data_ptr(), x.stride(0), rows, n, out.data_ptr())
        return out

    @staticmethod
    def rotate_ok(x: torch.Tensor, cos: torch.Tensor) -> bool:
        """x [tokens, heads, d] bf16 with heads d apart (d up to 512), cos contiguous."""
        return (x.dtype == torch.bfloat16 and x.stride(2) == 1 and x.stride(1) == x.shape[2]
                and x.shape[2] <= 512 and cos.is_contiguous())

    def rotate_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding in place: x [tokens, heads, d], heads d apart and a unit last
        stride; cos, sin [tokens, 1, d] contiguous. -> x."""
        t, heads, d = x.shape
        self._rotate(x.data_ptr(), t, x.stride(0), heads, d, cos.data_ptr(), sin.data_ptr())
        return x

    @staticmethod
    def kv_ok(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor) -> bool:
        """k, v [tokens, kv_heads, d] bf16 with each token's heads contiguous (any token
        stride: at one token, a view's stride(0) is whatever the view made it); both caches
        contiguous and of one shape."""
        d = k.shape[-1]
        return (k.dtype == v.dtype == k_cache.dtype == torch.bfloat16
                and k.stride()[1:] == v.stride()[1:] == (d, 1)
                and k_cache.is_contiguous() and v_cache.is_contiguous()
                and k_cache.shape == v_cache.shape)

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor,
                 stage: tuple[torch.Tensor, torch.Tensor] | None = None,
                 stage_rows: torch.Tensor | None = None) -> None:
        """Each token's K/V to its cache slot (slots: int64 [tokens]); with `stage`, the first
        len(stage_rows) / kv_heads tokens' heads also to the staging rows (rows of d) of the
        staging (keys, values). Every index is checked before anything is written."""
        tokens, kvh, d = k.shape
        # Only the index types are checked here (kv_ok checks the rest): the kernel checks
        # every index against the buffers' sizes before it writes.
        if slots.dtype != torch.int64 or len(slots) != tokens or slots.stride(0) != 1:
            raise TypeError("KV store: slots must be contiguous int64, one per token")
        if stage is None:
            staged, rows, ks, vs, num_rows = 0, None, None, None, 0
        else:
            if stage_rows.dtype != torch.int64 or stage_rows.stride(0) != 1:
                raise TypeError("KV store: staging rows must be contiguous int64")
            staged, rows = len(stage_rows) // kvh, stage_rows.data_ptr()
            ks, vs, num_rows = stage[0].data_ptr(), stage[1].data_ptr(), stage[0].numel() // d
        bad = self._store_kv(k.data_ptr(), v.data_ptr(), k.stride(0), v.stride(0), tokens, kvh,
                             d, slots.data_ptr(), k_cache.numel() // (kvh * d),
                             k_cache.data_ptr(), v_cache.data_ptr(), staged, rows, num_rows, ks,
                             vs)
        if bad:
            which = (f"slot {slots[bad - 1].item()} of token {bad - 1} is outside the cache"
                     if bad <= tokens else f"staging row {stage_rows[bad - 1 - tokens].item()} "
                     "is outside the staging copy")
            raise IndexError(f"KV store: {which}")

    @staticmethod
    def argmax_ok(x: torch.Tensor) -> bool:
        """x: [rows, n > 0] float32 on CPU with a unit last stride."""
        return (x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu"
                and x.shape[1] > 0 and x.stride(1) == 1)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """x.argmax(-1) as torch picks it (the first largest, or the first NaN) -> int64."""
        out = torch.empty(x.shape[0], dtype=torch.int64)
        self._argmax(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr())
        return out

    @staticmethod
    def decode_ranges(lens: np.ndarray, sliding_window: int | None) -> DecodeRanges:
        """lens: keys held per sequence after this step (the current token included)."""
        hi = np.ascontiguousarray(lens, dtype=np.int64)
        lo = (np.maximum(hi - sliding_window, 0) if sliding_window else np.zeros_like(hi))
        return DecodeRanges(torch.from_numpy(lo), torch.from_numpy(hi),
                            int((hi - lo).max()) if len(hi) else 0)

    def decode_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         ranges: DecodeRanges, scale: float, splits: int | None = None,
                         ) -> torch.Tensor:
        """q: [b, kv_heads * g, d] (rows contiguous); keys, values: the staging copy,
        [b, kv_heads, capacity, d], contiguous; all bf16 -> [b, kv_heads * g * d]. splits:
        key ranges per (sequence, kv head), merged at the end; None chooses."""
        b, kvh, cap, d = keys.shape
        assert q.dtype == keys.dtype == values.dtype == torch.bfloat16 and q.stride(2) == 1
        assert keys.is_contiguous() and values.is_contiguous()
        heads = q.shape[1]
        # With fewer (sequence, kv head) items than threads, each one's keys are split.
        if splits is None:
            threads = torch.get_num_threads()
            splits = 1
            if b * kvh < threads and ranges.longest >= 256:
                splits = -(-threads // (b * kvh))
        splits = max(1, min(splits, 64))  # the merge holds 64 weights
        out = torch.empty(b, heads * d, dtype=q.dtype)
        rc = self._decode(q.data_ptr(), q.stride(0), q.stride(1), keys.data_ptr(),
                          values.data_ptr(), cap, ranges.lo.data_ptr(), ranges.hi.data_ptr(), b,
                          kvh, heads // kvh, d, scale, splits, out.data_ptr())
        if rc != 0:
            raise MemoryError("decode attention: no scratch memory for the kernel")
        return out


@cache
def load() -> CpuKernels | None:
    """The process's kernels, built or taken from the cache; None where none can be had."""
    reason = _why_unavailable()
    if reason is not None:
        logger.info("CPU kernels not used: %s; decode attention, norms and activations "
                    "stay on torch ops", reason)
        return None
    try:
        return CpuKernels(build())
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        logger.warning("CPU kernels not built, decode attention, norms and activations stay "
                       "on torch ops (slower): %s. Set FLEETLLM_CPU_KERNELS=0 to skip the "
                       "build.", e)
        return None


AVX2_SOURCES = (_HERE / "small_linear_avx2.c",)


@cache
def load_avx2_linear() -> Avx2SmallLinear | None:
    """The small-batch linear kernel alone, for x86-64 CPUs with AVX2 and FMA but no AVX-512
    (where `load()` has no kernels); None where it cannot be had (or AVX-512 is there)."""
    flags = _cpu_flags()
    if os.environ.get("FLEETLLM_CPU_KERNELS", "1") == "0" or "avx512f" in flags:
        return None
    if (platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma"} <= flags
            or shutil.which(os.environ.get("CC") or "cc") is None):
        return None
    try:
        return Avx2SmallLinear(build(AVX2_SOURCES, ()))
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        logger.warning("the AVX2 small linear kernel was not built, decode batches' linear "
                       "layers stay on float32 copies (slower at batch 1): %s", e)
        return None


def linear_kernels_for(device: torch.device, dtype: torch.dtype,
                       ) -> SmallLinearKernels | None:
    """The small-batch linear kernel for this model (bf16 on CPU): the AVX-512 library's, or
    on a CPU with only AVX2 the AVX2 build."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return None
    return load() or load_avx2_linear()


def kernels_for(device: torch.device, dtype: torch.dtype) -> CpuKernels | None:
    """The kernels when they apply to this model: bf16 on CPU. Other dtypes keep torch's ops
    (float32 stays bit-identical to transformers)."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return None
    return load()


def decode_kernels_for(device: torch.device, dtype: torch.dtype, head_dim: int,
                       ) -> CpuKernels | None:
    """The kernels when decode attention applies too: head_dim a multiple of 16 up to 128."""
    if head_dim % 16 or head_dim // 16 not in _HEAD_DIM_BLOCKS:
        return None
    return kernels_for(device, dtype)
