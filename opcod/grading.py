"""Grading of MCQ responses (last <answer> tag vs the gold letter) and the avg@k score."""
from __future__ import annotations

from collections.abc import Sequence

_OPEN, _CLOSE = "<answer>", "</answer>"


def extract_answer(text: str) -> str | None:
    """The stripped text between the last <answer> and the </answer> after it; None if missing."""
    start = text.rfind(_OPEN)
    if start < 0:
        return None
    end = text.find(_CLOSE, start + len(_OPEN))
    if end < 0:
        return None
    return text[start + len(_OPEN):end].strip()


def reward(text: str, gold: str) -> float:
    """1.0 iff the extracted answer equals the gold letter exactly, else 0.0."""
    return 1.0 if extract_answer(text) == gold else 0.0


def avg_at_k(rewards: Sequence[Sequence[float]]) -> float:
    """Mean over problems of the mean 0/1 reward over that problem's k samples."""
    if len(rewards) == 0:
        raise ValueError("avg_at_k needs at least one problem")
    total = 0.0
    for i, samples in enumerate(rewards):
        if len(samples) == 0:
            raise ValueError(f"avg_at_k: problem {i} has no samples")
        total += sum(samples) / len(samples)
    return total / len(rewards)
