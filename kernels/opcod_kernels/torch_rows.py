"""The row math of csrc/jsd_rows.cpp in plain PyTorch ops: for machines without a compiler, and
for a vocabulary split over ranks (each rank holds some columns; per-row scalars are all-reduced)."""
from __future__ import annotations

import math

import torch


def em1md(x: torch.Tensor) -> torch.Tensor:
    """expm1(x) - x by its series (for |x| < 0.5, where the subtraction would cancel)."""
    p = torch.full_like(x, 1.0 / 362880.0)
    for c in (1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5):
        p = p * x + c
    return x * x * p


def _times(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a * b with 0 * inf = 0: a probability of exactly 0 contributes nothing."""
    return torch.where(a == 0, torch.zeros_like(a), a * b)


def _f_small(x: torch.Tensor) -> torch.Tensor:
    """x e^x - expm1(x) near 0: x^2 + (x - 1)(expm1 x - x)."""
    return x * x + (x - 1) * em1md(x)


def terms(us, ut, ls, dl, beta: float):
    """Per column: the loss term (each >= 0 and O(d^2) near d = 0), q, and the raw gradient r
    (the gradient is r - q sum(r); see csrc/jsd_rows.cpp for the derivation)."""
    q = torch.exp(us - ls)
    p = torch.exp(ut - (ls + dl))
    # A column that is -inf in both (vocabulary padding) is absent: d = 0 and q = p = 0.
    d = torch.where(torch.isneginf(us) & torch.isneginf(ut), torch.zeros_like(us), (ut - us) - dl)
    small = d.abs() < 0.5
    if beta == 0.0:
        # p d - p + q per term (they sum to KL(P||Q) since sum p = sum q), near d = 0 written
        # q (d^2 + (d - 1)(expm1 d - d)), so no term cancels another.
        term = torch.where(small, q * _f_small(d), _times(p, d) - p + q)
        r = torch.where(small, -q * torch.expm1(d), q - p)
    elif beta == 1.0:
        term = torch.where(small, q * em1md(d), -_times(q, d) + p - q)  # q expm1(d) - q d
        r = -_times(q, d)
    else:
        pos = d > 0
        h = torch.where(pos, torch.log1p((1 - beta) * torch.expm1(-d.clamp(min=0))),
                        torch.log1p(beta * torch.expm1(d.clamp(max=0))))
        g = torch.where(pos, d + h, h)  # log(m / q)
        dmg = torch.where(pos, -h, d - h)  # log(p / m)
        # beta p (d - g) - (1 - beta) q g, which near d = 0 is q (beta F(d) - F(g)), F(x) = x e^x - expm1 x.
        term = torch.where(small, q * (beta * _f_small(d) - _f_small(g)),
                           beta * _times(p, dmg) - (1 - beta) * _times(q, g))
        r = -(1 - beta) * _times(q, g)
    return term, q, r


def _finish(zs, row, q, r_sum, r, row_scale, loss, inv_ts, write_grad, grad_out):
    keep = row_scale != 0
    loss.copy_(torch.where(keep, row.float(), torch.zeros_like(loss)))
    if write_grad:
        grad = r - _times(q, r_sum.float())
        zs.copy_(torch.where(keep[:, None], grad * (row_scale * inv_ts)[:, None], torch.zeros_like(grad)))
        if grad_out is not None:
            grad_out.copy_(zs)


def jsd_rows(zs: torch.Tensor, zt: torch.Tensor, row_scale: torch.Tensor, loss: torch.Tensor,
             inv_ts: float, inv_tt: float, beta: float, write_grad: bool,
             grad_out: torch.Tensor | None = None) -> None:
    """Per-row loss into `loss`; if write_grad, zs becomes row_scale * dL/dz_s (fp32), also
    copied into grad_out (e.g. bf16) when given.

    Allocates a few [C, V] fp32 temporaries: bounded by the chunk, as the chunk loop requires.
    """
    us, ut = zs * inv_ts, zt * inv_tt
    m_s, m_t = us.amax(1, keepdim=True), ut.amax(1, keepdim=True)
    sum_s = torch.exp(us - m_s).sum(1, keepdim=True, dtype=torch.float64)
    sum_t = torch.exp(ut - m_t).sum(1, keepdim=True, dtype=torch.float64)
    ls = (m_s.double() + torch.log(sum_s)).float()
    # lse_t - lse_s from the exact maxima and the ratio of the sums (see csrc/jsd_rows.cpp).
    dl = ((m_t - m_s).double() + torch.log(sum_t / sum_s)).float()
    term, q, r = terms(us, ut, ls, dl, beta)
    del ut
    _finish(zs, term.double().sum(1), q, r.double().sum(1, keepdim=True), r, row_scale, loss, inv_ts,
            write_grad, grad_out)


def jsd_rows_sharded(zs: torch.Tensor, zt: torch.Tensor, row_scale: torch.Tensor, loss: torch.Tensor,
                     inv_ts: float, inv_tt: float, beta: float, write_grad: bool,
                     grad_out: torch.Tensor | None = None, *, group=None) -> None:
    """jsd_rows over this rank's columns of a vocabulary split across `group`: the maxima, the
    exp-sums, the loss and the gradient's row sum are all-reduced as per-row scalars ([C, 2] at a
    time), never a column; every rank gets the whole rows' loss and its own columns' gradient."""
    import torch.distributed as dist
    us, ut = zs * inv_ts, zt * inv_tt
    m = torch.stack([us.amax(1), ut.amax(1)], 1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m_s, m_t = m[:, :1], m[:, 1:]
    sums = torch.cat([torch.exp(us - m_s).sum(1, keepdim=True, dtype=torch.float64),
                      torch.exp(ut - m_t).sum(1, keepdim=True, dtype=torch.float64)], 1)
    dist.all_reduce(sums, group=group)
    sum_s, sum_t = sums[:, :1], sums[:, 1:]
    ls = (m_s.double() + torch.log(sum_s)).float()
    dl = ((m_t - m_s).double() + torch.log(sum_t / sum_s)).float()
    term, q, r = terms(us, ut, ls, dl, beta)
    del ut
    parts = torch.stack([term.double().sum(1), r.double().sum(1)], 1)
    dist.all_reduce(parts, group=group)
    _finish(zs, parts[:, 0], q, parts[:, 1:], r, row_scale, loss, inv_ts, write_grad, grad_out)


def topk_rows(zs: torch.Tensor, zt: torch.Tensor, row_scale: torch.Tensor, loss: torch.Tensor,
              inv_ts: float, inv_tt: float, beta: float, write_grad: bool,
              grad_out: torch.Tensor | None = None, *, k: int, tail: bool) -> None:
    """jsd_rows' contract for SDPO's top-k distillation (opcod_kernels.reference.topk_buckets): per
    row the student's top-k tokens and a tail bucket, each model normalised over its full
    vocabulary; the gradient flows through the student's full log-softmax.

    The bucket math is float64 over [C, k + 1]. With G_b = dD/ds_b per bucket, the gradient on the
    student's scaled logits u is G_j - q_j (sum G_k + G_tail) on the k tokens and
    -q_j (sum G_k - G_tail S / (1 - S)) elsewhere (S = the k tokens' mass; no tail gradient where
    SDPO clamps it); without the tail, G_j - pi_j sum G_k on the k tokens (pi: renormalised) and 0."""
    from .reference import bucket_divergence
    us, ut = zs * inv_ts, zt * inv_tt
    ls = torch.logsumexp(us, 1, keepdim=True)
    lt = torch.logsumexp(ut, 1, keepdim=True)
    idx = torch.topk(us, k, dim=1).indices
    s = (us.gather(1, idx) - ls).double()
    t = (ut.gather(1, idx) - lt).double()
    if tail:
        mass = torch.logsumexp(s, 1, keepdim=True)
        clamped = mass > -1e-7
        s = torch.cat([s, torch.log(-torch.expm1(mass.clamp(max=-1e-7)))], 1)
        t = torch.cat([t, torch.log(-torch.expm1(torch.logsumexp(t, 1, keepdim=True).clamp(max=-1e-7)))], 1)
    else:
        s = s - torch.logsumexp(s, 1, keepdim=True)
        t = t - torch.logsumexp(t, 1, keepdim=True)
    rows = bucket_divergence(s, t, beta)
    keep = row_scale != 0
    loss.copy_(torch.where(keep, rows.float(), torch.zeros_like(loss)))
    if not write_grad:
        return
    if beta == 0.0:
        G = -t.exp()
    elif beta == 1.0:
        G = s.exp() * (s - t + 1)
    else:
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), 0)
        G = (1 - beta) * s.exp() * (s - m)
    if tail:
        G_k, G_tail = G[:, :k], torch.where(clamped, torch.zeros_like(G[:, k:]), G[:, k:])
        S = torch.exp(mass).clamp(max=1 - 1e-7)
        q = torch.exp(us - ls)
        grad = -q * (G_k.sum(1, keepdim=True) - G_tail * S / (1 - S)).float()
        on_k = G_k - torch.exp(s[:, :k]) * (G_k.sum(1, keepdim=True) + G_tail)
    else:
        grad = torch.zeros_like(us)
        on_k = G - torch.exp(s) * G.sum(1, keepdim=True)
    grad.scatter_(1, idx, on_k.float())
    zs.copy_(torch.where(keep[:, None], grad * (row_scale * inv_ts)[:, None], torch.zeros_like(grad)))
    if grad_out is not None:
        grad_out.copy_(zs)
