"""Grading of MCQ responses (the last <answer> tag vs the gold letter, as SDPO reads it), the avg@k score and its
bootstrap interval."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

_OPEN, _CLOSE = "<answer>", "</answer>"


def extract_answer(text: str, *, strict: bool = False) -> str | None:
    """The prediction: the stripped text after the last <answer>, up to the next </answer> if there is
    one, as SDPO reads it (verl/utils/reward_score/feedback/mcq.py, extract_xml_answer: an unclosed or
    truncated answer is still read). None without any <answer> (SDPO would read the whole text
    there; SPEC section 3 scores it 0). `strict`: None unless a </answer> closes the last <answer>."""
    start = text.rfind(_OPEN)
    if start < 0:
        return None
    tail = text[start + len(_OPEN):]
    end = tail.find(_CLOSE)
    if end < 0:
        return None if strict else tail.strip()
    return tail[:end].strip()


def reward(text: str, gold: str, *, strict: bool = False) -> float:
    """1.0 iff the extracted answer equals the gold letter exactly, else 0.0 (`strict`: see extract_answer)."""
    return 1.0 if extract_answer(text, strict=strict) == gold else 0.0


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


def bootstrap_interval(rewards: Mapping[str, Sequence[float]], baseline: Mapping[str, Sequence[float]] | None = None,
                       level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of avg@k over `rewards` ({problem id: its k 0/1 rewards}), resampling the
    problems and, within each, its samples, both with replacement; with `baseline` (the same
    problems), of the change avg@k(rewards) - avg@k(baseline), the problems drawn once for both."""
    ids = sorted(rewards)
    if not ids:
        raise ValueError("bootstrap_interval needs at least one problem")
    if baseline is not None and sorted(baseline) != ids:
        raise ValueError("bootstrap_interval: rewards and baseline cover different problems")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(ids), size=(resamples, len(ids)))

    def resampled(table: Mapping[str, Sequence[float]]) -> np.ndarray:
        rows = [np.asarray(table[i], dtype=np.float64) for i in ids]
        k = max(len(r) for r in rows)
        if min(len(r) for r in rows) != k:  # unequal k: resample each problem's own samples
            return np.array([[rows[j][rng.integers(0, len(rows[j]), len(rows[j]))].mean() for j in pick]
                             for pick in picks]).mean(axis=1)
        arr = np.stack(rows)
        samples = rng.integers(0, k, size=(resamples, len(ids), k))
        return arr[picks[..., None], samples].mean(axis=(1, 2))

    stat = resampled(rewards)
    if baseline is not None:
        stat = stat - resampled(baseline)
    lo, hi = np.quantile(stat, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
