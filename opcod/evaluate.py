"""python -m opcod.evaluate MODEL_DIR...: avg@k of Hugging Face models per domain, as one table."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from . import cli
from .config import ConfigError, load_config
from .data import Problem
from .distributed import device_of_rank
from .domains import load_domains
from .engine_hf import Sampling
from .engines import make_engine
from .grading import avg_at_k, reward
from .models import check_model_dir, compute_dtype, load_tokenizer
from .step import prompt_ids

DEFAULT_CONFIG = Path(__file__).with_name("configs") / "default.yaml"


def sample_rewards(engine, tokenizer, problems: dict[str, list[Problem]], k: int, sampling: Sampling,
                   seed: int = 0, *, strict: bool = False) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, int]]]:
    """(rewards, distinct): per domain and problem id, the 0/1 reward of each of k samples from
    whatever `engine` holds (any object with generate(prompts, sampling, seed)), and how many of the
    k responses differ from one another. `strict`: grading needs a closing </answer>."""
    rewards, distinct = {}, {}
    for i, (domain, probs) in enumerate(sorted(problems.items())):
        prompts = [prompt_ids(tokenizer, p) for p in probs for _ in range(k)]
        outs = engine.generate(prompts, sampling, seed + i * len(prompts))  # request j: seed + j
        groups = {p.id: outs[j * k:(j + 1) * k] for j, p in enumerate(probs)}
        rewards[domain] = {p.id: [reward(tokenizer.decode(o, skip_special_tokens=True), p.answer, strict=strict)
                                  for o in groups[p.id]] for p in probs}
        distinct[domain] = {pid: len({tuple(o) for o in g}) for pid, g in groups.items()}
    return rewards, distinct


def evaluate_model(engine, tokenizer, problems: dict[str, list[Problem]], k: int, sampling: Sampling,
                   seed: int = 0, *, strict: bool = False) -> dict[str, float]:
    """avg@k per domain of whatever `engine` holds."""
    rewards, _ = sample_rewards(engine, tokenizer, problems, k, sampling, seed, strict=strict)
    return {d: avg_at_k(list(r.values())) for d, r in rewards.items()}


def format_scores(results: dict[str, dict[str, float]]) -> str:
    domains = sorted({d for r in results.values() for d in r})
    width = max(5, *(len(m) for m in results))
    lines = [f"{'model':<{width}}  " + "  ".join(f"{d:>10}" for d in domains),
             "-" * (width + 2 + 12 * len(domains))]
    for model, scores in results.items():
        lines.append(f"{model:<{width}}  " + "  ".join(f"{100 * scores[d]:>9.1f}%" for d in domains))
    return "\n".join(lines)


def build_parser():
    ap = cli.parser("python -m opcod.evaluate", __doc__)
    ap.add_argument("models", nargs="+", help="Hugging Face model folders (safetensors) or Hub ids")
    cli.add_config_args(ap, "a run config whose data section names the problems (e.g. configs/phys_chem.yaml or "
                            "RUN_DIR/config.yaml), or 'demo' for the embedded demo's synthetic questions. Needed "
                            "unless every model is a demo student (default: the demo's config)")
    ap.add_argument("--split", choices=["test", "validation"], default="test", help="which split to score")
    ap.add_argument("--domains", nargs="+", help="default: the config's domains")
    ap.add_argument("--k", type=int, default=16, help="samples per problem (avg@k)")
    ap.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0: greedy)")
    ap.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the config's evaluation setting")
    ap.add_argument("--engine", choices=["hf", "vllm"], default=None, help="default: the config's engine")
    ap.add_argument("--out", help="write the scores, every sample's reward and the number of distinct "
                                   "responses per problem as JSON here")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--require-closing-tag", action="store_true",
                    help="grade an answer only when </answer> closes it (default: SDPO's reading, which also "
                         "reads an unclosed, truncated answer; the config's grading.require_closing_tag also sets it)")
    return ap


def demo_config(models: list[str]) -> str | None:
    """The config to score `models` on when --config is not given: the demo's, when every model is
    a demo student (built in the demo's cache, or exported by a run of the demo config); None
    otherwise, for scoring anything else on the demo's synthetic questions would mean nothing."""
    import yaml

    from .demo import cache_dir
    root = cache_dir().parent.resolve()
    configs = set()
    for m in models:
        p = Path(m).resolve()
        run_config = p.parent.parent / "config.yaml"   # <run_dir>/students/<name>
        if p.parent.parent == root and p.parent.name.startswith("demo-"):
            configs.add(str(DEFAULT_CONFIG) if p.parent.name == cache_dir().name else None)
        elif p.parent.name == "students" and run_config.is_file() and \
                (yaml.safe_load(run_config.read_text()) or {}).get("demo"):
            configs.add(str(run_config))
        else:
            return None
    return configs.pop() if len(configs) == 1 else None


def main(argv=None) -> int:
    ap = build_parser()
    args = cli.parse(ap, argv)
    prog = "opcod.evaluate"
    args.models, overrides = cli.split_overrides(args.models)
    args.overrides = overrides + args.overrides
    if not args.models:
        ap.error("no model given")
    config = str(DEFAULT_CONFIG) if args.config == "demo" else args.config or demo_config(args.models)
    if config is None:
        print(f"{prog}: {', '.join(args.models)}: not the demo's students, so the demo's synthetic questions would "
              "say nothing about them: name the problems with --config (a run config such as configs/phys_chem.yaml, "
              "or RUN_DIR/config.yaml), or --config demo to score them on the demo's questions anyway",
              file=sys.stderr)
        return 2
    try:
        overrides = [f"data.domains=[{','.join(args.domains)}]"] if args.domains else []
        # Only the data section matters here; the config's students are not needed.
        cfg = load_config(config, [*args.overrides, *overrides, "demo=true"])
        if args.print_config:
            cli.print_config(cfg)
            return 0
        if args.k < 1:
            raise ConfigError("--k must be >= 1")
        from .hub import resolve
        models = {m: resolve(m, f"models[{i}]") for i, m in enumerate(args.models)}
        for i, m in enumerate(models.values()):
            check_model_dir(m, f"models[{i}]")
        _, val, test = load_domains(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    problems = test if args.split == "test" else val
    strict = args.require_closing_tag or cfg.grading.require_closing_tag
    sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens or cfg.evaluation.max_new_tokens)
    engine_cfg = dataclasses.replace(cfg.engine, kind=args.engine or cfg.engine.kind)
    cli.warn_cpu_engine(engine_cfg.kind, prog)
    device = device_of_rank()
    dtype = compute_dtype(cfg.model.dtype if engine_cfg.dtype == "auto" else engine_cfg.dtype, device)
    results, rewards, distinct = {}, {}, {}
    for m, path in models.items():
        tokenizer = load_tokenizer(path, m)
        engine = make_engine(engine_cfg, path, bucket_bytes=1 << 20, dtype=dtype, seed=args.seed, tokenizer=tokenizer,
                             device=device)
        try:
            rewards[m], distinct[m] = sample_rewards(engine, tokenizer, problems, args.k, sampling, args.seed,
                                                     strict=strict)
        finally:
            engine.close()
        results[m] = {d: avg_at_k(list(r.values())) for d, r in rewards[m].items()}
    print(f"avg@{args.k} on the {args.split} split (T={args.temperature}, top_p={args.top_p}, "
          f"{engine_cfg.kind} engine)")
    print(format_scores(results))
    if args.out:
        Path(args.out).write_text(json.dumps({"k": args.k, "split": args.split, "temperature": args.temperature,
                                              "engine": engine_cfg.kind, "config": config, "scores": results,
                                              "rewards": rewards, "distinct_responses": distinct},
                                             indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
