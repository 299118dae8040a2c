"""The end of a run: summary.json, the validation plot and the printed initial-vs-final table."""
from __future__ import annotations

import json
from pathlib import Path

from .pareto import format_table, improvements, mutual_improvement


def summary(initial: dict, final: dict, rounds: list[dict], outcomes: dict, config_name: str = "config.yaml") -> dict:
    verdicts = improvements(initial, final)
    return {
        "students": {name: {"initial": initial[name], "final": final[name], "pareto_improved": verdicts[name]}
                     for name in initial},
        "mutual_pareto_improvement": mutual_improvement(initial, final),
        "rounds": rounds,
        "feedback_outcomes": outcomes,
        "config": config_name,
    }


def write_summary(run_dir: Path, data: dict) -> None:
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(run_dir / "summary.json")


def plot_validation(run_dir: Path, rounds: list[dict], final_validation: dict | None = None) -> Path | None:
    """validation.png: score per student per domain at the start of each round (and at the end)."""
    if not rounds:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points = [(r["round"], r["validation"]) for r in rounds]
    if final_validation:
        points.append((rounds[-1]["round"] + 1, final_validation))
    students = sorted(points[0][1])
    domains = sorted({d for _, v in points for s in v.values() for d in s})
    fig, axes = plt.subplots(1, len(domains), figsize=(4.5 * len(domains), 3.5), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        for student in students:
            ax.plot([x for x, _ in points], [100 * v[student][domain] for _, v in points], marker="o",
                    label=student)
        ax.set_title(f"validation: {domain}")
        ax.set_xlabel("round (last point: end of run)" if final_validation else "round")
        ax.set_ylabel("avg@k (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    out = run_dir / "validation.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def table(data: dict) -> str:
    initial = {n: s["initial"] for n, s in data["students"].items()}
    final = {n: s["final"] for n, s in data["students"].items()}
    lines = ["test avg@k, initial -> final (change), per student and domain:", format_table(initial, final)]
    for r in data["rounds"]:
        gate = ", ".join(f"{n}: gap {r['gaps'][n]:.3f} {'cognizant' if r['cognizant'][n] else 'incognizant'}"
                         for n in r["gaps"])
        lines.append(f"round {r['round']}: {gate}")
    o = data["feedback_outcomes"]
    total = sum(o.values())
    if total:
        lines.append("feedback outcomes: " + ", ".join(f"{k} {v} ({100 * v / total:.0f}%)" for k, v in o.items()))
    else:
        lines.append("feedback outcomes: no feedback was requested")
    return "\n".join(lines)
