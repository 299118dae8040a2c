"""The end of a run: summary.json, the validation plot and the printed initial-vs-final table."""
from __future__ import annotations

import json
from pathlib import Path

from .grading import bootstrap_interval
from .pareto import format_table, improvements, mutual_improvement

LEVEL = 0.95


def intervals(initial_rewards: dict | None, final_rewards: dict | None, seed: int = 0) -> dict | None:
    """Per student and domain, 95 % bootstrap intervals (problems and samples resampled) of the
    initial and final avg@k and of the change (paired: the same problems drawn for both); None
    for a run resumed from a checkpoint that predates per-problem rewards."""
    if not initial_rewards or not final_rewards:
        return None
    out = {}
    for name, per in final_rewards.items():
        out[name] = {}
        for domain, rewards in per.items():
            before = initial_rewards[name][domain]
            out[name][domain] = {"initial": list(bootstrap_interval(before, level=LEVEL, seed=seed)),
                                 "final": list(bootstrap_interval(rewards, level=LEVEL, seed=seed)),
                                 "change": list(bootstrap_interval(rewards, before, level=LEVEL, seed=seed))}
    return out


def summary(initial: dict, final: dict, rounds: list[dict], outcomes: dict, config_name: str = "config.yaml",
            intervals: dict | None = None) -> dict:
    verdicts = improvements(initial, final)
    return {
        "students": {name: {"initial": initial[name], "final": final[name], "pareto_improved": verdicts[name],
                            **({"intervals_95": intervals[name]} if intervals else {})}
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
        ax.set_xticks([x for x, _ in points])   # rounds are whole numbers: no 1.5 on the axis
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
    ci = {n: s["intervals_95"] for n, s in data["students"].items() if "intervals_95" in s} or None
    head = ("test avg@k, initial -> final [95 % interval] (change [95 % interval]), per student and domain:"
            if ci else "test avg@k, initial -> final (change), per student and domain:")
    lines = [head, format_table(initial, final, ci)]
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
