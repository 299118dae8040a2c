"""python -m opcod.analyze {run,compare,break-rate,hints}: the paper's diagnostics from runs and models."""
from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from . import cli, effects
from . import metrics as metrics_names
from .feedback import OUTCOMES
from .pareto import dominates

# ----------------------------------------------------------------------------- break-rate

def measure_pair(cfg, engines, tok, tutee: str, tutor: str, problems, val, n: int, seed: int,
                 scores: dict | None = None, signal_on=None) -> dict:
    """App. E on one (tutee, tutor) pair: n rollouts per problem from the tutee, the tutor's feedback on
    every rollout (anchored and sanitized as in training), and the tutee re-answering each rollout
    in every arm of effects.ARMS; the tutor's cognizance among the two on the validation split
    (`scores`: validation scores by model directory, filled as they are measured). With
    `signal_on` (a device), also where the distillation signal of the rollouts with kept feedback
    sits (token_signal), the tutee loaded there in float32."""
    from .distributed import seed_for
    from .engine_hf import Sampling
    from .evaluate import evaluate_model
    from .gating import best_domains, cognizance_gaps, within_tau
    from .step import make_rollouts, prompt_ids, reanswer, request_feedback, self_anchors
    roll = Sampling(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens)
    ids = [prompt_ids(tok, p) for p in problems]
    outs = engines[tutee].generate([i for i in ids for _ in range(n)], roll, seed_for(seed, 0))
    strict = cfg.grading.require_closing_tag
    rollouts = make_rollouts(problems, ids, outs, n, tok, strict=strict)
    for g in range(len(problems)):
        self_anchors(rollouts[g * n:(g + 1) * n], allow_self=cfg.loss.allow_self_anchor)
    fb = Sampling(cfg.feedback.temperature, cfg.feedback.top_p, cfg.feedback.max_new_tokens)
    counts = request_feedback(rollouts, lambda r: True,
                              lambda ps: engines[tutor].generate(ps, fb, seed_for(seed, 1)), tok)
    # Only rollouts whose feedback was kept are counted (App. E), so only they are re-answered.
    post = reanswer(rollouts, lambda ps: engines[tutee].generate(ps, roll, seed_for(seed, 2)), tok,
                    cfg.loss.max_solution_tokens, cfg.loss.max_feedback_tokens, strict=strict)
    ev = Sampling(cfg.evaluation.temperature, cfg.evaluation.top_p, cfg.evaluation.max_new_tokens)
    scores = {} if scores is None else scores
    for path in (tutee, tutor):
        if path not in scores:
            scores[path] = evaluate_model(engines[path], tok, val, cfg.val_k, ev, seed, strict=strict)
    pair = {"tutee": scores[tutee], "tutor": scores[tutor]}
    gap = cognizance_gaps(pair)["tutor"]
    out = {"tutee": tutee, "tutor": {"path": tutor, "gap": gap, "cognizant": within_tau(gap, cfg.tau),
                                     "stronger_domains": sorted(best_domains(pair, "tutor")),
                                     "validation": pair["tutor"]},
           "feedback_outcomes": counts.as_dict(), "rollouts": len(rollouts),
           "records": effects.records_of(rollouts, post, n)}
    if signal_on is not None:
        from .step import teacher_contexts
        from .token_signal import rollout_signals
        kept = [r for r in rollouts if r.outcome == "kept"]
        teacher_contexts(kept, tok, cfg.loss.max_solution_tokens, cfg.loss.max_feedback_tokens)
        out["signal"] = rollout_signals(_float32_model(tutee, cfg, signal_on), kept, cfg.loss.beta)
    return out


