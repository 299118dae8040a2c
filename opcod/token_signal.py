"""Where a step's distillation signal sits: each rollout's per-token divergence from its self-teacher
and, at its largest token, the loss's gradient on the student's logits against the forward KL's."""
from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch
from opcod_kernels import reference_jsd

from .step import Rollout


def rollout_logits(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """[len(response), V] float64 logits that predict each response token after `prompt` (only the
    last len(response) + 1 rows leave the LM head: a long teacher prompt costs no [T, V] logits)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response], device=device), logits_to_keep=len(response) + 1).logits[0]
    return logits[:-1].double()


def token_signal(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> dict:
    """From one rollout's student and teacher logits ([T, V]): the divergence summed over its
    tokens, its largest token (index and value), and the gradient norm of the beta-divergence on
    the student's logits there as a fraction of the forward KL's (beta = 0): near 1 where the loss
    pulls as hard as KL, near 0 where it has saturated (student and teacher sure of other tokens)."""
    rows, norms = {}, {}
    for b in dict.fromkeys((beta, 0.0)):
        x = student.detach().clone().requires_grad_(True)
        div = reference_jsd(x, teacher, beta=b, reduction="none")
        div.sum().backward()
        rows[b], norms[b] = div.detach(), x.grad.norm(dim=-1)
    k = int(rows[beta].argmax())
    kl = norms[0.0][k].item()
    return {"tokens": len(rows[beta]), "divergence": rows[beta].sum().item(), "largest_token": k,
            "largest": rows[beta][k].item(), "gradient": norms[beta][k].item(),
            # None where student and teacher agree there (to rounding): no pull to compare.
            "gradient_vs_forward_kl": norms[beta][k].item() / kl if kl > 1e-12 else None}


def rollout_signals(model, rollouts: Sequence[Rollout], beta: float) -> list[dict]:
    """token_signal of every rollout that has a teacher context (teacher_contexts) and a response,
    the model being both student and teacher (the current-weights self-teacher), with the exact
    full-vocabulary loss (not loss.topk's buckets)."""
    out = []
    for r in rollouts:
        if r.has_teacher and r.response_ids:
            s = rollout_logits(model, r.prompt_ids, r.response_ids)
            t = rollout_logits(model, r.teacher_prompt_ids, r.response_ids)
            out.append({"correct": r.reward > 0, **token_signal(s, t, beta)})
    return out


def summarize(signals: Sequence[dict]) -> dict:
    """Per kind of rollout (wrong, right): how many, the mean divergence per rollout, the mean share
    of it at the largest token, and the median gradient norm there, absolute and as a fraction of
    forward KL's."""
    out = {}
    for kind, correct in (("wrong", False), ("right", True)):
        group = [s for s in signals if s["correct"] == correct]
        if not group:
            out[kind] = {"rollouts": 0}
            continue
        out[kind] = {"rollouts": len(group),
                     "divergence": statistics.fmean(s["divergence"] for s in group),
                     "largest_share": statistics.fmean(s["largest"] / s["divergence"] if s["divergence"] > 0 else 0.0
                                                       for s in group),
                     "gradient": statistics.median(s["gradient"] for s in group),
                     "gradient_vs_forward_kl": _median([s["gradient_vs_forward_kl"] for s in group])}
    return out


def _median(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def format_summary(summary: dict, beta: float) -> str:
    lines = [f"distillation signal (exact loss at beta {beta}, current weights as teacher) on the rollouts "
             "with kept feedback; divergence and share: means, gradients: medians:"]
    for kind, s in summary.items():
        if not s["rollouts"]:
            lines.append(f"  {kind}: none")
            continue
        ratio = s["gradient_vs_forward_kl"]
        lines.append(f"  {kind} {s['rollouts']}: divergence {s['divergence']:.4f} per rollout, "
                     f"{100 * s['largest_share']:.0f} % of it at its largest token; the gradient there "
                     f"{s['gradient']:.4f}, " + ("-" if ratio is None else f"{100 * ratio:.2f} %")
                     + " of forward KL's")
    return "\n".join(lines)
