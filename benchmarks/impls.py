"""The implementations the kernel benchmarks compare, each one fwd+bwd on the same inputs."""
from __future__ import annotations

import importlib.util
import os

import torch

import opcod_kernels as K
from opcod_kernels import fused as F

CUDA = torch.cuda.is_available()
H = int(os.environ.get("OPCOD_BENCH_H", 4096 if CUDA else 512))
V = int(os.environ.get("OPCOD_BENCH_V", 151936))
DTYPE = torch.bfloat16 if CUDA else torch.float32
DEVICE = "cuda" if CUDA else "cpu"
SIZES = [int(n) for n in os.environ.get("OPCOD_BENCH_N", "2048,8192,16384" if CUDA else "1024").split(",")]
TOPK = 100  # SDPO's distillation_topk
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None


def make_inputs(n: int, seed: int = 0):
    g = torch.Generator(DEVICE).manual_seed(seed)  # drawn where they are used: no host copy of W
    hs = torch.randn(n, H, generator=g, device=DEVICE)
    ht = hs + 0.1 * torch.randn(n, H, generator=g, device=DEVICE)  # a teacher near the student, as in SDPO
    W = torch.randn(V, H, generator=g, device=DEVICE) / H ** 0.5
    return [t.to(DTYPE) for t in (hs, ht, W)]


def grad_bytes(n: int, impl: str) -> int:
    """The gradients an implementation ends up holding: dH and dW in the input dtype, plus, for
    ours, the fp32 dW accumulator the spec asks for when the inputs are not fp32."""
    item = torch.finfo(DTYPE).bits // 8
    low = DTYPE != torch.float32
    if impl == "gemm_floor":  # no backward: dH and the accumulator, never the returned dW
        return n * H * item + V * H * (4 if low else item)
    acc = V * H * 4 if impl == "fused" and low else 0
    return n * H * item + V * H * item + acc


def _leaves(hs, W):
    return hs.detach().requires_grad_(), W.detach().requires_grad_()


def fused(hs, ht, W):
    a, Wa = _leaves(hs, W)
    K.fused_linear_jsd(a, ht, Wa, beta=0.5).backward()


def fused_top100(hs, ht, W):
    """SDPO's top-100 + tail objective in the same chunked op."""
    a, Wa = _leaves(hs, W)
    K.fused_linear_jsd(a, ht, Wa, beta=0.5, topk=TOPK, tail=True).backward()


def gemm_floor(hs, ht, W):
    """The fused op's own GEMMs (stacked logits, dH, dW) with the row kernel replaced by nothing."""
    chunk = K.default_chunk_size(hs.shape[0], W.shape[0], hs.device)
    noop = lambda *args, **kwargs: None  # noqa: E731
    F._chunked(hs, ht, W, None, torch.ones(hs.shape[0], device=hs.device), 0.5, 1.0, 1.0, chunk,
               noop, W.shape[0], True, True, True)


def naive(hs, ht, W):
    a, Wa = _leaves(hs, W)
    K.reference_fused_linear_jsd(a, ht, Wa, beta=0.5).backward()


def naive_top100(hs, ht, W):
    """Top-100 + tail as SDPO computes it: full-vocabulary logits and log-softmaxes materialized."""
    from opcod_kernels.reference import reference_topk_jsd
    a, Wa = _leaves(hs, W)
    reference_topk_jsd(a @ Wa.T, ht @ W.T, topk=TOPK, tail=True, beta=0.5).backward()


def liger_chunked(hs, ht, W):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    a, Wa = _leaves(hs, W)
    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5,
                                      compiled=False)
    labels = torch.zeros(hs.shape[0], dtype=torch.long, device=hs.device)
    loss_fn(a, Wa, ht, W, labels).backward()


def liger_triton(hs, ht, W):
    from liger_kernel.transformers import LigerFusedLinearJSD
    a, Wa = _leaves(hs, W)
    LigerFusedLinearJSD(jsd_beta=0.5)(a, Wa, ht, W, None).backward()


IMPLS = {"fused": fused, "gemm_floor": gemm_floor, "naive": naive, "liger_chunked": liger_chunked,
         "fused_top100": fused_top100, "naive_top100": naive_top100}
if CUDA:
    IMPLS["liger_triton"] = liger_triton


def peak_bytes(name: str, n: int) -> int:
    """Memory the implementation needs beyond its inputs: CUDA peak allocation, or on CPU the
    growth of this process's peak RSS (so run it in a fresh process, see measure_memory.py)."""
    hs, ht, W = make_inputs(n)
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        IMPLS[name](hs, ht, W)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _cpu_peak_growth(lambda: IMPLS[name](hs, ht, W))


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _cpu_peak_growth(fn) -> int:
    # Reset the peak-RSS watermark (Linux: write 5 to clear_refs) so that the temporaries made
    # while building the inputs do not hide a smaller peak.
    import gc
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) * 1024
