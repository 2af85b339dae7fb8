"""The fused CPU attention kernel (``csrc/attention.c``): built on first use, loaded with ctypes.

``attend_fused(q, k, v, scale, causal_offset, runs)`` computes what ``attention_kernels.attend`` does (output
and log-sum-exp, grouped-query, bottom-right causal) in one pass per (KV head, query tile) with an online
softmax, for float32 and bfloat16 on x86-64 CPUs with AVX-512 (bfloat16 also needs AVX512_BF16). ``k, v``
are ``[S, KVH, D]`` tensors, or a layer's whole cache with ``runs`` naming the slot ranges to read, in
order: a prefix made of several runs of blocks is read in place, with no gather or concatenation.

The library is compiled once per source version, compiler flags and machine into
``$PREFIXCACHE_KERNEL_DIR`` (default ``~/.cache/prefixcache/kernels``; a private temporary folder where
that is not writable) with the system C compiler (``$CC``, else ``cc``; about a second), written to a
temporary name and renamed, so that workers starting together never load a half-written file. It links the
same ``libgomp.so.1`` torch has already loaded, so its threads are torch's OpenMP pool, not a second one
competing for the cores. Where it cannot be used (another architecture, no
AVX-512, no compiler, a head size that is not a multiple of 64, or ``PREFIXCACHE_FUSED_ATTENTION=0``),
``kernel()`` is None and attention_kernels.py runs its torch kernels, as it did before this file.

The same library holds ``csrc/ops.c`` (the decoder's element-wise steps and a small-batch GEMM, used
through fused_ops.py). Where the CPU has AMX and the compiler knows it, bfloat16 row tiles run on AMX tiles
(``PREFIXCACHE_AMX=0``: the AVX-512 ones); a compiler without AMX builds the library without it.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).resolve().parent / "csrc" / name for name in ("attention.c", "ops.c")]
AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}  # what -march=x86-64-v4 may emit
FLAGS = ["-O3", "-march=x86-64-v4", "-mavx512bf16", "-fopenmp", "-fPIC", "-shared"]
# AMX tiles for the bfloat16 row tiles where the CPU has them (Sapphire Rapids and later); the library is
# built with them wherever the compiler knows them (gcc 11+, clang 12+) and uses them only where the CPU
# and the kernel (arch_prctl) allow.
AMX_FLAGS = ["-mamx-tile", "-mamx-bf16", "-DPC_AMX"]
AMX = {"amx_tile", "amx_bf16"}
_lock = threading.Lock()
_state: dict = {}


class Kernel(NamedTuple):
    runs: object  # pc_attend: keys from slot ranges
    rows: object  # pc_attend_rows: keys from a row-index array
    batch: object  # pc_attend_batch: one query token per sequence, each against its own slots
    bf16: bool  # the CPU has AVX512_BF16
    amx: object  # pc_amx_enable(on) -> whether bfloat16 row tiles run on AMX
    lib: object  # the ctypes library (ops.c's entry points: fused_ops.py)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _build(path: Path, flags: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        cc = os.environ.get("CC", "cc")
        proc = subprocess.run([cc, *flags, "-o", tmp, *map(str, SOURCES), "-lm"], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _built(path: Path, flags: list[str]) -> Path:
    """The library at ``path``, compiled first if it is not there."""
    if path.exists():
        return path
    try:
        _build(path, flags)
    except OSError as exc:  # no writable cache folder (a read-only home): a private folder of this process
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        path = Path(tempfile.mkdtemp(prefix="prefixcache-kernels-")) / path.name
        _build(path, flags)
    return path


def _load():
    if os.environ.get("PREFIXCACHE_FUSED_ATTENTION", "1") == "0":
        return None, "disabled by PREFIXCACHE_FUSED_ATTENTION=0"
    if platform.machine() not in ("x86_64", "AMD64"):
        return None, f"not x86-64 ({platform.machine()})"
    cpu = _cpu_flags()
    if not AVX512 <= cpu:
        return None, f"no AVX-512 (missing {sorted(AVX512 - cpu)})"
    src = b"".join(p.read_bytes() for p in SOURCES)
    root = Path(os.environ.get("PREFIXCACHE_KERNEL_DIR") or Path.home() / ".cache" / "prefixcache" / "kernels")
    errors = []
    for flags in (FLAGS + AMX_FLAGS, FLAGS):  # a compiler that does not know AMX builds the rest
        key = hashlib.sha256(src + " ".join(flags).encode() + torch.__version__.encode()).hexdigest()[:16]
        try:
            lib = ctypes.CDLL(str(_built(root / f"attention-{key}.so", flags)))
            break
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            errors.append(str(exc))
    else:
        return None, f"could not build or load the kernel: {errors[-1]}"
    i64, vp, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    tail = [vp, vp, c_int, c_int, c_int, c_int, ctypes.c_float, i64, c_int]
    runs_fn, rows_fn, batch_fn = lib.pc_attend, lib.pc_attend_rows, lib.pc_attend_batch
    runs_fn.argtypes = [c_int, vp, i64, vp, vp, i64, i64, vp, vp, c_int, *tail]
    rows_fn.argtypes = [c_int, vp, i64, vp, vp, i64, i64, vp, i64, *tail]
    batch_fn.argtypes = [c_int, vp, i64, vp, vp, i64, i64, vp, i64, vp, vp, vp, c_int, c_int, c_int, c_int,
                         ctypes.c_float, c_int]
    runs_fn.restype = rows_fn.restype = batch_fn.restype = c_int
    amx_fn = lib.pc_amx_enable
    amx_fn.argtypes, amx_fn.restype = [c_int], c_int
    amx_fn(int(AMX <= cpu and os.environ.get("PREFIXCACHE_AMX", "1") != "0"))
    return Kernel(runs_fn, rows_fn, batch_fn, "avx512_bf16" in cpu, amx_fn, lib), lib._name


def kernel() -> Kernel | None:
    """The loaded library's entry points, or None; built and loaded once per process."""
    if "kernel" not in _state:
        with _lock:
            if "kernel" not in _state:
                k, why = _load()
                _state["kernel"], _state["why"] = k, why
                if k is None:
                    log.info("fused CPU attention off: %s", why)
    return _state["kernel"]


