"""Plain, materializing PyTorch generalized JSD: the ground truth every kernel is tested against."""
from __future__ import annotations

import math

import torch


def reference_jsd(student_logits, teacher_logits, *, beta=0.5, student_temperature=1.0,
                  teacher_temperature=1.0, token_weights=None, reduction="mean"):
    """Generalized JSD between softmax(teacher/T_t) = P and softmax(student/T_s) = Q, per row.

    beta = 0: KL(P||Q); beta = 1: KL(Q||P); else beta KL(P||M) + (1-beta) KL(Q||M) with
    M = beta P + (1-beta) Q. Computes in the dtype of the inputs (pass float64 for ground truth);
    the teacher is detached.
    """
    s = torch.log_softmax(student_logits / student_temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.detach() / teacher_temperature, dim=-1)
    if beta == 0:
        rows = (t.exp() * (t - s)).sum(-1)
    elif beta == 1:
        rows = (s.exp() * (s - t)).sum(-1)
    else:
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0)
        rows = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    w = torch.ones_like(rows) if token_weights is None else token_weights.to(rows.dtype)
    if reduction == "none":
        return rows * w
    total = (rows * w).sum()
    if reduction == "sum":
        return total
    return total / w.sum().clamp_min(torch.finfo(rows.dtype).tiny)


def reference_fused_linear_jsd(student_hidden, teacher_hidden, weight, teacher_weight=None, *,
                               beta=0.5, student_temperature=1.0, teacher_temperature=1.0,
                               token_weights=None, reduction="mean", chunk_size=None, backend=None):
    """reference_jsd on logits h W^T materialized in the inputs' dtype; gradients reach h_s and W.

    chunk_size and backend are accepted, and ignored, so it is a drop-in for fused_linear_jsd."""
    teacher_weight = weight if teacher_weight is None else teacher_weight
    student_logits = student_hidden @ weight.T
    teacher_logits = teacher_hidden.detach() @ teacher_weight.detach().T
    return reference_jsd(student_logits, teacher_logits, beta=beta,
                         student_temperature=student_temperature,
                         teacher_temperature=teacher_temperature,
                         token_weights=token_weights, reduction=reduction)


def bucket_divergence(s, t, beta):
    """The generalized JSD between two distributions given as log-probabilities over the same
    buckets (last dim): beta = 0 KL(T||S), 1 KL(S||T), else beta KL(T||M) + (1-beta) KL(S||M)."""
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


def topk_buckets(s_full, t_full, k: int, tail: bool):
    """SDPO's top-k distillation buckets: the student's top-k tokens (by its own log-probs), both
    models' log-probs there, and one tail bucket log(1 - sum p) each (clamped as SDPO clamps it);
    without the tail, both renormalised over the k."""
    idx = torch.topk(s_full, k, dim=-1).indices
    s, t = s_full.gather(-1, idx), t_full.gather(-1, idx)
    if tail:
        def add_tail(lp):
            mass = torch.clamp(torch.logsumexp(lp, -1, keepdim=True), max=-1e-7)
            return torch.cat([lp, torch.log(-torch.expm1(mass))], -1)
        return add_tail(s), add_tail(t)
    return s - torch.logsumexp(s, -1, keepdim=True), t - torch.logsumexp(t, -1, keepdim=True)


def reference_topk_jsd(student_logits, teacher_logits, *, topk, tail=True, beta=0.5,
                       student_temperature=1.0, teacher_temperature=1.0, token_weights=None,
                       reduction="mean"):
    """Top-k distillation as SDPO computes it, materializing, in the inputs' dtype (float64 for
    ground truth): gradients reach the student through its full log-softmax."""
    s_full = torch.log_softmax(student_logits / student_temperature, dim=-1)
    t_full = torch.log_softmax(teacher_logits.detach() / teacher_temperature, dim=-1)
    s, t = topk_buckets(s_full, t_full, topk, tail)
    rows = bucket_divergence(s, t, beta)
    w = torch.ones_like(rows) if token_weights is None else token_weights.to(rows.dtype)
    if reduction == "none":
        return rows * w
    total = (rows * w).sum()
    return total if reduction == "sum" else total / w.sum().clamp_min(torch.finfo(rows.dtype).tiny)
