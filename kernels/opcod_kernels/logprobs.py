"""Chunked log-probabilities of chosen tokens, log softmax(h W^T / T)[y], without [N, V] logits."""
from __future__ import annotations

import torch

from .fused import _check_float, _mm_f32, default_chunk_size


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, targets, inv_t, chunk):
        N = h.shape[0]
        out = torch.empty(N, dtype=torch.float32, device=h.device)
        buf = torch.empty(chunk, W.shape[0], dtype=torch.float32, device=h.device)
        for start in range(0, N, chunk):
            c = min(chunk, N - start)
            z = _mm_f32(h[start:start + c], W.T, out=buf[:c]).mul_(inv_t)
            out[start:start + c] = z.gather(1, targets[start:start + c, None])[:, 0] - torch.logsumexp(z, 1)
        ctx.save_for_backward(h, W, targets)
        ctx.inv_t, ctx.chunk = inv_t, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # Recomputes each chunk: d logp / dz = (onehot(y) - softmax(z)) / T, scaled per row.
        h, W, targets = ctx.saved_tensors
        N = h.shape[0]
        dH = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dW = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if ctx.needs_input_grad[1] else None
        buf = torch.empty(ctx.chunk, W.shape[0], dtype=torch.float32, device=h.device)
        Wf = W if W.dtype == torch.float32 or W.is_cuda else W.float()
        for start in range(0, N, ctx.chunk):
            c = min(ctx.chunk, N - start)
            hs = h[start:start + c]
            z = _mm_f32(hs, W.T, out=buf[:c]).mul_(ctx.inv_t)
            g = torch.softmax(z, 1).neg_()
            g.scatter_add_(1, targets[start:start + c, None], torch.ones_like(g[:, :1]))
            g.mul_((grad_out[start:start + c].float() * ctx.inv_t)[:, None])
            gd = g if g.dtype == Wf.dtype else g.to(Wf.dtype)
            if dH is not None:
                dH[start:start + c] = (gd @ Wf).to(dH.dtype)
            if dW is not None:
                dW.addmm_(g.T, hs.float())
        return dH, None if dW is None else dW.to(W.dtype), None, None, None


def fused_linear_logprobs(hidden, weight, targets, *, temperature: float = 1.0, chunk_size: int | None = None):
    """log softmax(hidden @ weight.T / temperature) at `targets`: [N] fp32, differentiable in
    hidden and weight; the workspace is one chunk of fp32 logits, never [N, V]."""
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
    chunk = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0], hidden.device)
    return _LinearLogprobs.apply(hidden, weight, targets, 1.0 / temperature, max(1, min(chunk, hidden.shape[0] or 1)))


def reference_logprobs(hidden, weight, targets, *, temperature: float = 1.0):
    """Plain materializing log-probs (the ground truth)."""
    return torch.log_softmax(hidden @ weight.T / temperature, -1).gather(1, targets[:, None])[:, 0]
