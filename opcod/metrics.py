"""The names of every logged number: verl's and SDPO's where they have one, OPCoD's own under opcod/."""
from __future__ import annotations

import re

from .effects import ARMS, rates_of_counts
from .feedback import OUTCOMES

# Test-split scores take verl's validation name (verl's "val" is the held-out set SDPO reports); the
# validation split that gates feedback is OPCoD's own.
SPLIT_PREFIX = {"test": "val-core", "validation": "opcod/validation"}
_SCORE = re.compile(r"^(val-core|opcod/validation)/(.+)/([^/]+)/acc/mean@(\d+)$")

# A step record of the nested layout runs were written with before these names (opcod <= 0.1.0).
OLD_STEP = {"round": "opcod/round", "phase": "opcod/phase", "tutee": "opcod/tutee", "tutor": "opcod/tutor",
            "step_in_phase": "opcod/step_in_phase", "loss": "actor/pg_loss", "grad_norm": "actor/grad_norm",
            "lr": "actor/lr", "reward_mean": "critic/rewards/mean", "skipped": "opcod/skipped",
            "teacher_fraction": "self_distillation/reprompt_sample_fraction", "gate_open": "opcod/gate_open",
            "distinct_rollout_fraction": "opcod/distinct_rollout_fraction",
            "feedback_leak_rate": "opcod/feedback_leak_rate", "optimizer_updates": "opcod/optimizer_updates",
            "sync_gb_s": "opcod/sync_gb_s", "sync_bytes": "opcod/sync_bytes",
            "max_memory_allocated_gib": "perf/max_memory_allocated_gb",
            "max_memory_reserved_gib": "perf/max_memory_reserved_gb"}
OLD_TIMES = {"generate": "timing_s/gen", "feedback": "timing_s/feedback", "fwd_bwd": "timing_s/update_actor",
             "sync": "timing_s/update_weights", "step": "timing_s/step"}


def score_record(split: str, step: int, round_index: int, scores: dict, k: int) -> dict:
    """One evaluation: `val-core/<student>/<domain>/acc/mean@k` (test) or `opcod/validation/...`."""
    out = {"kind": split, "step": step, "opcod/round": round_index}
    for student, per in scores.items():
        for domain, acc in per.items():
            out[f"{SPLIT_PREFIX[split]}/{student}/{domain}/acc/mean@{k}"] = acc
    return out


def scores_of(record: dict) -> dict[str, dict[str, float]]:
    """{student: {domain: accuracy}} back from an evaluation record."""
    out: dict[str, dict[str, float]] = {}
    for key, value in record.items():
        m = _SCORE.match(key)
        if m:
            out.setdefault(m.group(2), {})[m.group(3)] = value
    return out


def feedback_counts(record: dict) -> dict[str, int]:
    return {o: record.get(f"opcod/feedback/{o}", 0) for o in OUTCOMES}


def effect_metrics(counts: dict[str, int] | None) -> dict:
    """A step's feedback effects (effects.step_counts summed over ranks) under opcod/effects/:
    the counts, and per arm the break-rate and fix-rate (None where nothing was counted)."""
    if counts is None:
        return {}
    out = {f"opcod/effects/{k}": v for k, v in counts.items()}
    for arm in ARMS:
        r = rates_of_counts(counts, arm)
        out[f"opcod/effects/{arm}/break_rate"] = r["break_rate"]
        out[f"opcod/effects/{arm}/fix_rate"] = r["fix_rate"]
    return out


def effect_counts(record: dict) -> dict[str, int] | None:
    """effects.step_counts back from a step record; None if the step did not measure them."""
    if "opcod/effects/correct" not in record:
        return None
    return {k.removeprefix("opcod/effects/"): v for k, v in record.items()
            if k.startswith("opcod/effects/") and not k.endswith("_rate")}


def upgrade(record: dict, k: int = 0) -> dict:
    """A record in these names, whichever layout it was written in (old runs stay readable)."""
    kind = record.get("kind")
    if kind == "step" and "loss" in record:
        out = {"kind": kind, "step": record["step"]}
        out.update({new: record[old] for old, new in OLD_STEP.items() if old in record})
        out.update({new: record["times"][old] for old, new in OLD_TIMES.items() if old in record.get("times", {})})
        counts = record.get("feedback", {})
        out.update({f"opcod/feedback/{o}": counts.get(o, 0) for o in OUTCOMES})
        return out
    if kind in SPLIT_PREFIX and "scores" in record:
        return score_record(kind, record.get("step", 0), record["round"], record["scores"], k)
    return record
