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
