"""The row math of csrc/jsd_rows.cpp in plain PyTorch ops, for machines without a compiler."""
from __future__ import annotations

import torch


def jsd_rows(zs: torch.Tensor, zt: torch.Tensor, row_scale: torch.Tensor, loss: torch.Tensor,
             inv_ts: float, inv_tt: float, beta: float, write_grad: bool,
             grad_out: torch.Tensor | None = None) -> None:
    """Per-row loss into `loss`; if write_grad, zs becomes row_scale * dL/dz_s (fp32), also
    copied into grad_out (e.g. bf16) when given.

    Allocates a few [C, V] fp32 temporaries: bounded by the chunk, as the chunk loop requires.
    """
    us = zs * inv_ts
    ut = zt * inv_tt
    m_s = us.amax(1, keepdim=True)
    m_t = ut.amax(1, keepdim=True)
    sum_s = torch.exp(us - m_s).sum(1, keepdim=True, dtype=torch.float64)
    sum_t = torch.exp(ut - m_t).sum(1, keepdim=True, dtype=torch.float64)
    s = us - (m_s + torch.log(sum_s).float())
    # lse_t - lse_s from the exact maxima and the ratio of the sums (see csrc/jsd_rows.cpp).
    d = (ut - us) - ((m_t - m_s).double() + torch.log(sum_t / sum_s)).float()
    del ut
    q = torch.exp(s)
    if beta == 0.0:
        p = torch.exp(s + d)
        row = (p * d).double().sum(1)
        grad = torch.where(d.abs() < 0.5, -q * torch.expm1(d.clamp(-0.5, 0.5)), q - p)
    elif beta == 1.0:
        row = -(q * d).double().sum(1)
        grad = q * (-d - row.float()[:, None])
    else:
        pos = d > 0
        h = torch.where(pos, torch.log1p((1 - beta) * torch.expm1(-d.clamp(min=0))),
                        torch.log1p(beta * torch.expm1(d.clamp(max=0))))
        g = torch.where(pos, d + h, h)
        p = torch.exp(s + d)
        kl_pm = (p * torch.where(pos, -h, d - h)).double().sum(1)
        kl_qm = -(q * g).double().sum(1)
        row = beta * kl_pm + (1 - beta) * kl_qm
        grad = (1 - beta) * q * (-g - kl_qm.float()[:, None])
    keep = row_scale != 0
    loss.copy_(torch.where(keep, row.float(), torch.zeros_like(loss)))
    if write_grad:
        zs.copy_(grad * (row_scale * inv_ts)[:, None])
        if grad_out is not None:
            grad_out.copy_(zs)