def why_not() -> str:
    kernel()
    return _state["why"]


def supports(q: torch.Tensor) -> bool:
    """Whether ``attend_fused`` takes these queries (device, dtype, head size)."""
    if q.device.type != "cpu" or q.shape[-1] % 64 != 0 or q.shape[-1] > 256:
        return False
    if q.dtype not in (torch.float32, torch.bfloat16):
        return False
    k = kernel()
    return k is not None and (q.dtype == torch.float32 or k.bf16)


def _check(rc: int, what: str) -> None:
    if rc == 4:
        raise IndexError(f"fused attention: a key slot is outside the cache ({what})")
    if rc != 0:
        raise ValueError(f"fused attention rejected the shapes (code {rc}): {what}")


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    """``x [N, heads, D]`` with heads D apart and D contiguous (a copy only when it is not)."""
    if x.stride(2) != 1 or x.stride(1) != x.shape[2]:
        x = x.contiguous()
    return x


def attend_fused(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal_offset: int | None = None,
    runs: list[tuple[int, int]] | None = None, slots: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend``'s contract: ``q [T, H, D]`` x keys -> (out ``[T, H, D]``, lse ``[T, H]`` float32). Keys are
    all rows of ``k, v [S, KVH, D]``, or rows of a cache ``k, v [num_slots, KVH, D]``: the slot ranges
    ``runs`` in order, or the slots ``slots`` (int64)."""
    lib = kernel()
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q = _rows_view(q)
    k = _rows_view(k)
    v = _rows_view(v)
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    if v.dtype != q.dtype:
        v = v.to(q.dtype)
    if k.stride(0) != v.stride(0):
        k, v = k.contiguous(), v.contiguous()
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype)
    lse = torch.empty((num_tokens, num_heads), dtype=torch.float32)
    tail = (out.data_ptr(), lse.data_ptr(), num_tokens, num_heads, num_kv_heads, head_dim, float(scale),
            -1 if causal_offset is None else int(causal_offset), torch.get_num_threads())
    # Every key row is checked against the cache's length in C before anything is read (code 4).
    head = (int(q.dtype == torch.bfloat16), q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(), k.stride(0),
            min(k.shape[0], v.shape[0]))
    if slots is not None:
        slots = slots.to(torch.int64).contiguous()
        rc = lib.rows(*head, slots.data_ptr(), slots.numel(), *tail)
    else:
        if runs is None:
            runs = [(0, k.shape[0])]
        starts = (ctypes.c_int64 * len(runs))(*(a for a, _ in runs))
        lens = (ctypes.c_int64 * len(runs))(*(b - a for a, b in runs))
        rc = lib.runs(*head, starts, lens, len(runs), *tail)
    _check(rc, f"q {tuple(q.shape)}, k {tuple(k.shape)}")
    return out, lse


def attend_fused_batch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, lens: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token per sequence: ``q [B, H, D]``, sequence ``b`` against cache slots ``slots[b, :lens[b]]``
    (``slots [B, W]`` int64, padded past each length) -> (out ``[B, H, D]``, lse ``[B, H]`` float32)."""
    lib = kernel()
    num_seqs, num_heads, head_dim = q.shape
    q = _rows_view(q)
    slots = slots.to(torch.int64).contiguous()
    lens = lens.to(torch.int64).contiguous()
    if lens.numel() != num_seqs or slots.dim() != 2 or slots.shape[0] != num_seqs:
        raise ValueError(f"fused attention: {num_seqs} queries, slots {tuple(slots.shape)}, lens {tuple(lens.shape)}")
    out = torch.empty((num_seqs, num_heads, head_dim), dtype=q.dtype)
    lse = torch.empty((num_seqs, num_heads), dtype=torch.float32)
    rc = lib.batch(int(q.dtype == torch.bfloat16), q.data_ptr(), q.stride(0), k_cache.data_ptr(),
                   v_cache.data_ptr(), k_cache.stride(0), min(k_cache.shape[0], v_cache.shape[0]), slots.data_ptr(),
                   slots.shape[1], lens.data_ptr(), out.data_ptr(), lse.data_ptr(), num_seqs, num_heads,
                   k_cache.shape[1], head_dim, float(scale), torch.get_num_threads())
    _check(rc, f"q {tuple(q.shape)}, slots {tuple(slots.shape)}")
    return out, lse


def supports_cache(q: torch.Tensor, k_cache: torch.Tensor, k_scale: torch.Tensor | None,
                   v_cache: torch.Tensor | None = None) -> bool:
    """Whether the fused kernel reads this cache in place for these queries (unquantized, same dtype,
    contiguous K and V of one layout: the kernel reads both with K's row stride)."""
    if k_scale is not None or k_cache.dtype != q.dtype or not k_cache.is_contiguous():
        return False
    if v_cache is not None and (v_cache.dtype != q.dtype or v_cache.shape != k_cache.shape
                                or not v_cache.is_contiguous()):
        return False
    return supports(q)


__all__ = ["attend_fused", "attend_fused_batch", "kernel", "supports", "supports_cache", "why_not"]
