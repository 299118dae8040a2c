"""Fused linear + generalized-JSD loss: chunked over rows, never holding [N, V] logits."""
from __future__ import annotations

import contextlib
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


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype torch.autocast computes matmuls in on this device, or None outside autocast."""
    if device.type not in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return None
    try:
        return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    except RuntimeError:  # a device type this torch build has no autocast for
        return None


def _validate(student, teacher, weight, teacher_weight, beta, ts, tt, token_weights,
              reduction, chunk_size, backend, vocab_size, logits=False, amp=False):
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
        # Under torch.autocast the dtypes may differ: every operand is cast to autocast's dtype.
        if weight.dtype != student.dtype and not amp:
            raise ValueError(f"weight dtype {weight.dtype} differs from student_hidden dtype {student.dtype} "
                             "(cast one of them, or call the loss inside torch.autocast)")
        tw = weight if teacher_weight is None else teacher_weight
        if teacher_weight is not None:
            _check_float("teacher_weight", teacher_weight)
            if teacher_weight.dim() != 2:
                raise ValueError(f"teacher_weight must be 2-D [V_t, H_t], got shape {tuple(teacher_weight.shape)}")
        if teacher.shape[1] != tw.shape[1]:
            raise ValueError(f"teacher_hidden must be [N, {tw.shape[1]}] to match "
                             f"{'teacher_weight' if teacher_weight is not None else 'weight'}, "
                             f"got shape {tuple(teacher.shape)}")
        if teacher.dtype != tw.dtype and not amp:
            raise ValueError(f"teacher_hidden dtype {teacher.dtype} differs from its weight's {tw.dtype} "
                             "(cast one of them, or call the loss inside torch.autocast)")
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


_HAS_OUT_DTYPE: dict[tuple[str, torch.dtype], bool] = {}


def _low_precision_fp32_gemm_ok(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether torch.mm(x, x, out_dtype=float32) exists here for this dtype (CUDA, torch >= 2.8)."""
    key = (str(device), dtype)
    if key not in _HAS_OUT_DTYPE:
        try:
            a = torch.ones(2, 2, dtype=dtype, device=device)
            torch.mm(a, a, out_dtype=torch.float32)
            _HAS_OUT_DTYPE[key] = True
        except (TypeError, RuntimeError, NotImplementedError):
            _HAS_OUT_DTYPE[key] = False
    return _HAS_OUT_DTYPE[key]


