"""Fused linear + generalized-JSD loss: chunked over rows, never holding [N, V] logits."""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from . import cpp_rows, torch_rows

BACKENDS = ("auto", "triton", "cpp", "torch")
REDUCTIONS = ("mean", "sum", "none")
# Workspace for one chunk of logits (fp32 student + teacher rows, plus a bf16 copy on CUDA).
# CUDA: 768 MiB of logits rows keep the whole workspace (with cuBLAS's own) under 1 GiB.
DEFAULT_BUDGET_BYTES = {"cuda": 768 << 20, "cpu": 1 << 29}


# ----------------------------------------------------------------------------- validation

def _check_float(name, t):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dtype == torch.float16:
        # The chunk's gradient tile is stored in the input dtype; fp16's range underflows it.
        raise ValueError(f"{name} is float16, which this kernel refuses (its gradients underflow): "
                         "use bfloat16 or float32")


def _validate(student, teacher, weight, teacher_weight, beta, ts, tt, token_weights,
              reduction, chunk_size, backend, vocab_size, logits=False):
    what = "logits" if logits else "hidden"
    _check_float(f"student_{what}", student)
    _check_float(f"teacher_{what}", teacher)
    if student.dim() != 2:
        raise ValueError(f"student_{what} must be 2-D [N, {'V' if logits else 'H'}], got shape {tuple(student.shape)}")
    if teacher.dim() != 2 or teacher.shape[0] != student.shape[0]:
        raise ValueError(f"teacher_{what} must be 2-D with the same N as student_{what} "
                         f"({student.shape[0]}), got shape {tuple(teacher.shape)}")
    devices = {student.device, teacher.device}
    if not logits:
        _check_float("weight", weight)
        if weight.dim() != 2 or weight.shape[1] != student.shape[1]:
            raise ValueError(f"weight must be [V, H] with H = student_hidden.shape[1] = "
                             f"{student.shape[1]}, got shape {tuple(weight.shape)}")
        if weight.dtype != student.dtype:
            raise ValueError(f"weight dtype {weight.dtype} differs from student_hidden dtype {student.dtype}")
        tw = weight if teacher_weight is None else teacher_weight
        if teacher_weight is not None:
            _check_float("teacher_weight", teacher_weight)
            if teacher_weight.dim() != 2:
                raise ValueError(f"teacher_weight must be 2-D [V_t, H_t], got shape {tuple(teacher_weight.shape)}")
        if teacher.shape[1] != tw.shape[1]:
            raise ValueError(f"teacher_hidden must be [N, {tw.shape[1]}] to match "
                             f"{'teacher_weight' if teacher_weight is not None else 'weight'}, "
                             f"got shape {tuple(teacher.shape)}")
        if teacher.dtype != tw.dtype:
            raise ValueError(f"teacher_hidden dtype {teacher.dtype} differs from its weight's {tw.dtype}")
        devices |= {weight.device, tw.device}
        widths = (weight.shape[0], tw.shape[0])
    else:
        widths = (student.shape[1], teacher.shape[1])
    if vocab_size is not None and (not isinstance(vocab_size, int) or not 0 < vocab_size <= min(widths)):
        raise ValueError(f"vocab_size must be an int in [1, {min(widths)}] (the narrower vocabulary), "
                         f"got {vocab_size!r}")
    if token_weights is not None:
        if not isinstance(token_weights, torch.Tensor):
            raise ValueError("token_weights must be a tensor of shape [N]")
        if not (token_weights.is_floating_point() or token_weights.dtype == torch.bool):
            raise ValueError(f"token_weights must be float or bool, got dtype {token_weights.dtype}")
        if tuple(token_weights.shape) != (student.shape[0],):
            raise ValueError(f"token_weights must have shape [{student.shape[0]}], got {tuple(token_weights.shape)}")
        devices.add(token_weights.device)
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    if not isinstance(beta, (int, float)) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    for name, t in (("student_temperature", ts), ("teacher_temperature", tt)):
        if not isinstance(t, (int, float)) or not float(t) > 0.0 or float(t) == float("inf"):
            raise ValueError(f"{name} must be a positive finite number, got {t!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return vocab_size or min(widths)


# ----------------------------------------------------------------------------- dispatch

def _rows_fn(backend: str, device: torch.device, group=None, topk: int = 0, tail: bool = True):
    """The row kernel for a backend: (zs, zt, row_scale, loss, inv_ts, inv_tt, beta, write_grad,
    grad_out=None). With a process group (the vocabulary split over its ranks) the row scalars are
    all-reduced, and top-k distillation works on the chunk's rows, in plain PyTorch ops on any backend."""
    if topk:
        return functools.partial(torch_rows.topk_rows, k=topk, tail=tail)
    if group is not None:
        return functools.partial(torch_rows.jsd_rows_sharded, group=group)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "cpp"
    if backend == "triton":
        from . import triton_rows  # imported lazily: machines without triton still get cpp/torch
        return triton_rows.jsd_rows
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' needs CPU tensors, got {device}")
        return cpp_rows.jsd_rows if cpp_rows.available() else torch_rows.jsd_rows
    return torch_rows.jsd_rows


def default_chunk_size(n_rows: int, vocab: int, device: torch.device, budget_bytes: int | None = None) -> int:
    """Rows per chunk so that the logits workspace stays within the memory budget."""
    budget = budget_bytes or DEFAULT_BUDGET_BYTES["cuda" if device.type == "cuda" else "cpu"]
    per_row = vocab * (8 + (2 if device.type == "cuda" else 0))
    rows = max(1, budget // per_row)
    if rows >= 64:
        rows -= rows % 64  # GEMM-friendly
    return int(max(1, min(rows, n_rows)))


_HAS_OUT_DTYPE: dict[str, bool] = {}


def _low_precision_fp32_gemm_ok(device: torch.device) -> bool:
    """Whether torch.mm(bf16, bf16, out_dtype=float32) exists here (CUDA, torch >= 2.8)."""
    key = str(device)
    if key not in _HAS_OUT_DTYPE:
        try:
            a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
            torch.mm(a, a, out_dtype=torch.float32)
            _HAS_OUT_DTYPE[key] = True
        except (TypeError, RuntimeError, NotImplementedError):
            _HAS_OUT_DTYPE[key] = False
    return _HAS_OUT_DTYPE[key]


def _mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = a @ b in fp32, whatever the input dtype (bf16 GEMMs accumulate and store in fp32)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda and _low_precision_fp32_gemm_ok(a.device):
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


def _group(name: str):
    if not name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(name)


# ----------------------------------------------------------------------------- the chunk loop

def _chunked(h_s, h_t, W, W_t, row_scale, beta, inv_ts, inv_tt, chunk, rows_fn, vocab,
             want_dh, want_dw, write_grad, group=None):
    """Loss per row, and (if write_grad) dH and fp32 dW already scaled by row_scale. Only the first
    `vocab` rows of W and W_t take part (a padded vocabulary's extra rows get no gradient)."""
    N, H = h_s.shape
    V = W.shape[0]
    device = h_s.device
    shared = W_t is None
    loss_rows = torch.empty(N, dtype=torch.float32, device=device)
    # With the vocabulary split over ranks each dH is a partial sum: kept in fp32 and all-reduced.
    dH = (torch.empty(N, H, dtype=torch.float32 if group is not None else h_s.dtype, device=device)
          if (write_grad and want_dh) else None)
    dW_full = torch.zeros(V, H, dtype=torch.float32, device=device) if (write_grad and want_dw) else None
    dW = None if dW_full is None else dW_full[:vocab]
    # CPU has no bf16 -> fp32 GEMM: take an fp32 copy of the weight once (inputs-sized, not N-sized).
    low_cpu = not h_s.is_cuda and h_s.dtype != torch.float32
    W_f = (W[:vocab].float() if low_cpu else W[:vocab])
    W_tf = W_f if shared else (W_t[:vocab].float() if low_cpu else W_t[:vocab])
    buf = torch.empty(2 * chunk, vocab, dtype=torch.float32, device=device)
    # Low-precision weights take the gradient in their dtype, written by the row kernel itself.
    gbuf = torch.empty(chunk, vocab, dtype=W_f.dtype, device=device) \
        if write_grad and W_f.dtype != torch.float32 else None
    for start in range(0, N, chunk):
        c = min(chunk, N - start)
        hs = h_s[start:start + c]
        ht = h_t[start:start + c]
        if low_cpu:
            hs, ht = hs.float(), ht.float()
        z = buf[:2 * c]
        if shared:
            _mm_f32(torch.cat([hs, ht]), W_f.T, out=z)  # one GEMM for student and teacher logits
        else:
            _mm_f32(hs, W_f.T, out=z[:c])
            _mm_f32(ht, W_tf.T, out=z[c:])
        zs, zt = z[:c], z[c:]
        low = None if gbuf is None else gbuf[:c]
        rows_fn(zs, zt, row_scale[start:start + c], loss_rows[start:start + c],
                inv_ts, inv_tt, beta, write_grad, grad_out=low)
        g = zs if low is None else low
        if not write_grad:
            continue
        if dH is not None:
            if dH.dtype == g.dtype and g.dtype == W_f.dtype:
                torch.mm(g, W_f, out=dH[start:start + c])
            else:
                dH[start:start + c] = torch.mm(g, W_f.to(g.dtype)).to(dH.dtype)
        if dW is not None:
            if g.dtype == torch.float32:
                dW.addmm_(g.T, hs.float() if hs.dtype != torch.float32 else hs)
            elif _low_precision_fp32_gemm_ok(dW.device):
                torch.addmm(dW, g.T, hs, out_dtype=torch.float32, out=dW)
            else:
                dW.addmm_(g.T.float(), hs.float())
    if dH is not None and group is not None:
        import torch.distributed as dist
        dist.all_reduce(dH, group=group)
        dH = dH.to(h_s.dtype)
    return loss_rows, dH, dW_full


def _row_weights(token_weights, n, device):
    """[N] fp32 and contiguous: the kernels read the weights with stride 1."""
    if token_weights is None:
        return torch.ones(n, dtype=torch.float32, device=device)
    return token_weights.to(torch.float32).contiguous()


def _reduce(loss_rows, w, reduction):
    """The weighted "sum", or the "mean" over weighted rows (a fully masked batch gives 0)."""
    if reduction == "none":
        return loss_rows * w
    total = (loss_rows * w).sum()
    return total if reduction == "sum" else total / w.sum().clamp_min(torch.finfo(torch.float32).tiny)


def _grad_scale(w, reduction):
    if reduction == "mean":
        return w / w.sum().clamp_min(torch.finfo(torch.float32).tiny)
    return w


def _empty(like):
    return like.new_empty(0)


def _check_topk(topk, tail, vocab):
    if topk is not None and (not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= vocab):
        raise ValueError(f"topk must be None (the exact loss) or an int in [1, {vocab}], got {topk!r}")
    if not isinstance(tail, bool):
        raise ValueError(f"tail must be a bool, got {tail!r}")


# ----------------------------------------------------------------------------- the registered op
# A torch.library custom op with a fake (meta) implementation and its autograd, so that
# torch.compile(fullgraph=True) traces a loss that calls fused_linear_jsd as one opaque node.

@torch.library.custom_op("opcod_kernels::fused_linear_jsd", mutates_args=())
def _fused_op(h_s: torch.Tensor, h_t: torch.Tensor, W: torch.Tensor, W_t: Optional[torch.Tensor],
              w: torch.Tensor, beta: float, inv_ts: float, inv_tt: float, reduction: str, chunk: int,
              backend: str, vocab: int, group_name: str, topk: int, tail: bool, want_dh: bool,
              want_dw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-row losses, dH, dW fp32): the gradients come out of the forward for "mean" and
    "sum" (already scaled by the reduction's row weights); empty when not wanted or for "none"."""
    group = _group(group_name)
    eager = reduction != "none" and (want_dh or want_dw)
    loss_rows, dH, dW = _chunked(h_s, h_t, W, W_t, _grad_scale(w, reduction) if eager else w, beta, inv_ts,
                                 inv_tt, chunk, _rows_fn(backend, h_s.device, group, topk, tail), vocab, want_dh,
                                 want_dw, eager, group)
    return (_reduce(loss_rows, w, reduction), loss_rows,
            _empty(h_s) if dH is None else dH, _empty(loss_rows) if dW is None else dW)


@_fused_op.register_fake
def _(h_s, h_t, W, W_t, w, beta, inv_ts, inv_tt, reduction, chunk, backend, vocab, group_name, topk, tail,
      want_dh, want_dw):
    N, H = h_s.shape
    eager = reduction != "none"
    loss = h_s.new_empty((N,) if reduction == "none" else (), dtype=torch.float32)
    dH = h_s.new_empty((N, H) if eager and want_dh else (0,))
    dW = h_s.new_empty(tuple(W.shape) if eager and want_dw else (0,), dtype=torch.float32)
    return loss, h_s.new_empty((N,), dtype=torch.float32), dH, dW


@torch.library.custom_op("opcod_kernels::fused_linear_jsd_backward", mutates_args=())
def _fused_backward_op(h_s: torch.Tensor, h_t: torch.Tensor, W: torch.Tensor, W_t: Optional[torch.Tensor],
                       row_scale: torch.Tensor, beta: float, inv_ts: float, inv_tt: float, chunk: int,
                       backend: str, vocab: int, group_name: str, topk: int, tail: bool, want_dh: bool,
                       want_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """reduction="none": the upstream gradient is per row and enters dW inside its GEMM, so the
    chunks are computed again with it as the row scale."""
    group = _group(group_name)
    _, dH, dW = _chunked(h_s, h_t, W, W_t, row_scale, beta, inv_ts, inv_tt, chunk,
                         _rows_fn(backend, h_s.device, group, topk, tail), vocab, want_dh, want_dw, True, group)
    return _empty(h_s) if dH is None else dH, _empty(row_scale) if dW is None else dW


@_fused_backward_op.register_fake
def _(h_s, h_t, W, W_t, row_scale, beta, inv_ts, inv_tt, chunk, backend, vocab, group_name, topk, tail, want_dh,
      want_dw):
    dH = h_s.new_empty(tuple(h_s.shape) if want_dh else (0,))
    return dH, h_s.new_empty(tuple(W.shape) if want_dw else (0,), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    (h_s, h_t, W, W_t, w, beta, inv_ts, inv_tt, reduction, chunk, backend, vocab, group_name, topk, tail,
     want_dh, want_dw) = inputs
    ctx.reduction, ctx.w_dtype, ctx.h_dtype = reduction, W.dtype, h_s.dtype
    ctx.args = (beta, inv_ts, inv_tt, chunk, backend, vocab, group_name, topk, tail, want_dh, want_dw)
    if reduction == "none":
        ctx.save_for_backward(h_s, h_t, W, W_t, w)
    else:
        ctx.save_for_backward(output[2], output[3])


def _backward(ctx, g_loss, _g_rows, _g_dh, _g_dw):
    beta, inv_ts, inv_tt, chunk, backend, vocab, group_name, topk, tail, want_dh, want_dw = ctx.args
    if ctx.reduction == "none":
        h_s, h_t, W, W_t, w = ctx.saved_tensors
        dH, dW = _fused_backward_op(h_s, h_t, W, W_t, (g_loss.float() * w).contiguous(), beta, inv_ts, inv_tt,
                                    chunk, backend, vocab, group_name, topk, tail, want_dh, want_dw)
        g = None
    else:
        dH, dW = ctx.saved_tensors
        g = g_loss.float()  # a scalar; always applied, since testing it for 1 would sync
        dH = dH * g.to(dH.dtype) if want_dh else dH
    # Scaled in fp32 and rounded on store into the weight's dtype: no second fp32 [V, H].
    dW = torch.mul(dW, 1.0 if g is None else g).to(ctx.w_dtype) if want_dw else None
    return (dH if want_dh else None, None, dW, None, None, None, None, None, None, None, None, None, None,
            None, None, None, None)


_fused_op.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_jsd(student_hidden, teacher_hidden, weight, teacher_weight=None, *, beta=0.5,
                     student_temperature=1.0, teacher_temperature=1.0, token_weights=None,
                     reduction="mean", chunk_size=None, backend="auto", vocab_size=None,
                     return_token_losses=False, process_group=None, topk=None, tail=True):
    """Generalized JSD between the student's and the teacher's next-token distributions.

    Student logits are student_hidden @ weight.T, teacher logits teacher_hidden @ teacher_weight.T
    (teacher_weight defaults to weight, detached). beta = 0 is KL(P||Q), beta = 1 KL(Q||P), P the
    teacher, Q the student. Gradients reach student_hidden and weight only. Returns a scalar for
    "mean" (over the weighted rows) and "sum", per-row weighted losses [N] for "none"; with
    return_token_losses, also each row's unweighted divergence [N] (detached, from the same pass).

    vocab_size: the real vocabulary when weight and teacher_weight are padded differently (rows past
    it take no part and get no gradient); default: the smaller of the two. process_group: weight
    (and teacher_weight) hold this rank's rows of a vocabulary split over the group's ranks, in rank
    order; the row statistics are all-reduced, dH is complete on every rank, dW is this rank's rows.
    topk: SDPO's top-k distillation instead of the exact loss: the student's top-k tokens per row and,
    with tail, one bucket for the rest (else renormalised over the k); gradients through the
    student's full log-softmax.
    """
    vocab = _validate(student_hidden, teacher_hidden, weight, teacher_weight, beta, student_temperature,
                      teacher_temperature, token_weights, reduction, chunk_size, backend, vocab_size)
    _check_topk(topk, tail, vocab)
    if process_group is not None and (vocab_size is not None or topk):
        raise ValueError("process_group cannot be combined with vocab_size or topk (each rank holds its own rows)")
    N = student_hidden.shape[0]
    chunk = chunk_size or default_chunk_size(N, vocab, student_hidden.device)
    chunk = max(1, min(chunk, N))
    # The same tensor for both -> one stacked GEMM; the teacher side never receives a gradient.
    W_t = None if teacher_weight is None or teacher_weight is weight else teacher_weight.detach()
    grad = torch.is_grad_enabled()
    loss, rows, _, _ = _fused_op(
        student_hidden, teacher_hidden.detach(), weight, W_t,
        _row_weights(token_weights, N, student_hidden.device), float(beta), 1.0 / float(student_temperature),
        1.0 / float(teacher_temperature), reduction, int(chunk), backend, int(vocab),
        "" if process_group is None else process_group.group_name, int(topk or 0), bool(tail),
        grad and student_hidden.requires_grad, grad and weight.requires_grad)
    return (loss, rows.detach()) if return_token_losses else loss


class _LogitsJSDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z_s, z_t, w, beta, ts, tt, reduction, backend, vocab, topk, tail):
        rows_fn = _rows_fn(backend, z_s.device, None, topk, tail)
        eager = reduction != "none" and ctx.needs_input_grad[0]
        zt = z_t.detach()[:, :vocab].to(torch.float32).contiguous()
        grad = z_s.detach()[:, :vocab].to(torch.float32).clone(memory_format=torch.contiguous_format)
        loss_rows = torch.empty(z_s.shape[0], dtype=torch.float32, device=z_s.device)
        rows_fn(grad, zt, _grad_scale(w, reduction) if eager else w, loss_rows, 1.0 / ts, 1.0 / tt, beta, eager)
        ctx.reduction, ctx.dtype, ctx.width = reduction, z_s.dtype, z_s.shape[1]
        ctx.args = (beta, 1.0 / ts, 1.0 / tt, rows_fn, vocab)
        if reduction == "none":
            ctx.save_for_backward(z_s, z_t, w)
        else:
            ctx.save_for_backward(grad if eager else None)
        return _reduce(loss_rows, w, reduction), loss_rows

    @staticmethod
    def backward(ctx, grad_out, _grad_rows):
        beta, inv_ts, inv_tt, rows_fn, vocab = ctx.args
        if ctx.reduction == "none":
            z_s, z_t, w = ctx.saved_tensors
            grad = z_s.detach()[:, :vocab].to(torch.float32).clone(memory_format=torch.contiguous_format)
            loss_rows = torch.empty(z_s.shape[0], dtype=torch.float32, device=z_s.device)
            rows_fn(grad, z_t.detach()[:, :vocab].to(torch.float32).contiguous(),
                    (grad_out.float() * w).contiguous(), loss_rows, inv_ts, inv_tt, beta, True)
        else:
            (grad,) = ctx.saved_tensors
            grad = grad * grad_out.float()
        if vocab < ctx.width:  # padding columns of the student: no gradient
            grad = torch.nn.functional.pad(grad, (0, ctx.width - vocab))
        return grad.to(ctx.dtype), None, None, None, None, None, None, None, None, None, None


def jsd(student_logits, teacher_logits, *, beta=0.5, student_temperature=1.0,
        teacher_temperature=1.0, token_weights=None, reduction="mean", backend="auto", vocab_size=None,
        return_token_losses=False, topk=None, tail=True):
    """fused_linear_jsd for logits already in hand ([N, V] and [N, V_t]); same conventions. Columns
    that are -inf in both (vocabulary padding, masked tokens) take no part."""
    vocab = _validate(student_logits, teacher_logits, None, None, beta, student_temperature,
                      teacher_temperature, token_weights, reduction, None, backend, vocab_size, logits=True)
    _check_topk(topk, tail, vocab)
    w = _row_weights(token_weights, student_logits.shape[0], student_logits.device)
    loss, rows = _LogitsJSDFunction.apply(student_logits, teacher_logits, w, float(beta),
                                          float(student_temperature), float(teacher_temperature),
                                          reduction, backend, vocab, int(topk or 0), bool(tail))
    return (loss, rows.detach()) if return_token_losses else loss


class FusedLinearJSD(nn.Module):
    """Module form of fused_linear_jsd: the loss settings at construction, tensors at call."""

    def __init__(self, beta=0.5, student_temperature=1.0, teacher_temperature=1.0,
                 reduction="mean", chunk_size=None, backend="auto", vocab_size=None):
        super().__init__()
        self.beta, self.reduction = beta, reduction
        self.student_temperature, self.teacher_temperature = student_temperature, teacher_temperature
        self.chunk_size, self.backend, self.vocab_size = chunk_size, backend, vocab_size

    def forward(self, student_hidden, teacher_hidden, weight, teacher_weight=None, token_weights=None):
        return fused_linear_jsd(student_hidden, teacher_hidden, weight, teacher_weight,
                                beta=self.beta, student_temperature=self.student_temperature,
                                teacher_temperature=self.teacher_temperature,
                                token_weights=token_weights, reduction=self.reduction,
                                chunk_size=self.chunk_size, backend=self.backend, vocab_size=self.vocab_size)

    def extra_repr(self):
        return (f"beta={self.beta}, student_temperature={self.student_temperature}, "
                f"teacher_temperature={self.teacher_temperature}, reduction={self.reduction!r}")
