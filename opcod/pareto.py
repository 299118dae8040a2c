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


def format_table(initial: Mapping[str, Mapping[str, float]],
                 final: Mapping[str, Mapping[str, float]]) -> str:
    """A printable table: per student and domain, initial -> final (change), and the verdicts."""
    verdicts = improvements(initial, final)
    domains = sorted({d for per in initial.values() for d in per})
    name_w = max(7, *(len(n) for n in initial))
    head = f"{'student':<{name_w}}  " + "  ".join(f"{d:>22}" for d in domains) + "  pareto-improved"
    lines = [head, "-" * len(head)]
    for name in initial:
        cells = [f"{100 * initial[name][d]:6.1f} -> {100 * final[name][d]:5.1f} ({100 * (final[name][d] - initial[name][d]):+5.1f})"
                 for d in domains]
        lines.append(f"{name:<{name_w}}  " + "  ".join(f"{c:>22}" for c in cells)
                     + f"  {'yes' if verdicts[name] else 'no'}")
    lines.append(f"mutual Pareto improvement: {'yes' if all(verdicts.values()) else 'no'}")
    return "\n".join(lines)
