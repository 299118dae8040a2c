"""Pareto verdicts between students' per-domain scores, and the initial-vs-final table."""
from __future__ import annotations

from collections.abc import Mapping


def _shared_domains(a: Mapping[str, float], b: Mapping[str, float]) -> list[str]:
    if set(a) != set(b):
        raise ValueError(f"score dicts cover different domains: {sorted(a)} vs {sorted(b)}")
    return sorted(a)


def dominates(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """a Pareto-dominates b: at least as good on every domain and better on one."""
    domains = _shared_domains(a, b)
    return all(a[d] >= b[d] for d in domains) and any(a[d] > b[d] for d in domains)


def improvements(initial: Mapping[str, Mapping[str, float]],
                 final: Mapping[str, Mapping[str, float]]) -> dict[str, bool]:
    """Per student: does the final model dominate its initial self?"""
    if set(initial) != set(final):
        raise ValueError(f"initial and final name different students: {sorted(initial)} vs {sorted(final)}")
    return {name: dominates(final[name], initial[name]) for name in initial}


def mutual_improvement(initial: Mapping[str, Mapping[str, float]],
                       final: Mapping[str, Mapping[str, float]]) -> bool:
    """Every student dominates its initial self."""
    return all(improvements(initial, final).values())


def format_cell(initial: float, final: float, interval: Mapping | None = None) -> str:
    """`initial -> final (change)` in percent, with the final score's and the change's intervals."""
    a, b = 100 * initial, 100 * final
    if not interval:
        return f"{a:6.1f} -> {b:5.1f} ({b - a:+5.1f})"
    (f0, f1), (c0, c1) = ((100 * x for x in interval[key]) for key in ("final", "change"))
    return f"{a:5.1f} -> {b:5.1f} [{f0:4.1f},{f1:5.1f}] ({b - a:+5.1f} [{c0:+5.1f},{c1:+5.1f}])"


def format_table(initial: Mapping[str, Mapping[str, float]],
                 final: Mapping[str, Mapping[str, float]], intervals: Mapping | None = None) -> str:
    """A printable table: per student and domain, initial -> final (change), and the verdicts;
    with `intervals` ({student: {domain: {"final": [lo, hi], "change": [lo, hi]}}}) beside them."""
    verdicts = improvements(initial, final)
    domains = sorted({d for per in initial.values() for d in per})
    name_w = max(7, *(len(n) for n in initial))

    def cell(name, d):
        return format_cell(initial[name][d], final[name][d], intervals[name][d] if intervals else None)

    width = 46 if intervals else 22
    head = f"{'student':<{name_w}}  " + "  ".join(f"{d:>{width}}" for d in domains) + "  pareto-improved"
    lines = [head, "-" * len(head)]
    for name in initial:
        lines.append(f"{name:<{name_w}}  " + "  ".join(f"{cell(name, d):>{width}}" for d in domains)
                     + f"  {'yes' if verdicts[name] else 'no'}")
    lines.append(f"mutual Pareto improvement: {'yes' if all(verdicts.values()) else 'no'}")
    return "\n".join(lines)
