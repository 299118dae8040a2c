"""Triton row kernel of the fused linear-JSD loss (CUDA; CPU tensors run it in the interpreter)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# The math is the one in csrc/jsd_rows.cpp (see its header): d = t - s is built from the logit
# difference and a log-sum-exp difference kept in float64, and every term is written in d.
# Unlike the C++ kernel, pass 3 recomputes q and r instead of storing them: on a GPU the extra
# transcendentals are cheaper than another [C, V] write.


@triton.jit
def _em1md_small(x):
    """expm1(x) - x for |x| < 0.5, by its series."""
    p = 1.0 / 362880.0
    p = p * x + 1.0 / 40320.0
    p = p * x + 1.0 / 5040.0
    p = p * x + 1.0 / 720.0
    p = p * x + 1.0 / 120.0
    p = p * x + 1.0 / 24.0
    p = p * x + 1.0 / 6.0
    p = p * x + 0.5
    return x * x * p


@triton.jit
def _expm1(x):
    xc = tl.minimum(x, 80.0)
    return tl.where((x > -0.5) & (x < 0.5), x + _em1md_small(x), tl.exp(xc) - 1.0)


@triton.jit
def _log1p(y):
    s = y / (2.0 + y)
    s2 = s * s
    p = 1.0 / 17.0
    p = p * s2 + 1.0 / 15.0
    p = p * s2 + 1.0 / 13.0
    p = p * s2 + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    p = p * s2 + 1.0
    small = 2.0 * s * p
    return tl.where((y > -0.4) & (y < 0.4), small, tl.log(tl.maximum(1.0 + y, 1e-30)))


@triton.jit
def _f_small(x):
    """x e^x - expm1(x) for |x| < 0.5."""
    return x * x + (x - 1.0) * _em1md_small(x)


@triton.jit
def _times(a, b):
    """a * b, and 0 where a == 0 (a zero probability times an infinite log-ratio)."""
    return tl.where(a == 0.0, 0.0, a * b)


@triton.jit
def _row_terms(us, ut, ls, dl, beta, MODE: tl.constexpr):
    """One block's loss terms (each >= 0 and O(d^2) near d = 0, see csrc/jsd_rows.cpp), q, and the
    raw gradient r: the gradient is r - q sum(r), centred with the same d so an error in dl
    cancels. MODE 0 forward KL, 1 reverse KL, 2 mixture."""
    dead = (us == float("-inf")) & (ut == float("-inf"))  # vocabulary padding: absent in both
    d = tl.where(dead, 0.0, (ut - us) - dl)
    q = tl.exp(us - ls)
    p = tl.exp(ut - (ls + dl))
    near = (d > -0.5) & (d < 0.5)
    if MODE == 0:
        term = tl.where(near, q * _f_small(d), _times(p, d) - p + q)
        dc = tl.minimum(tl.maximum(d, -0.5), 0.5)
        r = tl.where(near, -q * _expm1(dc), q - p)
    elif MODE == 1:
        term = tl.where(near, q * _em1md_small(d), -_times(q, d) + p - q)
        r = -_times(q, d)
    else:
        dpos = d > 0.0
        h = _log1p(tl.where(dpos, 1.0 - beta, beta) * _expm1(tl.where(dpos, -d, d)))
        g = tl.where(dpos, d + h, h)  # log(m / q)
        dmg = tl.where(dpos, -h, d - h)  # log(p / m)
        dc = tl.minimum(tl.maximum(d, -0.5), 0.5)
        gc = tl.minimum(tl.maximum(g, -0.5), 0.5)
        close = q * (beta * _f_small(dc) - _f_small(gc))
        term = tl.where(near, close, beta * _times(p, dmg) - (1.0 - beta) * _times(q, g))
        r = -(1.0 - beta) * _times(q, g)
    return term, q, r


@triton.jit
def _jsd_rows_kernel(zs_ptr, zt_ptr, g_ptr, scale_ptr, loss_ptr, stride_s, stride_t, stride_g, V,
                     inv_ts, inv_tt, beta,
                     MODE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * stride_s
    zt_row = zt_ptr + row * stride_t
    g_row = g_ptr + row * stride_g  # the gradient's destination: zs itself, or a bf16 buffer
    offs = tl.arange(0, BLOCK)
    scale = tl.load(scale_ptr + row)
    if scale == 0.0:
        if WRITE_GRAD:
            for start in range(0, V, BLOCK):
                cols = start + offs
                tl.store(g_row + cols, tl.zeros([BLOCK], tl.float32).to(g_ptr.dtype.element_ty), mask=cols < V)
        tl.store(loss_ptr + row, 0.0)
    else:
        # Pass 1: both log-sum-exps, online over vocabulary blocks; sums in float64.
        m_s = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
        m_t = m_s
        sum_s = tl.sum(tl.zeros([BLOCK], tl.float64), axis=0)
        sum_t = sum_s
        for start in range(0, V, BLOCK):
            cols = start + offs
            mask = cols < V
            us = tl.load(zs_row + cols, mask=mask, other=float("-inf")) * inv_ts
            ut = tl.load(zt_row + cols, mask=mask, other=float("-inf")) * inv_tt
            new_s = tl.maximum(m_s, tl.max(us, axis=0))
            new_t = tl.maximum(m_t, tl.max(ut, axis=0))
            sum_s = sum_s * tl.exp(m_s - new_s).to(tl.float64) \
                + tl.sum(tl.exp(us - new_s), axis=0).to(tl.float64)
            sum_t = sum_t * tl.exp(m_t - new_t).to(tl.float64) \
                + tl.sum(tl.exp(ut - new_t), axis=0).to(tl.float64)
            m_s = new_s
            m_t = new_t
        # Per-row scalars in float64: log of a ratio near 1 in fp32 would shift every d by ~1e-7.
        ls = (m_s.to(tl.float64) + tl.log(sum_s)).to(tl.float32)
        dl = ((m_t - m_s).to(tl.float64) + tl.log(sum_t / sum_s)).to(tl.float32)
        gscale = scale * inv_ts

        # Pass 2: the loss, and the raw gradient's row sum.
        acc_l = tl.sum(tl.zeros([BLOCK], tl.float64), axis=0)
        acc_r = acc_l
        for start in range(0, V, BLOCK):
            cols = start + offs
            mask = cols < V
            us = tl.load(zs_row + cols, mask=mask, other=0.0) * inv_ts
            ut = tl.load(zt_row + cols, mask=mask, other=0.0) * inv_tt
            term, q, r = _row_terms(us, ut, ls, dl, beta, MODE)
            acc_l += tl.sum(tl.where(mask, term, 0.0), axis=0).to(tl.float64)
            acc_r += tl.sum(tl.where(mask, r, 0.0), axis=0).to(tl.float64)
        tl.store(loss_ptr + row, acc_l.to(tl.float32))

        # Pass 3: the gradient r - q sum(r), recomputed (cheaper on a GPU than storing q and r).
        if WRITE_GRAD:
            c = acc_r.to(tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + offs
                mask = cols < V
                us = tl.load(zs_row + cols, mask=mask, other=0.0) * inv_ts
                ut = tl.load(zt_row + cols, mask=mask, other=0.0) * inv_tt
                term, q, r = _row_terms(us, ut, ls, dl, beta, MODE)
                tl.store(g_row + cols, ((r - _times(q, c)) * gscale).to(g_ptr.dtype.element_ty), mask=mask)


def _kernel_for(device: torch.device):
    # Triton's own library functions are compiled or interpreted depending on TRITON_INTERPRET at
    # import, so CPU tensors can only run this kernel in a process that set it before importing.
    from triton.runtime.interpreter import InterpretedFunction
    if device.type == "cpu" and not isinstance(_jsd_rows_kernel, InterpretedFunction):
        raise ValueError("backend='triton' with CPU tensors needs TRITON_INTERPRET=1 in the "
                         "environment before triton is imported; use backend='cpp' or 'auto' on CPU")
    return _jsd_rows_kernel


def beta_mode(beta: float) -> int:
    return 0 if beta == 0.0 else (1 if beta == 1.0 else 2)


def jsd_rows(zs: torch.Tensor, zt: torch.Tensor, row_scale: torch.Tensor, loss: torch.Tensor,
             inv_ts: float, inv_tt: float, beta: float, write_grad: bool,
             grad_out: torch.Tensor | None = None, block: int | None = None) -> None:
    """Per-row loss into `loss`; if write_grad, row_scale * dL/dz_s goes into zs (fp32), or
    straight into grad_out (e.g. bf16) when given, which saves a conversion pass over the chunk."""
    C, V = zs.shape
    if C == 0:
        return
    if block is None:
        block = min(4096, triton.next_power_of_2(V)) if zs.is_cuda else min(1024, triton.next_power_of_2(V))
    kernel = _kernel_for(zs.device)
    kwargs = {"num_warps": 8} if zs.is_cuda else {}
    g = zs if grad_out is None else grad_out
    assert g.shape == zs.shape and g.stride(1) == 1
    kernel[(C,)](zs, zt, g, row_scale, loss, zs.stride(0), zt.stride(0), g.stride(0), V,
                 float(inv_ts), float(inv_tt), float(beta),
                 MODE=beta_mode(beta), WRITE_GRAD=bool(write_grad), BLOCK=block, **kwargs)