def _float32_model(path: str, cfg, device):
    """A model for the float32 diagnostics, with sdpa attention: models.load_causal_lm would pick
    flash-attention on CUDA, which refuses float32."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa",
                                                 trust_remote_code=cfg.model.trust_remote_code)
    return model.to(device).eval()


def _pairs(args) -> list[tuple[str, str]]:
    if args.pairs:
        out = []
        for item in args.pairs:
            if item.count(":") != 1:
                raise ValueError(f"--pairs takes TUTEE:TUTOR model directories, got {item!r}")
            out.append(tuple(item.split(":")))
        return out
    if not (args.tutee and args.tutor):
        raise ValueError("give --tutee and --tutor, or --pairs TUTEE:TUTOR ...")
    return [(args.tutee, args.tutor)]


def _break_rate_cli(args) -> int:
    from .config import load_config
    from .distributed import device_of_rank
    from .domains import load_domains
    from .engines import make_engine
    from .models import check_model_dir, compute_dtype, load_tokenizer
    pairs = _pairs(args)
    paths = sorted({p for pair in pairs for p in pair})
    for path in paths:
        check_model_dir(path, "--pairs" if args.pairs else ("--tutee" if path == args.tutee else "--tutor"))
    if args.n < 2:
        raise ValueError(f"--n must be >= 2 (difficulty buckets need several rollouts), got {args.n}")
    cfg = load_config(args.config, ["demo=true"] + ([f"engine.kind={args.engine}"] if args.engine else []))
    _, val, _ = load_domains(cfg)
    problems = [p for d in sorted(val) for p in val[d][:args.limit]]
    tok = load_tokenizer(paths[0], paths[0])
    device = device_of_rank()
    dtype = compute_dtype(cfg.model.dtype, device)
    engines = {}
    try:
        for path in paths:
            engines[path] = make_engine(cfg.engine, path, bucket_bytes=1 << 20, dtype=dtype, seed=args.seed,
                                        tokenizer=tok, device=device, engines_per_rank=len(paths))
        scores: dict = {}
        measured = [measure_pair(cfg, engines, tok, a, b, problems, val, args.n, args.seed, scores,
                                 device if args.signal else None) for a, b in pairs]
    finally:
        for e in engines.values():
            e.close()
    for m in measured:
        t = m["tutor"]
        print(f"tutee {m['tutee']}  tutor {t['path']}: gap {t['gap']:.3f} "
              f"({'cognizant' if t['cognizant'] else 'incognizant'} at tau {cfg.tau}), "
              f"feedback kept on {len(m['records'])} of {m['rollouts']} rollouts")
    agg = effects.aggregate(measured, args.n)
    print(effects.format_table2(agg, args.n))
    print(effects.format_arms(agg))
    if args.signal:
        from .token_signal import format_summary, summarize
        signal = summarize([s for m in measured for s in m["signal"]])
        print(format_summary(signal, cfg.loss.beta))
    if args.out:
        result = {"n": args.n, "tau": cfg.tau, "aggregate": agg,
                  "pairs": [{**{k: v for k, v in m.items() if k != "records"},
                             "effects": effects.effects(m["records"], args.n)} for m in measured]}
        if args.signal:
            result["signal"] = {"beta": cfg.loss.beta, **signal}
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


# ----------------------------------------------------------------------------- run

def load_run(run_dir: Path) -> tuple[list[dict], dict]:
    """metrics.jsonl in the current names (a run written with the old nested ones is upgraded) and
    summary.json."""
    metrics = [metrics_names.upgrade(json.loads(x)) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
               if x.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return metrics, summary


def run_report(run_dir: Path) -> dict:
    """Anchoring outcomes in the first and last round, FB-on / FB-off step times, gates, trajectories."""
    metrics, summary = load_run(run_dir)
    steps = [m for m in metrics if m["kind"] == "step"]
    counts = [metrics_names.feedback_counts(s) for s in steps]
    rounds = sorted({s["opcod/round"] for s in steps})
    by_round = {r: {o: sum(c[o] for s, c in zip(steps, counts) if s["opcod/round"] == r) for o in OUTCOMES}
                for r in rounds}
    on = [s for s, c in zip(steps, counts) if sum(c.values()) > 0]
    off = [s for s, c in zip(steps, counts) if sum(c.values()) == 0]

    def mean(xs):
        return statistics.mean(xs) if xs else None
    def step_time(s):  # without the feedback-effects diagnostic, which training does not need
        return s["timing_s/step"] - s.get("timing_s/effects", 0.0)
    t_on, t_off = mean([step_time(s) for s in on]), mean([step_time(s) for s in off])
    # App. G: the part of an FB-on step that plain SDPO would spend too (all but the feedback).
    share = mean([(step_time(s) - s["timing_s/feedback"]) / step_time(s) for s in on])
    validation = [m for m in metrics if m["kind"] == "validation"]
    return {"feedback_effects": _phase_effects(steps, summary),
            "outcomes_first_round": by_round.get(rounds[0]) if rounds else None,
            "outcomes_last_round": by_round.get(rounds[-1]) if rounds else None,
            "step_time_fb_on": t_on, "step_time_fb_off": t_off, "steps_fb_on": len(on),
            "steps_fb_off": len(off), "sdpo_equivalent_share": share,
            "gates": [{"round": r["round"], "gaps": r["gaps"], "cognizant": r["cognizant"]} for r in summary["rounds"]],
            "validation": [{"round": m["opcod/round"], "scores": metrics_names.scores_of(m)} for m in validation]}


def _phase_effects(steps: list[dict], summary: dict) -> list[dict]:
    """Per round and tutee, the feedback effects summed over the phase's steps, with the tutor's
    cognizance that round (runs made with logging.feedback_effects)."""
    aware = {r["round"]: r["cognizant"] for r in summary["rounds"]}
    out: dict[tuple, dict] = {}
    for s in steps:
        counts = metrics_names.effect_counts(s)
        if counts is None:
            continue
        key = (s["opcod/round"], s["opcod/tutee"], s["opcod/tutor"])
        total = out.setdefault(key, dict.fromkeys(counts, 0))
        for k, v in counts.items():
            total[k] += v
    return [{"round": r, "tutee": tutee, "tutor": tutor, "tutor_cognizant": aware.get(r, {}).get(tutor),
             "arms": {arm: effects.rates_of_counts(c, arm) for arm in effects.ARMS}}
            for (r, tutee, tutor), c in out.items()]


def _plot_run(run_dir: Path, rep: dict, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    if rep["outcomes_first_round"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = range(len(OUTCOMES))
        for off, (label, key) in zip((-0.2, 0.2), (("first round", "outcomes_first_round"),
                                                  ("last round", "outcomes_last_round"))):
            counts = rep[key]
            total = sum(counts.values()) or 1
            ax.bar([i + off for i in x], [100 * counts[o] / total for o in OUTCOMES], width=0.4, label=label)
        ax.set_xticks(list(x), OUTCOMES, rotation=20)
        ax.set_ylabel("% of feedback")
        ax.set_title("anchoring outcomes")
        ax.legend()
        fig.tight_layout()
        paths.append(out_dir / "anchoring.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    if rep["validation"]:
        students = sorted(rep["validation"][0]["scores"])
        domains = sorted(rep["validation"][0]["scores"][students[0]])
        fig, axes = plt.subplots(1, len(domains), figsize=(4.5 * len(domains), 3.5), squeeze=False)
        for ax, d in zip(axes[0], domains):
            for s in students:
                ax.plot(range(1, len(rep["validation"]) + 1),
                        [100 * v["scores"][s][d] for v in rep["validation"]], marker="o", label=s)
            ax.set_title(f"validation: {d}")
            ax.set_xlabel("evaluation (round starts, then the end)")
            ax.set_ylabel("avg@k (%)")
        axes[0][0].legend()
        fig.tight_layout()
        paths.append(out_dir / "validation_trajectories.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def _fmt(v, pct=False):
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.2f}"


def _run_cli(args) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "summary.json").is_file():
        print(f"opcod.analyze: {run_dir} has no metrics.jsonl and summary.json (not a finished run)",
              file=sys.stderr)
        return 2
    rep = run_report(run_dir)
    out_dir = run_dir / "analysis"
    out_dir.mkdir(exist_ok=True)
    print("anchoring outcomes (share of feedback):")
    print(f"{'outcome':<16} {'first round':>12} {'last round':>12}")
    for o in OUTCOMES:
        row = []
        for key in ("outcomes_first_round", "outcomes_last_round"):
            total = sum(rep[key].values()) if rep[key] else 0
            row.append(_fmt(rep[key][o] / total, True) if total else "-")
        print(f"{o:<16} {row[0]:>12} {row[1]:>12}")
    print(f"\nmean step wall time: FB-on {_fmt(rep['step_time_fb_on'])} s ({rep['steps_fb_on']} steps), "
          f"FB-off {_fmt(rep['step_time_fb_off'])} s ({rep['steps_fb_off']} steps); "
          f"SDPO-equivalent share of an FB-on step: {_fmt(rep['sdpo_equivalent_share'], True)}")
    print("\ngate decisions per round:")
    for g in rep["gates"]:
        print(f"  round {g['round']}: " + ", ".join(
            f"{n} gap {g['gaps'][n]:.3f} {'cognizant' if g['cognizant'][n] else 'incognizant'}" for n in g["gaps"]))
    if rep["feedback_effects"]:
        print("\nfeedback effects (the tutee re-answering its kept-feedback rollouts, per phase):")
        print(f"{'round':<6} {'tutee <- tutor':<32} {'re-answer with':<15} {'break-rate':>20} {'fix-rate':>20}")
        for e in rep["feedback_effects"]:
            who = f"{e['tutee']} <- {e['tutor']}" + {True: " (c)", False: " (i)"}.get(e["tutor_cognizant"], "")
            for arm, r in e["arms"].items():
                broke = effects.percent(r, "break_rate", "broken", "correct")
                print(f"{e['round']:<6} {who:<32} {arm:<15} {broke:>20} "
                      f"{effects.percent(r, 'fix_rate', 'fixed', 'wrong'):>20}")
        print("(c) / (i): the tutor was cognizant / incognizant that round")
    print("\nvalidation trajectories (avg@k %):")
    for v in rep["validation"]:
        print(f"  round {v['round']}: " + "; ".join(
            f"{s} " + ", ".join(f"{d} {100 * x:.1f}" for d, x in sorted(sc.items())) for s, sc in v["scores"].items()))
    for p in _plot_run(run_dir, rep, out_dir):
        print(f"wrote {p}")
    (out_dir / "report.json").write_text(json.dumps(rep, indent=2))
    return 0


# ----------------------------------------------------------------------------- hints

def _hints_cli(args) -> int:
    from .config import load_config
    from .distributed import device_of_rank
    from .domains import load_domains
    from .hints import format_summary, hint_distribution, summarize
    from .models import check_model_dir, load_tokenizer
    check_model_dir(args.student, "--student")
    cfg = load_config(args.config, ["demo=true"])
    train, val, _ = load_domains(cfg)
    pool = [p for p in train if p.domain == args.domain] if args.split == "train" else val.get(args.domain, [])
    if not pool:
        raise ValueError(f"--domain {args.domain!r}: no {args.split} questions; the config's domains are "
                         f"{', '.join(cfg.data.domains)}")
    if any(p.meta.get("source") != "synthetic" for p in pool):
        raise ValueError(f"--domain {args.domain!r} is not synthetic: hints are the demo's reasoning lines")
    problems = [p for p in pool if args.items == "all" or p.meta["common"] == (args.items == "common")]
    if not problems:
        raise ValueError(f"--domain {args.domain!r}: no {args.items} questions in its {args.split} split "
                         f"({len(pool)} in all)")
    tok = load_tokenizer(args.student, args.student)
    model = _float32_model(args.student, cfg, device_of_rank())
    result = {}
    for role in ["student", "teacher"] if args.teacher else ["student"]:
        dists = [hint_distribution(model, tok, p, role == "teacher", cfg.loss.max_feedback_tokens)
                 for p in problems]
        result[role] = summarize(problems, dists)
        who = ("as its self-teacher, the question's critique in context" if role == "teacher"
               else "alone")
        print(format_summary(result[role], f"{args.student} on {args.domain} ({args.split}, {args.items}), {who}"))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


# ----------------------------------------------------------------------------- compare

def compare_runs(run_dirs: Sequence[Path]) -> dict:
    """Per student and domain: initial and each run's final score; Pareto verdicts against the
    initial student and between runs."""
    names = [str(Path(d).resolve()) for d in run_dirs]
    if len(set(names)) != len(names):  # keyed by directory, a repeat would silently drop out
        raise ValueError(f"compare: a run directory is given more than once: {[str(d) for d in run_dirs]}")
    summaries = {str(d): json.loads((Path(d) / "summary.json").read_text()) for d in run_dirs}
    first = next(iter(summaries.values()))
    students = sorted(first["students"])
    out = {"students": {}, "runs": list(summaries)}
    for s in students:
        initial = first["students"][s]["initial"]
        finals = {r: summ["students"][s]["final"] for r, summ in summaries.items() if s in summ["students"]}
        out["students"][s] = {
            "initial": initial, "final": finals,
            "improves_on_initial": {r: dominates(f, initial) for r, f in finals.items()},
            "dominates": {a: [b for b in finals if b != a and dominates(finals[a], finals[b])] for a in finals}}
    return out


def _compare_cli(args) -> int:
    dirs = [Path(d) for d in args.run_dirs]
    missing = [str(d) for d in dirs if not (d / "summary.json").is_file()]
    if missing:
        print(f"opcod.analyze: no summary.json in {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        cmp = compare_runs(dirs)
    except ValueError as exc:
        print(f"opcod.analyze: {exc}", file=sys.stderr)
        return 2
    names = {r: Path(r).name for r in cmp["runs"]}
    for s, info in cmp["students"].items():
        domains = sorted(info["initial"])
        print(f"\n{s}")
        print(f"{'run':<24} " + " ".join(f"{d:>10}" for d in domains) + "  improves  dominates")
        print(f"{'initial':<24} " + " ".join(f"{100 * info['initial'][d]:>9.1f}%" for d in domains))
        for r, f in info["final"].items():
            print(f"{names[r]:<24} " + " ".join(f"{100 * f[d]:>9.1f}%" for d in domains)
                  + f"  {'yes' if info['improves_on_initial'][r] else 'no':>8}  "
                  + (", ".join(names[b] for b in info["dominates"][r]) or "-"))
    if args.out:
        Path(args.out).write_text(json.dumps(cmp, indent=2))
    return 0


def main(argv=None) -> int:
    ap = cli.parser("python -m opcod.analyze", __doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="diagnostics of one run directory", formatter_class=cli.HelpFormatter)
    r.add_argument("run_dir", help="a run directory (<output_dir>/<run_name>)")
    c = sub.add_parser("compare", help="line several runs up per student and domain", formatter_class=cli.HelpFormatter)
    c.add_argument("run_dirs", nargs="+", help="run directories")
    c.add_argument("--out", help="also write the comparison as JSON here")
    b = sub.add_parser("break-rate", help="how often a tutor's feedback breaks correct rollouts",
                       formatter_class=cli.HelpFormatter)
    b.add_argument("--tutee", help="the tutee's model directory (one pair)")
    b.add_argument("--tutor", help="the tutor's model directory (one pair)")
    b.add_argument("--pairs", nargs="+", metavar="TUTEE:TUTOR",
                   help="several (tutee, tutor) pairs, aggregated by the tutor's cognizance (App. E)")
    b.add_argument("--config", default=str(Path(__file__).with_name("configs") / "default.yaml"),
                   help="the run config whose data, sampling and loss settings apply")
    b.add_argument("--n", type=int, default=8, help="rollouts per problem")
    b.add_argument("--limit", type=int, default=50, help="validation problems per domain")
    b.add_argument("--seed", type=int, default=0, help="sampling seed")
    b.add_argument("--engine", choices=["hf", "vllm"], help="default: the config's engine")
    b.add_argument("--signal", action="store_true",
                   help="also where the distillation signal of those rollouts sits (per-token divergence "
                        "from the self-teacher at loss.beta, and its gradient against forward KL's)")
    b.add_argument("--out", help="write every record and the rates as JSON here")
    h = sub.add_parser("hints", help="a demo student's probability for each question's four hints, per item",
                       formatter_class=cli.HelpFormatter)
    h.add_argument("--student", required=True, help="a model directory")
    h.add_argument("--domain", required=True, help="a synthetic domain of the config")
    h.add_argument("--split", choices=["train", "validation"], default="train",
                   help="train: the questions the demo students were built and trained on (what a student "
                        "holds of those items); validation: held out")
    h.add_argument("--items", choices=["specialist", "common", "all"], default="specialist",
                   help="which synthetic items' questions")
    h.add_argument("--teacher", action="store_true",
                   help="also as its self-teacher, with the question's synthetic critique in context")
    h.add_argument("--config", default=str(Path(__file__).with_name("configs") / "default.yaml"),
                   help="the demo config whose synthetic data the questions come from")
    h.add_argument("--out", help="write the distributions and summary as JSON here")
    args = cli.parse(ap, argv)
    try:
        return {"run": _run_cli, "compare": _compare_cli, "break-rate": _break_rate_cli,
                "hints": _hints_cli}[args.command](args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"opcod.analyze: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
