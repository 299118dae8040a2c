"""Cognizance gaps, the cognizance gate and its ablation modes, and tutor rotation."""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

GATE_MODES = ("cognizance", "always", "never", "domain_selective")


def _domains(scores: Mapping[str, Mapping[str, float]]) -> list[str]:
    if not scores:
        raise ValueError("scores must hold at least one student")
    domains = sorted({d for per in scores.values() for d in per})
    for student, per in scores.items():
        missing = [d for d in domains if d not in per]
        if missing:
            raise ValueError(f"scores[{student!r}] has no score for domain(s) {missing}")
    return domains


def best_scores(scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """s*_d = max over students of s^i_d."""
    return {d: max(per[d] for per in scores.values()) for d in _domains(scores)}


def cognizance_gaps(scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Delta^i = sum_d (s*_d - s^i_d) / s*_d; a domain with s*_d = 0 counts 0."""
    best = best_scores(scores)
    return {student: sum((best[d] - per[d]) / best[d] for d in best if best[d] > 0)
            for student, per in scores.items()}


def within_tau(gap: float, tau: float) -> bool:
    """The cognizance threshold, the one place it is decided (the gate and analyze's break-rate
    pooling both call it): gap <= tau, a gap that equals tau on paper included."""
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    # The tolerance keeps a gap that equals tau on paper (0.3 vs (1.0 - 0.7) / 1.0 =
    # 0.30000000000000004) on the cognizant side.
    return gap <= tau + 1e-12


def cognizant(scores: Mapping[str, Mapping[str, float]], tau: float) -> dict[str, bool]:
    """Student i is cognizant iff its gap is at most tau."""
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    return {student: within_tau(gap, tau) for student, gap in cognizance_gaps(scores).items()}


def best_domains(scores: Mapping[str, Mapping[str, float]], student: str) -> set[str]:
    """The domains on which `student` scores highest of all students (ties included)."""
    best = best_scores(scores)
    return {d for d in best if scores[student][d] >= best[d]}


def stronger_domains(scores: Mapping[str, Mapping[str, float]],
                     declared: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Per student, its stronger domain(s), where an incognizant tutor still writes feedback under
    `domain_selective` (paper Sec. 4.3, 5: the domain the student was trained for): the domain its
    config declares (StudentConfig.domain), else the domains where it scores best on validation.
    {student: {"domains": [...], "from": "config" | "validation"}}."""
    out = {}
    for student in scores:
        own = (declared or {}).get(student)
        if own:
            out[student] = {"domains": [own], "from": "config"}
        else:
            out[student] = {"domains": sorted(best_domains(scores, student)), "from": "validation"}
    return out


def feedback_allowed(mode: str, tutor: str, domain: str, scores: Mapping[str, Mapping[str, float]],
                     tau: float, stronger: Collection[str] | None = None) -> bool:
    """Whether `tutor` writes feedback on a problem of `domain` under the gate `mode`; `stronger`:
    the tutor's stronger domains for `domain_selective` (stronger_domains; default: its best
    domains on `scores`)."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    if mode == "cognizance":
        return cognizant(scores, tau)[tutor]
    if mode == "domain_selective":
        own = best_domains(scores, tutor) if stronger is None else stronger
        return cognizant(scores, tau)[tutor] or domain in own
    raise ValueError(f"gate must be one of {GATE_MODES}, got {mode!r}")


def tutor_for(students: Sequence[str], tutee: str, round_index: int) -> str:
    """The tutor of `tutee` in round `round_index` (1-based): the next student, rotating over
    the others from round to round when there are more than two."""
    if len(students) < 2:
        raise ValueError("co-distillation needs at least two students")
    i = list(students).index(tutee)
    offset = 1 + (round_index - 1) % (len(students) - 1)
    return students[(i + offset) % len(students)]
