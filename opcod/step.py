"""One OPCoD step's data and loss: rollouts, self-anchors, gated tutor feedback, teacher contexts,
and the token-level self-distillation loss through fused_linear_jsd."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import prompts
from .data import Problem
from .effects import ARMS, context
from .feedback import OutcomeCounts, anchor, names_letter
from .grading import reward


@dataclass
class Rollout:
    problem: Problem
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    reward: float
    solution: str | None = None      # the self-anchor: another correct rollout of the same prompt
    feedback: str | None = None      # kept, sanitized tutor feedback
    outcome: str | None = None       # anchoring outcome when feedback was requested
    leak: bool = False               # kept feedback that still names the gold letter after sanitizing
    teacher_prompt_ids: list[int] | None = None

    @property
    def has_teacher(self) -> bool:
        return self.teacher_prompt_ids is not None


def prompt_ids(tokenizer, problem: Problem) -> list[int]:
    text = prompts.render(tokenizer, prompts.messages(problem.prompt))
    return tokenizer.encode(text, add_special_tokens=False)


def self_anchors(group: Sequence[Rollout], allow_self: bool) -> None:
    """Each rollout's solution: the first *other* correct rollout of its prompt (or itself, if allowed)."""
    for j, r in enumerate(group):
        for k, other in enumerate(group):
            if other.reward > 0 and (k != j or allow_self):
                r.solution = other.text
                break


def request_feedback(rollouts: Sequence[Rollout], allowed: Callable[[Rollout], bool], tutor_generate,
                     tokenizer) -> OutcomeCounts:
    """Ask the tutor about every rollout the gate allows; keep only anchored feedback."""
    counts = OutcomeCounts()
    asked = [r for r in rollouts if allowed(r)]
    if not asked:
        return counts
    tutor_prompts = [tokenizer.encode(prompts.render(tokenizer, prompts.tutor_messages(r.problem.prompt, r.text)),
                                      add_special_tokens=False) for r in asked]
    replies = tutor_generate(tutor_prompts)
    for r, ids in zip(asked, replies):
        # In training the gold label and the option texts are known: every statement of them goes.
        result = anchor(tokenizer.decode(ids, skip_special_tokens=True), r.problem.text,
                        answer=r.problem.answer, options=r.problem.options)
        r.outcome = result.outcome
        r.feedback = result.text
        r.leak = result.text is not None and names_letter(result.text, r.problem.answer)
        counts.add(result.outcome)
    return counts


def reprompt_ids(r: Rollout, solution: str | None, feedback: str | None, tokenizer, max_solution_tokens: int,
                 max_feedback_tokens: int) -> list[int]:
    """The self-teacher's prompt: r's question with a solution and/or feedback in context."""
    user = prompts.reprompt_message(r.problem.prompt, solution, feedback, tokenizer, max_solution_tokens,
                                    max_feedback_tokens)
    return tokenizer.encode(prompts.render(tokenizer, prompts.messages(user)), add_special_tokens=False)


def teacher_contexts(rollouts: Sequence[Rollout], tokenizer, max_solution_tokens: int,
                     max_feedback_tokens: int) -> None:
    """The teacher's prompt for every rollout that has a solution or feedback; others get none."""
    for r in rollouts:
        if r.solution is None and r.feedback is None:
            r.teacher_prompt_ids = None
            continue
        r.teacher_prompt_ids = reprompt_ids(r, r.solution, r.feedback, tokenizer, max_solution_tokens,
                                            max_feedback_tokens)


def reanswer(rollouts: Sequence[Rollout], generate, tokenizer, max_solution_tokens: int,
             max_feedback_tokens: int, *, strict: bool = False) -> dict[str, dict[int, float]]:
    """{arm: {rollout index: reward}}: the tutee answering again every rollout whose feedback was
    kept, in each arm of effects.ARMS (the training teacher's context, the solution only, nothing).
    `generate(prompts)` must sample every arm with one seed: each rollout's re-answers then share
    their random stream, so the arms differ by their context rather than by luck."""
    kept = [i for i, r in enumerate(rollouts) if r.outcome == "kept"]
    post = {}
    for arm in ARMS:
        again = [reprompt_ids(rollouts[i], *context(rollouts[i], arm), tokenizer, max_solution_tokens,
                              max_feedback_tokens) for i in kept]
        outs = generate(again) if kept else []
        post[arm] = {i: reward(tokenizer.decode(o, skip_special_tokens=True), rollouts[i].problem.answer,
                               strict=strict) for i, o in zip(kept, outs)}
    return post


