"""One OPCoD step's data and loss: rollouts, self-anchors, gated tutor feedback, teacher contexts,
and the token-level self-distillation loss through fused_linear_jsd."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import prompts
from .data import Problem
from .feedback import OutcomeCounts, anchor
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
        result = anchor(tokenizer.decode(ids, skip_special_tokens=True), r.problem.text)
        r.outcome = result.outcome
        r.feedback = result.text
        counts.add(result.outcome)
    return counts


def teacher_contexts(rollouts: Sequence[Rollout], tokenizer, max_solution_tokens: int,
                     max_feedback_tokens: int) -> None:
    """The teacher's prompt for every rollout that has a solution or feedback; others get none."""
    for r in rollouts:
        if r.solution is None and r.feedback is None:
            r.teacher_prompt_ids = None
            continue
        user = prompts.reprompt_message(r.problem.prompt, r.solution, r.feedback, tokenizer,
                                        max_solution_tokens, max_feedback_tokens)
        r.teacher_prompt_ids = tokenizer.encode(prompts.render(tokenizer, prompts.messages(user)),
                                                add_special_tokens=False)


def make_rollouts(problems: Sequence[Problem], ids: Sequence[list[int]], responses: Sequence[list[int]],
                  n: int, tokenizer) -> list[Rollout]:
    out = []
    for i, resp in enumerate(responses):
        problem = problems[i // n]
        text = tokenizer.decode(resp, skip_special_tokens=True)
        out.append(Rollout(problem, ids[i // n], list(resp), text, reward(text, problem.answer)))
    return out


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


def distill_backward(student, teacher, rollouts: Sequence[Rollout], micro_batch: int, pad_id: int,
                     device, beta: float, total_tokens: torch.Tensor) -> torch.Tensor:
    """Accumulate d(loss)/d(theta) over micro-batches; loss = sum over teacher-backed response tokens
    of the divergence, divided by all response tokens of the step (all ranks), as in SDPO.
    Every rank runs the same number of micro-batches (FSDP collectives)."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    for start in range(0, len(rollouts), micro_batch):
        chunk = rollouts[start:start + micro_batch]
        s_ids, s_mask, s_index = pack([(r.prompt_ids, r.response_ids) for r in chunk], pad_id, device)
        # Rollouts without a teacher reuse their own prompt; their tokens carry weight 0.
        t_ids, t_mask, t_index = pack([(r.teacher_prompt_ids or r.prompt_ids, r.response_ids) for r in chunk],
                                      pad_id, device)
        weights = torch.tensor([1.0 if r.has_teacher else 0.0 for r in chunk for _ in r.response_ids],
                               device=device)
        with torch.no_grad():
            h_t = teacher(t_ids, t_mask, t_index)
        loss = student(s_ids, s_mask, s_index, teacher_hidden=h_t, token_weights=weights, beta=beta)
        loss = loss / total_tokens
        # FSDP2 averages gradients over ranks; the loss is already normalised globally, so the
        # backward pass scales by the world size to make the reduction a sum.
        (loss * world_size()).backward()
        total += loss.detach()
    return total


def world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_initialized() else 1


def group_advantages(rewards: Sequence[float], n: int, eps: float = 1e-6) -> list[float]:
    """GRPO: (reward - group mean) / (group std + eps) over each prompt's n rollouts (unbiased std,
    as TRL computes it)."""
    out = []
    for g in range(0, len(rewards), n):
        r = torch.tensor(rewards[g:g + n], dtype=torch.float64)
        std = r.std() if len(r) > 1 else torch.zeros((), dtype=torch.float64)
        out.extend(((r - r.mean()) / (std + eps)).tolist())
    return out


def grpo_backward(student, reference, rollouts: Sequence[Rollout], advantages: Sequence[float],
                  micro_batch: int, pad_id: int, device, clip: float, kl: float,
                  total_tokens: torch.Tensor) -> torch.Tensor:
    """Accumulate the GRPO gradient: token-level clipped policy-gradient loss over all response
    tokens, divided by all response tokens of the step (all ranks); log-probs come from the chunked
    kernel, never from [tokens x vocab] logits. One update per batch, so old log-probs = current."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    for start in range(0, len(rollouts), micro_batch):
        chunk = rollouts[start:start + micro_batch]
        ids, mask, index = pack([(r.prompt_ids, r.response_ids) for r in chunk], pad_id, device)
        targets = torch.tensor([t for r in chunk for t in r.response_ids], dtype=torch.long, device=device)
        adv = torch.tensor([a for r, a in zip(chunk, advantages[start:start + micro_batch])
                            for _ in r.response_ids], dtype=torch.float32, device=device)
        ref_logp = None
        if kl > 0:
            with torch.no_grad():
                ref_logp = reference(ids, mask, index, targets=targets, policy="logprobs")
        loss = student(ids, mask, index, targets=targets,
                       policy={"advantages": adv, "clip": clip, "ref_logp": ref_logp, "kl": kl})
        loss = loss / total_tokens
        (loss * world_size()).backward()
        total += loss.detach()
    return total
