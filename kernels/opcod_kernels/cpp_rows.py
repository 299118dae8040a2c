"""Builds csrc/jsd_rows.cpp with the system compiler on first use and calls its row kernel."""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

_SOURCE_NAME = "jsd_rows.cpp"
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None


def _source_path() -> Path:
    here = Path(__file__).resolve().parent
    # A wheel ships the source inside the package; a checkout keeps it in the top-level csrc/.
    for candidate in (here / "csrc" / _SOURCE_NAME, here.parents[1] / "csrc" / _SOURCE_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{_SOURCE_NAME} not found next to {here}")


def _cache_dir() -> Path:
    root = os.environ.get("OPCOD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "opcod")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    # -march=native code must not be reused on a machine with other instruction sets.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _build() -> ctypes.CDLL:
    src = _source_path()
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found: install g++ (e.g. apt install g++) or set CXX to one")
    # With ATen pinned to AVX2 (opcod's demo pins it), the kernel is built for that level too, so
    # its vector sums run in one order on every machine with AVX2; otherwise for this machine.
    pinned = os.environ.get("ATEN_CPU_CAPABILITY", "").lower() == "avx2" and platform.machine() == "x86_64"
    flags = ["-O3", "-march=x86-64-v3" if pinned else "-march=native", "-fno-trapping-math", "-fopenmp",
             "-shared", "-fPIC", "-std=c++17"]
    key = hashlib.sha256(src.read_bytes() + " ".join([cxx, *flags]).encode()
                         + _cpu_signature().encode()).hexdigest()[:16]
    out = _cache_dir() / f"libopcod_jsd_rows_{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename, so concurrent ranks never load a half-written file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        proc = subprocess.run([cxx, *flags, str(src), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"{cxx} failed on {src}:\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)
    lib = ctypes.CDLL(str(out))
    fn = lib.opcod_jsd_rows
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_int]
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled library, or None (after one warning) when it cannot be built here."""
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is None and _failed is None:
            try:
                _lib = _build()
            except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch path
                _failed = str(exc)
                warnings.warn(f"opcod_kernels: the C++ CPU kernel is unavailable, so the CPU loss runs the "
                              f"slower chunked PyTorch path ({_failed.splitlines()[0]})", stacklevel=3)
    return _lib


def available() -> bool:
    return load() is not None


def jsd_rows(zs: torch.Tensor, zt: torch.Tensor, row_scale: torch.Tensor, loss: torch.Tensor,
             inv_ts: float, inv_tt: float, beta: float, write_grad: bool,
             grad_out: torch.Tensor | None = None) -> None:
    """Per-row loss into `loss`; if write_grad, zs becomes row_scale * dL/dz_s (fp32, CPU), also
    copied into grad_out (e.g. bf16) when given."""
    lib = load()
    assert lib is not None, "call available() first"
    C, V = zs.shape
    assert zs.stride(1) == 1 and zt.stride(1) == 1 and row_scale.is_contiguous() and loss.is_contiguous()
    lib.opcod_jsd_rows(zs.data_ptr(), zs.stride(0), zt.data_ptr(), zt.stride(0),
                       row_scale.data_ptr(), loss.data_ptr(), C, V, inv_ts, inv_tt, beta,
                       int(write_grad), torch.get_num_threads())
    if write_grad and grad_out is not None:
        grad_out.copy_(zs)
