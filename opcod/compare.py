"""python -m opcod.compare: OPCoD, SDPO and GRPO trained from the same initial students, per seed,
as one table (scores with 95 % intervals, gains, Pareto verdicts) and a plot in the layout of the
paper's Fig. 7 (one panel per student, one point per method)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from . import cli
from .pareto import format_cell

METHODS = ("opcod", "sdpo", "grpo")


def run_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def launch(method: str, seed: int, out_dir: Path, config: str | None, nproc: int, overrides: list[str]) -> int:
    """One training run under torchrun. A run that finished under the same config is reused by
    opcod.train itself (which refuses one whose config differs), so reruns cost seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "opcod.train"]
    if config:
        cmd += ["--config", config]
    cmd += [*overrides, f"method={method}", f"seed={seed}", f"output_dir={out_dir}",
            f"run_name={run_name(method, seed)}"]
    print(f"opcod.compare: {method} seed {seed} -> {out_dir / run_name(method, seed)}", flush=True)
    return subprocess.run(cmd).returncode


def collect(out_dir: Path, methods, seeds) -> dict:
    """{method: {seed: summary}} of the finished runs."""
    return {m: {s: json.loads((out_dir / run_name(m, s) / "summary.json").read_text()) for s in seeds}
            for m in methods}


def _first(results: dict) -> dict:
    """Any one summary: every run starts from the same students and scores."""
    return next(iter(next(iter(results.values())).values()))


def weaker_domain(initial: dict) -> str:
    return min(sorted(initial), key=lambda d: initial[d])


def comparison_table(results: dict) -> str:
    """Per student: each method and seed's final scores against the shared initial ones."""
    first = _first(results)
    lines = []
    for student in sorted(first["students"]):
        initial = first["students"][student]["initial"]
        domains = sorted(initial)
        weak = weaker_domain(initial)
        lines.append(f"{student} (weaker domain: {weak})")
        head = f"{'method':<7} {'seed':>4}  " + "  ".join(f"{d:>46}" for d in domains) + "  pareto-improved"
        lines += [head, "-" * len(head)]
        for method, per_seed in results.items():
            for seed, summary in per_seed.items():
                s = summary["students"][student]
                if s["initial"] != initial:
                    raise ValueError(f"{method} seed {seed} started from other scores for {student} "
                                     f"({s['initial']} vs {initial}): not the same initial students")
                ci = s.get("intervals_95")
                cells = [format_cell(initial[d], s["final"][d], ci[d] if ci else None) for d in domains]
                lines.append(f"{method:<7} {seed:>4}  " + "  ".join(f"{c:>46}" for c in cells)
                             + f"  {'yes' if s['pareto_improved'] else 'no'}")
        lines.append("")
    students = sorted(first["students"])
    for method, per_seed in results.items():
        verdicts = ", ".join(f"seed {seed} {'yes' if summ['mutual_pareto_improvement'] else 'no'}"
                             for seed, summ in per_seed.items())
        gains = []
        for st in students:
            weak = weaker_domain(first["students"][st]["initial"])
            per = "/".join(f"{100 * (summ['students'][st]['final'][weak] - summ['students'][st]['initial'][weak]):+.1f}"
                           for summ in per_seed.values())
            gains.append(f"{st} on {weak} {per}")
        lines.append(f"{method}: mutual Pareto improvement: {verdicts}; weaker-domain gains: {'; '.join(gains)}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    """Fig. 7's layout: per student, its two domain scores as a point per method (and seed), the
    initial student as a star, its quadrant of Pareto improvement shaded; bars are 95 % intervals."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    first = _first(results)
    students = sorted(first["students"])
    fig, axes = plt.subplots(1, len(students), figsize=(5 * len(students), 4.5), squeeze=False)
    for ax, student in zip(axes[0], students):
        initial = first["students"][student]["initial"]
        dx, dy = sorted(initial)[:2]
        x0, y0 = 100 * initial[dx], 100 * initial[dy]
        ax.axvline(x0, color="grey", ls="--", lw=0.8)
        ax.axhline(y0, color="grey", ls="--", lw=0.8)
        ax.fill_between([x0, 100], y0, 100, color="green", alpha=0.06, label="Pareto improvement")
        ax.scatter([x0], [y0], marker="*", s=160, color="black", label="initial", zorder=3)
        for method, per_seed in results.items():
            xs, ys, xerr, yerr = [], [], [[], []], [[], []]
            for summ in per_seed.values():
                s = summ["students"][student]
                x, y = 100 * s["final"][dx], 100 * s["final"][dy]
                xs.append(x)
                ys.append(y)
                ci = s.get("intervals_95")
                for err, d, v in ((xerr, dx, x), (yerr, dy, y)):
                    lo, hi = (100 * c for c in ci[d]["final"]) if ci else (v, v)
                    err[0].append(v - lo)
                    err[1].append(hi - v)
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="o", capsize=2, label=method, alpha=0.85)
        ax.set_xlabel(f"{dx} avg@k (%)")
        ax.set_ylabel(f"{dy} avg@k (%)")
        ax.set_title(student)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser():
    ap = cli.parser("python -m opcod.compare", __doc__)
    cli.add_config_args(ap, "a run config, for every run (default: the embedded CPU demo)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per method and seed")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="the methods to run")
    ap.add_argument("--out", default="runs/compare", help="directory of the runs, the table and the plot")
    ap.add_argument("--nproc", type=int, default=2, help="processes per run (torchrun --nproc_per_node)")
    return ap


def main(argv=None) -> int:
    args = cli.parse(build_parser(), argv)
    if args.config and not Path(args.config).is_file():
        print(f"opcod.compare: --config {args.config!r} does not exist", file=sys.stderr)
        return 2
    bad = [o for o in args.overrides if o.split("=", 1)[0] in {"method", "seed", "output_dir", "run_name"}]
    if bad:
        print(f"opcod.compare: {bad[0]!r}: method, seed, output_dir and run_name are set per run", file=sys.stderr)
        return 2
    if args.print_config:   # what the first run gets; the others differ in method and seed only
        from .config import ConfigError, load_config
        from .train import DEFAULT_CONFIG
        try:
            cfg = load_config(args.config or str(DEFAULT_CONFIG), [*args.overrides, f"method={args.methods[0]}",
                                                                   f"seed={args.seeds[0]}",
                                                                   f"output_dir={Path(args.out).resolve()}",
                                                                   f"run_name={run_name(args.methods[0], args.seeds[0])}"])
        except ConfigError as exc:
            print(f"opcod.compare: {exc}", file=sys.stderr)
            return 2
        cli.print_config(cfg)
        return 0
    out = Path(args.out).resolve()   # made by the first run: a refused start leaves no empty folder
    for seed in args.seeds:
        for method in args.methods:
            rc = launch(method, seed, out, args.config, args.nproc, args.overrides)
            if rc != 0:
                print(f"opcod.compare: the {method} run with seed {seed} failed (exit {rc}); "
                      f"finished runs are kept in {out}", file=sys.stderr)
                return rc
    results = collect(out, args.methods, args.seeds)
    text = comparison_table(results)
    print(text)
    (out / "comparison.txt").write_text(text + "\n")
    (out / "comparison.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {plot(results, out / 'comparison.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
