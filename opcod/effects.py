"""What tutor feedback does to the tutee's re-answers (paper App. E): break-rate and fix-rate against control arms."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# What the self-teacher has in context when it re-answers: the tutor's kept feedback (with the
# self-anchor when one exists, as in training), the self-anchor alone, or neither (the reprompt
# template only). The two controls separate sampling noise and the template from the feedback.
ARMS = ("feedback", "solution", "nothing")


def context(rollout, arm: str) -> tuple[str | None, str | None]:
    """(solution, feedback) in the self-teacher's context when `rollout` is re-answered in `arm`."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; expected one of {ARMS}")
    return {"feedback": (rollout.solution, rollout.feedback), "solution": (rollout.solution, None),
            "nothing": (None, None)}[arm]


@dataclass
class Record:
    """One rollout whose feedback was kept."""
    domain: str
    wrong: int                      # wrong pre-feedback rollouts of its problem, out of n
    pre: float                      # its reward
    post: dict[str, float] = field(default_factory=dict)   # arm -> reward of the re-answer


def buckets(n: int) -> dict[str, tuple[int, int]]:
    """Difficulty by wrong pre-feedback rollouts out of n; for n = 8 the paper's very easy (0-1),
    easy (0-4), hard (5-7) and hardest (7). The hard buckets reach n so that the fix-rate counts
    problems no rollout solved (they hold no correct rollout, so the break-rate is unchanged)."""
    a, h = max(1, n // 8), n // 2
    return {f"very easy (0-{a})": (0, a), f"easy (0-{h})": (0, h),
            f"hard ({h + 1}-{n - 1})": (h + 1, n), f"hardest ({n - 1})": (n - 1, n)}


def rates(records: Iterable[Record], arm: str) -> dict:
    """break-rate = #(C -> W) / #C and fix-rate = #(W -> C) / #W of the re-answers in `arm`."""
    return rates_of_counts(step_counts(list(records), (arm,)), arm)


def effects(records: Sequence[Record], n: int, arms: Sequence[str] = ARMS) -> dict[str, dict[str, dict]]:
    """{"overall" | bucket: {arm: rates}} over the kept-feedback rollouts."""
    groups = {"overall": list(records)}
    for name, (lo, hi) in buckets(n).items():
        groups[name] = [r for r in records if lo <= r.wrong <= hi]
    return {name: {arm: rates(rs, arm) for arm in arms} for name, rs in groups.items()}


def records_of(rollouts, post: dict[str, dict[int, float]], n: int) -> list[Record]:
    """Records of the rollouts (n per problem, in order) whose feedback was kept; post[arm][i] is
    rollout i's re-answer reward in that arm (kept rollouts only)."""
    out = []
    for g in range(0, len(rollouts), n):
        group = rollouts[g:g + n]
        wrong = sum(1 for r in group if r.reward <= 0)
        for i, r in enumerate(group, start=g):
            if r.outcome == "kept":
                out.append(Record(r.problem.domain, wrong, r.reward, {a: post[a][i] for a in post}))
    return out


def aggregate(pairs: Sequence[dict], n: int) -> dict:
    """Pool the pairs' records by the tutor's cognizance (the paper's aggregate over domain pairs),
    overall, per difficulty bucket and on problems of the tutor's stronger and weaker domains."""
    out = {}
    for cls in ("cognizant", "incognizant"):
        chosen = [p for p in pairs if p["tutor"]["cognizant"] == (cls == "cognizant")]
        recs = [r for p in chosen for r in p["records"]]
        out[cls] = {"pairs": len(chosen), **effects(recs, n)}
        for side in ("stronger", "weaker"):
            part = [r for p in chosen for r in p["records"]
                    if (r.domain in p["tutor"]["stronger_domains"]) == (side == "stronger")]
            out[cls][f"tutor's {side} domain"] = {a: rates(part, a) for a in ARMS}
    return out


def step_counts(records: Sequence[Record], arms: Sequence[str] = ARMS) -> dict[str, int]:
    """Counts that add over ranks and steps: correct and wrong kept-feedback rollouts, and per arm
    how many of them broke or were fixed."""
    out = {"correct": sum(1 for r in records if r.pre > 0), "wrong": sum(1 for r in records if r.pre <= 0)}
    for arm in arms:
        out[f"{arm}/broken"] = sum(1 for r in records if r.pre > 0 and r.post[arm] <= 0)
        out[f"{arm}/fixed"] = sum(1 for r in records if r.pre <= 0 and r.post[arm] > 0)
    return out


def rates_of_counts(counts: dict[str, int], arm: str) -> dict:
    """`rates` from summed step_counts."""
    c, w = counts["correct"], counts["wrong"]
    broken, fixed = counts[f"{arm}/broken"], counts[f"{arm}/fixed"]
    return {"correct": c, "broken": broken, "break_rate": broken / c if c else None,
            "wrong": w, "fixed": fixed, "fix_rate": fixed / w if w else None}


def percent(r: dict, key: str, num: str, den: str) -> str:
    return "-" if r[key] is None else f"{100 * r[key]:5.1f}% ({r[num]}/{r[den]})"


def format_table2(agg: dict, n: int) -> str:
    """The paper's Table 2 layout: break-rate by difficulty, cognizant vs incognizant tutors, then the
    aggregate and the tutor's-stronger-domain split (feedback arm)."""
    rows = [*buckets(n), "overall", "tutor's stronger domain"]
    lines = [f"{'break-rate (feedback kept)':<28} {'cognizant':>22} {'incognizant':>22}"]
    for row in rows:
        cells = [percent(agg[c][row]["feedback"], "break_rate", "broken", "correct")
                 for c in ("cognizant", "incognizant")]
        lines.append(f"{row:<28} {cells[0]:>22} {cells[1]:>22}")
    return "\n".join(lines)


def format_arms(agg: dict) -> str:
    """Break- and fix-rate per arm: the feedback's effect beside re-answering with the solution only
    and with nothing, on all problems and on those of the tutor's stronger and weaker domains (a
    tutor that knows less of a domain can only mislead there)."""
    lines = [f"{'tutor':<12} {'problems':<24} {'re-answer with':<16} {'break-rate':>20} {'fix-rate':>20}"]
    for cls in ("cognizant", "incognizant"):
        for part in ("overall", "tutor's stronger domain", "tutor's weaker domain"):
            for arm in ARMS:
                r = agg[cls][part][arm]
                lines.append(f"{cls:<12} {part:<24} {arm:<16} {percent(r, 'break_rate', 'broken', 'correct'):>20} "
                             f"{percent(r, 'fix_rate', 'fixed', 'wrong'):>20}")
    return "\n".join(lines)
