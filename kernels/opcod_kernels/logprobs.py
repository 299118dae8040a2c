"""Chunked log-probabilities of chosen tokens, log softmax((h W^T + b) / T)[y], without [N, V] logits."""
from __future__ import annotations

import torch

from .fused import _check_float, _low_precision_fp32_gemm_ok, _mm_f32, default_chunk_size


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, b, targets, inv_t, chunk):
        N = h.shape[0]
        out = torch.empty(N, dtype=torch.float32, device=h.device)
        buf = torch.empty(chunk, W.shape[0], dtype=torch.float32, device=h.device)
        # One fp32 copy of a low-precision weight where no low-precision -> fp32 GEMM exists (CPU).
        Wc = W if W.dtype == torch.float32 or (W.is_cuda and _low_precision_fp32_gemm_ok(W.device, W.dtype)) \
            else W.float()
        for start in range(0, N, chunk):
            c = min(chunk, N - start)
            hc = h[start:start + c]
            z = _mm_f32(hc if hc.dtype == Wc.dtype else hc.to(Wc.dtype), Wc.T, out=buf[:c])
            if b is not None:
                z.add_(b)
            z.mul_(inv_t)
            out[start:start + c] = z.gather(1, targets[start:start + c, None])[:, 0] - torch.logsumexp(z, 1)
        ctx.save_for_backward(h, W, b, targets)
        ctx.inv_t, ctx.chunk = inv_t, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # Recomputes each chunk: d logp / dz = (onehot(y) - softmax(z)) / T, scaled per row.
        h, W, b, targets = ctx.saved_tensors
        N = h.shape[0]
        dB = torch.zeros(W.shape[0], dtype=torch.float32, device=W.device) if ctx.needs_input_grad[2] else None
        dH = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dW = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if ctx.needs_input_grad[1] else None
        buf = torch.empty(ctx.chunk, W.shape[0], dtype=torch.float32, device=h.device)
        # The gradient tile is cast to the weight's dtype for the dH GEMM: bf16 keeps fp32's range,
        # fp16 would flush its small entries, so fp16 (and CPU) weights are taken in fp32.
        Wf = W if W.dtype == torch.float32 or (W.is_cuda and W.dtype == torch.bfloat16) else W.float()
        for start in range(0, N, ctx.chunk):
            c = min(ctx.chunk, N - start)
            hs = h[start:start + c]
            z = _mm_f32(hs if Wf.dtype != torch.float32 else hs.float(), Wf.T, out=buf[:c])
            if b is not None:
                z.add_(b)
            z.mul_(ctx.inv_t)
            g = torch.softmax(z, 1).neg_()
            g.scatter_add_(1, targets[start:start + c, None], torch.ones_like(g[:, :1]))
            g.mul_((grad_out[start:start + c].float() * ctx.inv_t)[:, None])
            gd = g if g.dtype == Wf.dtype else g.to(Wf.dtype)
            if dH is not None:
                dH[start:start + c] = (gd @ Wf).to(dH.dtype)
            if dW is not None:
                dW.addmm_(g.T, hs.float())
            if dB is not None:
                dB.add_(g.sum(0))
        return (dH, None if dW is None else dW.to(W.dtype), None if dB is None else dB.to(b.dtype),
                None, None, None)


def fused_linear_logprobs(hidden, weight, targets, *, temperature: float = 1.0, chunk_size: int | None = None,
                          bias=None):
    """log softmax((hidden @ weight.T + bias) / temperature) at `targets`: [N] fp32, differentiable
    in hidden, weight and bias; the workspace is one chunk of fp32 logits, never [N, V]."""
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] must agree, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.dtype != torch.long or tuple(targets.shape) != (hidden.shape[0],):
        raise ValueError(f"targets must be int64 of shape [{hidden.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if bias is not None:
        _check_float("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],) or bias.device != weight.device:
            raise ValueError(f"bias must be [{weight.shape[0]}] on {weight.device}, "
                             f"got {tuple(bias.shape)} on {bias.device}")
    chunk = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0], hidden.device)
    # The bias joins the fp32 logits (rounded to the inputs' dtype first, as a linear layer's would be).
    b = None if bias is None else bias.to(hidden.dtype).float()
    return _LinearLogprobs.apply(hidden, weight, b, targets, 1.0 / temperature,
                                 max(1, min(chunk, hidden.shape[0] or 1)))


def reference_logprobs(hidden, weight, targets, *, temperature: float = 1.0, bias=None):
    """Plain materializing log-probs (the ground truth)."""
    z = hidden @ weight.T if bias is None else hidden @ weight.T + bias
    return torch.log_softmax(z / temperature, -1).gather(1, targets[:, None])[:, 0]