def _mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = a @ b in fp32, whatever the input dtype (bf16 GEMMs accumulate and store in fp32)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda and _low_precision_fp32_gemm_ok(a.device, a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b, rounded once into out's dtype (an fp32 out from bf16 operands keeps fp32 sums)."""
    if out.dtype == a.dtype == b.dtype:
        torch.mm(a, b, out=out)
    elif (out.dtype == torch.float32 and a.dtype == b.dtype and a.is_cuda
          and _low_precision_fp32_gemm_ok(a.device, a.dtype)):
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        out.copy_(torch.mm(a, b.to(a.dtype)))


def _operand_dtype(compute: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype GEMM operands are held in. bf16 stays bf16 on CUDA, which has bf16 x bf16 -> fp32
    GEMMs; everything else is computed in fp32 after rounding to `compute`: CPU has no such GEMM,
    and fp16 operands would mean an fp16 gradient tile, whose entries (row weight x probability,
    ~1e-10 for a "mean" over 8k tokens) fp16 flushes to zero, while bf16 has fp32's range."""
    if device.type == "cuda" and compute == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


def _dh_dtype(h_s: torch.Tensor) -> torch.dtype:
    """dH as the op returns it: fp16 inputs keep it in fp32 until backward has applied the upstream
    gradient (a GradScaler's scale), so its small entries are scaled before they are rounded."""
    return torch.float32 if h_s.dtype == torch.float16 else h_s.dtype


def _autocast_off(device: torch.device):
    # Inside the op every GEMM picks its own dtypes: an enclosing autocast must not recast them.
    if autocast_dtype(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def _group(name: str):
    if not name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(name)


# ----------------------------------------------------------------------------- the chunk loop

def _chunked(h_s, h_t, W, W_t, row_scale, beta, inv_ts, inv_tt, chunk, rows_fn, vocab,
             want_dh, want_dw, write_grad, group=None, *, b_s=None, b_t=None, want_db=False, amp=None):
    """Loss per row, and (if write_grad) dH, fp32 dW and fp32 dB already scaled by row_scale. Only the
    first `vocab` rows of W and W_t and entries of the biases take part (a padded vocabulary's extra
    rows get no gradient). amp: autocast's dtype, which every operand is rounded to; else each side
    computes in its own inputs' dtype."""
    N, H = h_s.shape
    V = W.shape[0]
    device = h_s.device
    shared = W_t is None
    cdt_s, cdt_t = (amp, amp) if amp is not None else (h_s.dtype, h_t.dtype)
    odt_s, odt_t = _operand_dtype(cdt_s, device), _operand_dtype(cdt_t, device)

    def operand(t, cdt, odt):
        # Round to the compute dtype first (what autocast's bf16 GEMM would see), then hold as odt.
        t = t if t.dtype == cdt else t.to(cdt)
        return t if t.dtype == odt else t.to(odt)

    loss_rows = torch.empty(N, dtype=torch.float32, device=device)
    # With the vocabulary split over ranks each dH is a partial sum: kept in fp32 and all-reduced.
    dh_acc = torch.float32 if group is not None else _dh_dtype(h_s)
    dH = torch.empty(N, H, dtype=dh_acc, device=device) if (write_grad and want_dh) else None
    dW_full = torch.zeros(V, H, dtype=torch.float32, device=device) if (write_grad and want_dw) else None
    dW = None if dW_full is None else dW_full[:vocab]
    dB_full = torch.zeros(V, dtype=torch.float32, device=device) if (write_grad and want_db) else None
    dB = None if dB_full is None else dB_full[:vocab]
    # Weight-sized copies at most (inputs-sized, not N-sized): the weight in the operand dtype.
    W_f = operand(W[:vocab], cdt_s, odt_s)
    W_tf = W_f if shared else operand(W_t[:vocab], cdt_t, odt_t)
    # Biases are added to the fp32 logits, rounded to the compute dtype first as autocast's would be.
    bias_s = None if b_s is None else b_s[:vocab].to(cdt_s).float()
    bias_t = None if b_t is None else b_t[:vocab].to(cdt_t).float()
    buf = torch.empty(2 * chunk, vocab, dtype=torch.float32, device=device)
    # Low-precision operands take the gradient in their dtype, written by the row kernel itself.
    gbuf = torch.empty(chunk, vocab, dtype=odt_s, device=device) \
        if write_grad and odt_s != torch.float32 else None
    for start in range(0, N, chunk):
        c = min(chunk, N - start)
        hs = operand(h_s[start:start + c], cdt_s, odt_s)
        ht = operand(h_t[start:start + c], cdt_t, odt_t)
        z = buf[:2 * c]
        if shared:  # same weight, so (validated, or by autocast) the same operand dtype on both sides
            _mm_f32(torch.cat([hs, ht]), W_f.T, out=z)  # one GEMM for student and teacher logits
        else:
            _mm_f32(hs, W_f.T, out=z[:c])
            _mm_f32(ht, W_tf.T, out=z[c:])
        zs, zt = z[:c], z[c:]
        if bias_s is not None:
            zs.add_(bias_s)
        if bias_t is not None:
            zt.add_(bias_t)
        low = None if gbuf is None else gbuf[:c]
        rows_fn(zs, zt, row_scale[start:start + c], loss_rows[start:start + c],
                inv_ts, inv_tt, beta, write_grad, grad_out=low)
        if not write_grad:
            continue
        g = zs if low is None else low
        if dH is not None:
            _mm_into(dH[start:start + c], g, W_f)
        if dW is not None:
            if g.dtype == torch.float32:
                dW.addmm_(g.T, hs)  # hs is fp32 whenever the gradient tile is
            elif _low_precision_fp32_gemm_ok(dW.device, g.dtype):
                torch.addmm(dW, g.T, hs, out_dtype=torch.float32, out=dW)
            else:
                dW.addmm_(g.T.float(), hs.float())
        if dB is not None:
            dB.add_(g.sum(0, dtype=torch.float32))
    if dH is not None and group is not None:
        import torch.distributed as dist
        dist.all_reduce(dH, group=group)
        dH = dH.to(_dh_dtype(h_s))
    return loss_rows, dH, dW_full, dB_full


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


def _weights_from_labels(token_weights, labels, ignore_index, n):
    """labels + ignore_index as token weights: a row counts iff its label is not ignore_index."""
    if labels is None:
        return token_weights
    if token_weights is not None:
        raise ValueError("pass token_weights or labels (with ignore_index), not both: "
                         "fold the mask into token_weights, e.g. token_weights * (labels != ignore_index)")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of shape [{n}], got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)}")
    if tuple(labels.shape) != (n,):
        raise ValueError(f"labels must have shape [{n}] (one per row), got {tuple(labels.shape)}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    return labels != ignore_index


def _check_bias(name, b, w, wname, amp):
    if b is None:
        return
    _check_float(name, b)
    if b.dim() != 1 or b.shape[0] != w.shape[0]:
        raise ValueError(f"{name} must be 1-D with one entry per row of {wname} ({w.shape[0]}), "
                         f"got shape {tuple(b.shape)}")
    if b.dtype != w.dtype and not amp:
        raise ValueError(f"{name} dtype {b.dtype} differs from {wname} dtype {w.dtype}")
    if b.device != w.device:
        raise ValueError(f"all tensors must be on one device, got {name} on {b.device} and {wname} on {w.device}")


# ----------------------------------------------------------------------------- the registered op
# A torch.library custom op with a fake (meta) implementation and its autograd, so that
# torch.compile(fullgraph=True) traces a loss that calls fused_linear_jsd as one opaque node.

@torch.library.custom_op("opcod_kernels::fused_linear_jsd", mutates_args=())
def _fused_op(h_s: torch.Tensor, h_t: torch.Tensor, W: torch.Tensor, W_t: Optional[torch.Tensor],
              b_s: Optional[torch.Tensor], b_t: Optional[torch.Tensor],
              w: torch.Tensor, beta: float, inv_ts: float, inv_tt: float, reduction: str, chunk: int,
              backend: str, vocab: int, group_name: str, topk: int, tail: bool, want_dh: bool,
              want_dw: bool, want_db: bool, amp: Optional[torch.dtype]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-row losses, dH, dW fp32, dB fp32): the gradients come out of the forward for "mean"
    and "sum" (already scaled by the reduction's row weights); empty when not wanted or for "none"."""
    group = _group(group_name)
    eager = reduction != "none" and (want_dh or want_dw or want_db)
    with _autocast_off(h_s.device):
        loss_rows, dH, dW, dB = _chunked(
            h_s, h_t, W, W_t, _grad_scale(w, reduction) if eager else w, beta, inv_ts, inv_tt, chunk,
            _rows_fn(backend, h_s.device, group, topk, tail), vocab, want_dh, want_dw, eager, group,
            b_s=b_s, b_t=b_t, want_db=want_db, amp=amp)
        loss = _reduce(loss_rows, w, reduction)
    return (loss, loss_rows, h_s.new_empty(0, dtype=_dh_dtype(h_s)) if dH is None else dH,
            _empty(loss_rows) if dW is None else dW, _empty(loss_rows) if dB is None else dB)


@_fused_op.register_fake
def _(h_s, h_t, W, W_t, b_s, b_t, w, beta, inv_ts, inv_tt, reduction, chunk, backend, vocab, group_name, topk,
      tail, want_dh, want_dw, want_db, amp):
    N, H = h_s.shape
    eager = reduction != "none"
    loss = h_s.new_empty((N,) if reduction == "none" else (), dtype=torch.float32)
    dH = h_s.new_empty((N, H) if eager and want_dh else (0,), dtype=_dh_dtype(h_s))
    dW = h_s.new_empty(tuple(W.shape) if eager and want_dw else (0,), dtype=torch.float32)
    dB = h_s.new_empty((W.shape[0],) if eager and want_db else (0,), dtype=torch.float32)
    return loss, h_s.new_empty((N,), dtype=torch.float32), dH, dW, dB


@torch.library.custom_op("opcod_kernels::fused_linear_jsd_backward", mutates_args=())
def _fused_backward_op(h_s: torch.Tensor, h_t: torch.Tensor, W: torch.Tensor, W_t: Optional[torch.Tensor],
                       b_s: Optional[torch.Tensor], b_t: Optional[torch.Tensor],
                       row_scale: torch.Tensor, beta: float, inv_ts: float, inv_tt: float, chunk: int,
                       backend: str, vocab: int, group_name: str, topk: int, tail: bool, want_dh: bool,
                       want_dw: bool, want_db: bool, amp: Optional[torch.dtype]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reduction="none": the upstream gradient is per row and enters dW inside its GEMM, so the
    chunks are computed again with it as the row scale."""
    group = _group(group_name)
    with _autocast_off(h_s.device):
        _, dH, dW, dB = _chunked(h_s, h_t, W, W_t, row_scale, beta, inv_ts, inv_tt, chunk,
                                 _rows_fn(backend, h_s.device, group, topk, tail), vocab, want_dh, want_dw, True,
                                 group, b_s=b_s, b_t=b_t, want_db=want_db, amp=amp)
    return (h_s.new_empty(0, dtype=_dh_dtype(h_s)) if dH is None else dH,
            _empty(row_scale) if dW is None else dW, _empty(row_scale) if dB is None else dB)


@_fused_backward_op.register_fake
def _(h_s, h_t, W, W_t, b_s, b_t, row_scale, beta, inv_ts, inv_tt, chunk, backend, vocab, group_name, topk, tail,
      want_dh, want_dw, want_db, amp):
    dH = h_s.new_empty(tuple(h_s.shape) if want_dh else (0,), dtype=_dh_dtype(h_s))
    dW = h_s.new_empty(tuple(W.shape) if want_dw else (0,), dtype=torch.float32)
    return dH, dW, h_s.new_empty((W.shape[0],) if want_db else (0,), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    (h_s, h_t, W, W_t, b_s, b_t, w, beta, inv_ts, inv_tt, reduction, chunk, backend, vocab, group_name, topk, tail,
     want_dh, want_dw, want_db, amp) = inputs
    ctx.reduction, ctx.w_dtype, ctx.h_dtype = reduction, W.dtype, h_s.dtype
    ctx.b_dtype = None if b_s is None else b_s.dtype
    ctx.args = (beta, inv_ts, inv_tt, chunk, backend, vocab, group_name, topk, tail, want_dh, want_dw, want_db, amp)
    if reduction == "none":
        ctx.save_for_backward(h_s, h_t, W, W_t, b_s, b_t, w)
    else:
        ctx.save_for_backward(output[2], output[3], output[4])


def _backward(ctx, g_loss, _g_rows, _g_dh, _g_dw, _g_db):
    beta, inv_ts, inv_tt, chunk, backend, vocab, group_name, topk, tail, want_dh, want_dw, want_db, amp = ctx.args
    if ctx.reduction == "none":
        h_s, h_t, W, W_t, b_s, b_t, w = ctx.saved_tensors
        dH, dW, dB = _fused_backward_op(h_s, h_t, W, W_t, b_s, b_t, (g_loss.float() * w).contiguous(), beta,
                                        inv_ts, inv_tt, chunk, backend, vocab, group_name, topk, tail, want_dh,
                                        want_dw, want_db, amp)
        g = None
    else:
        dH, dW, dB = ctx.saved_tensors
        g = g_loss.float()  # a scalar; always applied, since testing it for 1 would sync
        dH = dH * g.to(dH.dtype) if want_dh else dH
    # Scaled in fp32 and rounded on store into the input's dtype: no second fp32 [V, H].
    dH = dH.to(ctx.h_dtype) if want_dh else None
    dW = torch.mul(dW, 1.0 if g is None else g).to(ctx.w_dtype) if want_dw else None
    dB = torch.mul(dB, 1.0 if g is None else g).to(ctx.b_dtype) if want_db else None
    return (dH, None, dW, None, dB) + (None,) * 16


_fused_op.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_jsd(student_hidden, teacher_hidden, weight, teacher_weight=None, *, beta=0.5,
                     student_temperature=1.0, teacher_temperature=1.0, token_weights=None, labels=None,
                     ignore_index=-100, bias=None, teacher_bias=None, reduction="mean", chunk_size=None,
                     backend="auto", vocab_size=None, return_token_losses=False, process_group=None,
                     topk=None, tail=True):
    """Generalized JSD between the student's and the teacher's next-token distributions.

    Student logits are student_hidden @ weight.T + bias, teacher logits teacher_hidden @
    teacher_weight.T + teacher_bias (teacher_weight defaults to weight, detached, and then
    teacher_bias to bias). beta = 0 is KL(P||Q), beta = 1 KL(Q||P), P the teacher, Q the student.
    Gradients reach student_hidden, weight and bias only. Returns a scalar for "mean" (over the
    weighted rows) and "sum", per-row weighted losses [N] for "none"; with return_token_losses, also
    each row's unweighted divergence [N] (detached, from the same pass).

    token_weights [N] (float or bool) weight the rows; labels [N] (int) with ignore_index instead count
    the rows whose label is not ignore_index. Inside torch.autocast the GEMMs take autocast's dtype
    (operands rounded to it, logits and row math still fp32) and the gradients come back in each
    input's own dtype, fp32 weights getting fp32 gradients. float16 inputs are computed in fp32.

    vocab_size: the real vocabulary when weight and teacher_weight are padded differently (rows past
    it take no part and get no gradient); default: the smaller of the two. process_group: weight
    (and teacher_weight) hold this rank's rows of a vocabulary split over the group's ranks, in rank
    order; the row statistics are all-reduced, dH is complete on every rank, dW is this rank's rows.
    topk: SDPO's top-k distillation instead of the exact loss: the student's top-k tokens per row and,
    with tail, one bucket for the rest (else renormalised over the k); gradients through the
    student's full log-softmax.
    """
    amp = autocast_dtype(student_hidden.device) if isinstance(student_hidden, torch.Tensor) else None
    if amp is not None and student_hidden.dtype == torch.float64:
        amp = None  # autocast leaves float64 alone
    n = student_hidden.shape[0] if isinstance(student_hidden, torch.Tensor) and student_hidden.dim() else 0
    token_weights = _weights_from_labels(token_weights, labels, ignore_index, n)
    vocab = _validate(student_hidden, teacher_hidden, weight, teacher_weight, beta, student_temperature,
                      teacher_temperature, token_weights, reduction, chunk_size, backend, vocab_size,
                      amp=amp is not None)
    _check_bias("bias", bias, weight, "weight", amp is not None)
    shared = teacher_weight is None or teacher_weight is weight
    if teacher_bias is None and shared and bias is not None:
        teacher_bias = bias  # the teacher uses the student's head: all of it
    _check_bias("teacher_bias", teacher_bias, weight if teacher_weight is None else teacher_weight,
                "teacher_weight" if teacher_weight is not None else "weight", amp is not None)
    _check_topk(topk, tail, vocab)
    if process_group is not None and (vocab_size is not None or topk):
        raise ValueError("process_group cannot be combined with vocab_size or topk (each rank holds its own rows)")
    N = student_hidden.shape[0]
    chunk = chunk_size or default_chunk_size(N, vocab, student_hidden.device)
    chunk = max(1, min(chunk, N))
    # The same tensor for both -> one stacked GEMM; the teacher side never receives a gradient.
    W_t = None if shared else teacher_weight.detach()
    grad = torch.is_grad_enabled()
    loss, rows, _, _, _ = _fused_op(
        student_hidden, teacher_hidden.detach(), weight, W_t, bias,
        None if teacher_bias is None else teacher_bias.detach(),
        _row_weights(token_weights, N, student_hidden.device), float(beta), 1.0 / float(student_temperature),
        1.0 / float(teacher_temperature), reduction, int(chunk), backend, int(vocab),
        "" if process_group is None else process_group.group_name, int(topk or 0), bool(tail),
        grad and student_hidden.requires_grad, grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad, amp)
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
        teacher_temperature=1.0, token_weights=None, labels=None, ignore_index=-100, reduction="mean",
        backend="auto", vocab_size=None, return_token_losses=False, topk=None, tail=True):
    """fused_linear_jsd for logits already in hand ([N, V] and [N, V_t]); same conventions. Columns
    that are -inf in both (vocabulary padding, masked tokens) take no part. Logits of any float dtype
    are read into fp32 rows; the gradient comes back in the student logits' dtype."""
    n = student_logits.shape[0] if isinstance(student_logits, torch.Tensor) and student_logits.dim() else 0
    token_weights = _weights_from_labels(token_weights, labels, ignore_index, n)
    vocab = _validate(student_logits, teacher_logits, None, None, beta, student_temperature,
                      teacher_temperature, token_weights, reduction, None, backend, vocab_size, logits=True)
    _check_topk(topk, tail, vocab)
    w = _row_weights(token_weights, student_logits.shape[0], student_logits.device)
    loss, rows = _LogitsJSDFunction.apply(student_logits, teacher_logits, w, float(beta),
                                          float(student_temperature), float(teacher_temperature),
                                          reduction, backend, vocab, int(topk or 0), bool(tail))
    return (loss, rows.detach()) if return_token_losses else loss


class FusedLinearJSD(nn.Module):
    """Module form of fused_linear_jsd: the loss settings at construction (every option of the
    function), tensors at call."""

    def __init__(self, beta=0.5, student_temperature=1.0, teacher_temperature=1.0,
                 reduction="mean", chunk_size=None, backend="auto", vocab_size=None, *, ignore_index=-100,
                 topk=None, tail=True, process_group=None, return_token_losses=False):
        super().__init__()
        self.beta, self.reduction = beta, reduction
        self.student_temperature, self.teacher_temperature = student_temperature, teacher_temperature
        self.chunk_size, self.backend, self.vocab_size = chunk_size, backend, vocab_size
        self.ignore_index, self.topk, self.tail = ignore_index, topk, tail
        self.process_group, self.return_token_losses = process_group, return_token_losses

    def forward(self, student_hidden, teacher_hidden, weight, teacher_weight=None, token_weights=None, *,
                labels=None, bias=None, teacher_bias=None):
        return fused_linear_jsd(student_hidden, teacher_hidden, weight, teacher_weight,
                                beta=self.beta, student_temperature=self.student_temperature,
                                teacher_temperature=self.teacher_temperature,
                                token_weights=token_weights, labels=labels, ignore_index=self.ignore_index,
                                bias=bias, teacher_bias=teacher_bias, reduction=self.reduction,
                                chunk_size=self.chunk_size, backend=self.backend, vocab_size=self.vocab_size,
                                return_token_losses=self.return_token_losses,
                                process_group=self.process_group, topk=self.topk, tail=self.tail)

    def extra_repr(self):
        extra = "".join(f", {k}={getattr(self, k)!r}" for k in ("topk", "vocab_size", "chunk_size")
                        if getattr(self, k) is not None)
        return (f"beta={self.beta}, student_temperature={self.student_temperature}, "
                f"teacher_temperature={self.teacher_temperature}, reduction={self.reduction!r}{extra}")