def make_rollouts(problems: Sequence[Problem], ids: Sequence[list[int]], responses: Sequence[list[int]],
                  n: int, tokenizer, *, strict: bool = False) -> list[Rollout]:
    out = []
    for i, resp in enumerate(responses):
        problem = problems[i // n]
        text = tokenizer.decode(resp, skip_special_tokens=True)
        out.append(Rollout(problem, ids[i // n], list(resp), text, reward(text, problem.answer, strict=strict)))
    return out


def sdpo_counts(rollouts: Sequence[Rollout], n: int) -> dict[str, int]:
    """This rank's counts behind SDPO's self_distillation/* fractions (sdpo_fractions), to be summed
    over ranks first: rollouts come n per prompt, in order, with their self-anchors set."""
    groups = [rollouts[g:g + n] for g in range(0, len(rollouts), n)]
    return {"samples": len(rollouts), "groups": len(groups),
            "success_groups": sum(any(r.reward > 0 for r in g) for g in groups),
            "with_solution": sum(r.solution is not None for r in rollouts),
            "with_feedback": sum(r.feedback is not None for r in rollouts),
            "with_teacher": sum(r.has_teacher for r in rollouts)}


def sdpo_fractions(counts: dict[str, int]) -> dict[str, float]:
    """SDPO's self_distillation/* step metrics, with the meanings of its trainer (lasgroup/SDPO,
    verl/trainer/ppo/ray_trainer.py, _maybe_build_self_distillation_batch), from counts summed over
    ranks: success_sample_fraction = samples that got a solution (another rollout's success) in the
    teacher's context, not the share of correct samples (that is critic/rewards/mean);
    success_group_fraction = prompts with at least one success; feedback_used_fraction = samples
    whose teacher context holds feedback (here kept tutor feedback, always used: SDPO's
    environment_feedback_only_without_solution has no counterpart); reprompt_sample_fraction =
    samples with any teacher context (solution or feedback)."""
    samples, groups = max(counts["samples"], 1), max(counts["groups"], 1)
    return {"self_distillation/success_sample_fraction": counts["with_solution"] / samples,
            "self_distillation/success_group_fraction": counts["success_groups"] / groups,
            "self_distillation/feedback_used_fraction": counts["with_feedback"] / samples,
            "self_distillation/reprompt_sample_fraction": counts["with_teacher"] / samples}


def pack(sequences: Sequence[tuple[list[int], list[int]]], pad_id: int, device):
    """Right-padded [B, T] ids and mask, and the flat index of the positions whose next-token
    distribution predicts each response token (position L - 1 + k for response token k)."""
    width = max(len(p) + len(r) for p, r in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    index = []
    for b, (p, r) in enumerate(sequences):
        seq = p + r
        ids[b, :len(seq)] = torch.tensor(seq)
        mask[b, :len(seq)] = 1
        index.extend(b * width + len(p) - 1 + k for k in range(len(r)))
    return ids.to(device), mask.to(device), torch.tensor(index, dtype=torch.long, device=device)


def token_weights(rollouts: Sequence[Rollout], normalize: str, teacher_only: bool) -> list[float]:
    """Each response token's weight in the step's loss before the global denominator: 1 per token
    ("token": divided by all response tokens), or 1/|y| ("sequence": each sequence's token mean,
    divided by all sequences, Eq. 1 and SDPO); 0 for a rollout without a teacher (it still counts
    in the denominator, as in SDPO)."""
    out = []
    for r in rollouts:
        w = 0.0 if teacher_only and not r.has_teacher else 1.0
        if normalize == "sequence" and r.response_ids:
            w /= len(r.response_ids)
        out.extend([w] * len(r.response_ids))
    return out


def loss_denominator(rollouts: Sequence[Rollout], normalize: str, device) -> torch.Tensor:
    """All ranks' response tokens ("token") or sequences ("sequence"), at least 1."""
    import torch.distributed as dist
    n = sum(len(r.response_ids) for r in rollouts) if normalize == "token" else len(rollouts)
    t = torch.tensor(float(n), device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.clamp_min(1)


def distill_backward(student, teacher, rollouts: Sequence[Rollout], micro_batch: int, pad_id: int,
                     device, beta: float, denominator: torch.Tensor, normalize: str = "sequence",
                     teacher_weight: torch.Tensor | None = None, topk: int | None = None,
                     tail: bool = True) -> torch.Tensor:
    """Accumulate d(loss)/d(theta) over micro-batches; loss = the weighted sum over teacher-backed
    response tokens of the divergence (token_weights), divided by `denominator` (loss_denominator).
    teacher_weight: the teacher's own lm_head (EMA or initial teacher); None: the student's.
    Every rank runs the same number of micro-batches (FSDP collectives)."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    for start in range(0, len(rollouts), micro_batch):
        chunk = rollouts[start:start + micro_batch]
        s_ids, s_mask, s_index = pack([(r.prompt_ids, r.response_ids) for r in chunk], pad_id, device)
        # Rollouts without a teacher reuse their own prompt; their tokens carry weight 0.
        t_ids, t_mask, t_index = pack([(r.teacher_prompt_ids or r.prompt_ids, r.response_ids) for r in chunk],
                                      pad_id, device)
        weights = torch.tensor(token_weights(chunk, normalize, teacher_only=True), device=device)
        with torch.no_grad():
            h_t = teacher(t_ids, t_mask, t_index)
        if teacher is not student and hasattr(teacher, "reshard"):
            teacher.reshard()  # FSDP2 keeps a root's weights gathered after a forward with no backward
        loss = student(s_ids, s_mask, s_index, teacher_hidden=h_t, token_weights=weights, beta=beta,
                       teacher_weight=teacher_weight, topk=topk, tail=tail)
        loss = loss / denominator
        # FSDP2 averages gradients over ranks; the loss is already normalised globally, so the
        # backward pass scales by the world size to make the reduction a sum.
        (loss * world_size()).backward()
        total += loss.detach()
    return total


def world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_initialized() else 1


def group_advantages(rewards: Sequence[float], n: int, std_normalize: bool = False,
                     eps: float = 1e-6) -> list[float]:
    """GRPO: reward - group mean over each prompt's n rollouts, divided by the group std + eps when
    std_normalize (unbiased std, as TRL computes it; SDPO's GRPO baseline does not divide)."""
    out = []
    for g in range(0, len(rewards), n):
        r = torch.tensor(rewards[g:g + n], dtype=torch.float64)
        centred = r - r.mean()
        if std_normalize:
            std = r.std() if len(r) > 1 else torch.zeros((), dtype=torch.float64)
            centred = centred / (std + eps)
        out.extend(centred.tolist())
    return out


def old_logprobs(student, rollouts: Sequence[Rollout], micro_batch: int, pad_id: int, device) -> list[torch.Tensor]:
    """Each rollout's token log-probs under the current policy (no gradient): the PPO ratio's
    denominator when one batch makes several updates."""
    out = []
    with torch.no_grad():
        for start in range(0, len(rollouts), micro_batch):
            chunk = rollouts[start:start + micro_batch]
            ids, mask, index = pack([(r.prompt_ids, r.response_ids) for r in chunk], pad_id, device)
            targets = torch.tensor([t for r in chunk for t in r.response_ids], dtype=torch.long, device=device)
            logp = student(ids, mask, index, targets=targets, policy="logprobs")
            out.extend(logp.split([len(r.response_ids) for r in chunk]))
    return out


def grpo_backward(student, reference, rollouts: Sequence[Rollout], advantages: Sequence[float],
                  micro_batch: int, pad_id: int, device, kl: float, denominator: torch.Tensor,
                  normalize: str = "sequence", clip_low: float = 0.2, clip_high: float = 0.28,
                  clip_dual: float = 3.0, old: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Accumulate the GRPO gradient: verl's token-level clipped policy-gradient loss, weighted as
    token_weights, divided by `denominator`; log-probs come from the chunked kernel, never from
    [tokens x vocab] logits. old: the log-probs the batch was sampled with (None: this is the
    batch's only update, so they equal the current ones)."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    for start in range(0, len(rollouts), micro_batch):
        chunk = rollouts[start:start + micro_batch]
        ids, mask, index = pack([(r.prompt_ids, r.response_ids) for r in chunk], pad_id, device)
        targets = torch.tensor([t for r in chunk for t in r.response_ids], dtype=torch.long, device=device)
        adv = torch.tensor([a for r, a in zip(chunk, advantages[start:start + micro_batch])
                            for _ in r.response_ids], dtype=torch.float32, device=device)
        weights = torch.tensor(token_weights(chunk, normalize, teacher_only=False), device=device)
        old_logp = None if old is None else torch.cat(list(old[start:start + micro_batch]))
        ref_logp = None
        if kl > 0:
            with torch.no_grad():
                ref_logp = reference(ids, mask, index, targets=targets, policy="logprobs")
        loss = student(ids, mask, index, targets=targets,
                       policy={"advantages": adv, "old_logp": old_logp, "clip_low": clip_low,
                               "clip_high": clip_high, "clip_dual": clip_dual, "ref_logp": ref_logp, "kl": kl,
                               "weights": weights})
        loss = loss / denominator
        (loss * world_size()).backward()
        total += loss.detach()
    return total
