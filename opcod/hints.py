"""What a demo student holds of each synthetic item: its probability for each of a question's four
hints (the reasoning lines that lead to options A-D), alone or as its self-teacher given the
question's synthetic critique, and how much that changes from one item to another."""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch

from .data import Problem
from .step import Rollout, prompt_ids, reprompt_ids
from .synthetic import LETTERS, reasoning_lines
from .token_signal import rollout_logits


def hint_distribution(model, tokenizer, problem: Problem, teacher: bool = False,
                      max_feedback_tokens: int = 512) -> dict[str, float]:
    """{letter: probability} of the response opening `<reasoning>\\n` + the hint that leads to that
    letter, renormalized over the family's four hints; with `teacher`, after the self-teacher's
    prompt holding the question's synthetic critique (feedback only, no solution; it opens with
    the hint itself, so this measures whether the teacher reads its context) instead."""
    if teacher:
        critique = problem.meta["feedback"].split("</concept>", 1)[1].strip()
        context = reprompt_ids(Rollout(problem, [], [], "", 0.0), None, critique, tokenizer, 0, max_feedback_tokens)
    else:
        context = prompt_ids(tokenizer, problem)
    logp = {}
    for letter, line in reasoning_lines(problem.meta["family"]).items():
        response = tokenizer.encode(f"<reasoning>\n{line}\n", add_special_tokens=False)
        rows = torch.log_softmax(rollout_logits(model, context, response), dim=-1)
        logp[letter] = rows[torch.arange(len(response)), torch.tensor(response)].sum().item()
    top = max(logp.values())
    z = top + math.log(sum(math.exp(v - top) for v in logp.values()))
    return {k: math.exp(v - z) for k, v in sorted(logp.items())}


def entropy(dist: dict[str, float]) -> float:
    return -sum(p * math.log(p) for p in dist.values() if p > 0)


def summarize(problems: Sequence[Problem], dists: Sequence[dict[str, float]]) -> dict:
    """Over the questions: mean probability of the right hint and of the likeliest one, mean entropy,
    how often the likeliest is right; per (family, item): the mean distribution; per family, how
    far apart its items' distributions lie (the largest difference in one letter's probability
    between two items: near 0 where the student answers every item alike)."""
    items: dict[tuple[str, str], list] = {}
    for p, d in zip(problems, dists):
        items.setdefault((p.meta["family"], p.meta["item"]), []).append((p.answer, d))
    per_item = []
    for (family, item), rows in sorted(items.items()):
        mean = {k: statistics.fmean(d[k] for _, d in rows) for k in LETTERS}
        per_item.append({"family": family, "item": item, "answer": rows[0][0], "questions": len(rows),
                         "distribution": mean})
    spread = {}
    for family in sorted({r["family"] for r in per_item}):
        rows = [r["distribution"] for r in per_item if r["family"] == family]
        spread[family] = max(max(d[k] for d in rows) - min(d[k] for d in rows) for k in LETTERS)
    n = len(problems)
    return {"questions": n,
            "p_right": statistics.fmean(d[p.answer] for p, d in zip(problems, dists)),
            "p_top": statistics.fmean(max(d.values()) for d in dists),
            "entropy": statistics.fmean(entropy(d) for d in dists),
            "top_right": sum(max(d, key=d.get) == p.answer for p, d in zip(problems, dists)),
            "items": per_item, "spread": spread}


def format_summary(s: dict, who: str) -> str:
    lines = [f"{who}, {s['questions']} questions: p(right hint) {s['p_right']:.3f}, p(likeliest hint) "
             f"{s['p_top']:.3f}, entropy {s['entropy']:.3f} (four equal: {math.log(4):.3f}), likeliest "
             f"right on {s['top_right']} of {s['questions']}",
             f"{'family':<16} {'item':<36} right  " + "  ".join(f"{k:>5}" for k in LETTERS) + "  questions"]
    for r in s["items"]:
        lines.append(f"{r['family']:<16} {r['item']:<36} {r['answer']:>5}  "
                     + "  ".join(f"{r['distribution'][k]:5.2f}" for k in LETTERS) + f"  {r['questions']:>9}")
    lines.append("spread between items (largest difference in one letter's probability): "
                 + ", ".join(f"{f} {v:.2f}" for f, v in s["spread"].items()))
    return "\n".join(lines)
