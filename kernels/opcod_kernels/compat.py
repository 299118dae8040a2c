"""Liger-Kernel's fused linear JSD call signatures on opcod_kernels: a trainer switches with one import."""
from __future__ import annotations

import torch
from torch import nn

from .fused import autocast_dtype, fused_linear_jsd
from .logprobs import fused_linear_logprobs

# Conventions, as in liger-kernel >= 0.5.6 (its chunked JSD before that, 0.5.3-0.5.5, mixed
# M = beta Q + (1 - beta) P under the same weights; that variant is not reproduced):
#   beta = 0: KL(P || Q) (forward), beta = 1: KL(Q || P) (reverse), else with M = beta P + (1 - beta) Q,
#   beta KL(P || M) + (1 - beta) KL(Q || M); P the teacher, Q the student. This is TRL's
#   generalized_jsd_loss and opcod_kernels' own convention, so beta passes through unchanged.
#   One temperature divides both models' logits; rows whose label is ignore_index add nothing, and
#   the sums are divided by the number of the other rows (at least 1).


def _valid_count(mask: torch.Tensor) -> torch.Tensor:
    # A tensor, so no host sync; a batch with every row ignored divides by 1 and gives 0, as Liger.
    return mask.sum().clamp_min(1).to(torch.float32)


class LigerFusedLinearJSDLoss(nn.Module):
    """liger_kernel.chunked_loss.LigerFusedLinearJSDLoss, computed by fused_linear_jsd.

    loss = weight_hard_loss * CE(student logits, true_labels) + weight_soft_loss * JSD, each summed
    over the rows whose label is not ignore_index and divided by their count. The cross-entropy uses
    the student's logits without temperature, the JSD both models' logits divided by `temperature`.
    Biases are added to the logits. A teacher vocabulary larger than the student's pads the student's
    logits with zeros, as Liger does (the student's weight and bias are padded with zero rows, so the
    padding gets no gradient into them). `compiled` is accepted and ignored (nothing here is
    compiled); `chunk_size` is the rows per chunk, as in Liger; the logits' workspace is
    2 x chunk_size x V fp32. Gradients reach student_input, student_weight and student_bias.
    """

    def __init__(self, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5, beta: float = 0.5,
                 ignore_index: int = -100, temperature: float = 1.0, compiled: bool = True,
                 chunk_size: int = 1024, return_soft_hard_loss: bool = False):
        super().__init__()
        if temperature == 0:
            raise ValueError("temperature must not be 0")
        self.weight_hard_loss, self.weight_soft_loss = weight_hard_loss, weight_soft_loss
        self.beta, self.ignore_index, self.temperature = beta, ignore_index, temperature
        self.compiled, self.chunk_size, self.return_soft_hard_loss = compiled, chunk_size, return_soft_hard_loss

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, true_labels,
                student_bias=None, teacher_bias=None):
        return liger_fused_linear_jsd_loss(
            student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias, teacher_bias,
            weight_hard_loss=self.weight_hard_loss, weight_soft_loss=self.weight_soft_loss, beta=self.beta,
            ignore_index=self.ignore_index, temperature=self.temperature, chunk_size=self.chunk_size,
            return_soft_hard_loss=self.return_soft_hard_loss)


def liger_fused_linear_jsd_loss(student_input, student_weight, teacher_input, teacher_weight, true_labels,
                                student_bias=None, teacher_bias=None, *, weight_hard_loss=0.5,
                                weight_soft_loss=0.5, beta=0.5, ignore_index=-100, temperature=1.0,
                                chunk_size=1024, return_soft_hard_loss=False):
    """The function behind LigerFusedLinearJSDLoss: (loss) or (loss, soft_loss, hard_loss)."""
    if not isinstance(true_labels, torch.Tensor):
        raise ValueError("true_labels must be an integer tensor [N] (LigerFusedLinearJSDLoss needs labels)")
    v_s, v_t = student_weight.shape[0], teacher_weight.shape[0]
    if v_s > v_t:
        raise ValueError(f"student_weight has {v_s} rows, more than teacher_weight's {v_t}: Liger pads only the "
                         "student; for other paddings call opcod_kernels.fused_linear_jsd with vocab_size")
    weight, bias = student_weight, student_bias
    if v_t > v_s:  # Liger pads the student's logits with zeros: zero rows give exactly those logits
        weight = torch.cat([student_weight, student_weight.new_zeros(v_t - v_s, student_weight.shape[1])])
        bias = None if bias is None else torch.cat([bias, bias.new_zeros(v_t - v_s)])
    if teacher_bias is None and bias is not None and teacher_weight is weight:
        teacher_bias = bias.new_zeros(v_t)  # Liger's teacher has no bias unless given one
    mask = true_labels != ignore_index
    n = _valid_count(mask)
    soft = fused_linear_jsd(student_input, teacher_input, weight, teacher_weight, beta=beta,
                            student_temperature=temperature, teacher_temperature=temperature,
                            labels=true_labels, ignore_index=ignore_index, bias=bias, teacher_bias=teacher_bias,
                            reduction="sum", chunk_size=chunk_size) / n
    if weight_hard_loss != 0 or return_soft_hard_loss:
        hard = _hard_loss(student_input, student_weight, student_bias, true_labels, mask, chunk_size) / n
    else:
        hard = soft.new_zeros(())  # Liger computes it and weighs it by 0; skipped here
    loss = weight_hard_loss * hard + weight_soft_loss * soft
    return (loss, soft, hard) if return_soft_hard_loss else loss


def _hard_loss(hidden, weight, bias, labels, mask, chunk_size):
    """Summed cross-entropy of the student's untempered logits at the kept labels."""
    amp = autocast_dtype(hidden.device)
    if amp is not None and hidden.dtype != torch.float64:  # as autocast would run the student's head
        hidden, weight = hidden.to(amp), weight.to(amp)
        bias = None if bias is None else bias.to(amp)
    targets = torch.where(mask, labels, torch.zeros_like(labels))  # any valid index; masked below
    logp = fused_linear_logprobs(hidden, weight, targets, chunk_size=chunk_size, bias=bias)
    return -(logp * mask).sum()


class LigerFusedLinearJSD(nn.Module):
    """liger_kernel.transformers.LigerFusedLinearJSD, computed by fused_linear_jsd: the generalized
    JSD of temperature-scaled logits, averaged over the rows whose shift_labels are not ignore_index
    (all rows without labels). `accum_dtype` is accepted and ignored: dW always accumulates in fp32.
    Under torch.autocast the GEMMs take autocast's dtype and fp32 weights get fp32 gradients."""

    def __init__(self, jsd_beta: float = 0.5, ignore_index: int = -100, temperature: float = 1.0,
                 accum_dtype: torch.dtype | None = None):
        super().__init__()
        if temperature == 0:
            raise ValueError("temperature must not be 0")
        self.jsd_beta, self.ignore_index, self.temperature, self.accum_dtype = (
            jsd_beta, ignore_index, temperature, accum_dtype)

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, shift_labels=None):
        return fused_linear_jsd(student_input, teacher_input, student_weight, teacher_weight, beta=self.jsd_beta,
                                student_temperature=self.temperature, teacher_temperature=self.temperature,
                                labels=shift_labels, ignore_index=self.ignore_index)


__all__ = ["LigerFusedLinearJSDLoss", "LigerFusedLinearJSD", "liger_fused_linear_jsd_loss"]
