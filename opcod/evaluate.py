"""python -m opcod.evaluate MODEL_DIR...: avg@k of Hugging Face models per domain, as one table."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .config import ConfigError, load_config
from .data import Problem
from .engine_hf import Sampling
from .grading import avg_at_k, reward
from .step import prompt_ids

DEFAULT_CONFIG = Path(__file__).with_name("configs") / "default.yaml"


def evaluate_model(engine, tokenizer, problems: dict[str, list[Problem]], k: int, sampling: Sampling,
                   seed: int = 0) -> dict[str, float]:
    """avg@k per domain of whatever `engine` holds (any object with generate(prompts, sampling, seed))."""
    scores = {}
    for i, (domain, probs) in enumerate(sorted(problems.items())):
        prompts = [prompt_ids(tokenizer, p) for p in probs for _ in range(k)]
        outs = engine.generate(prompts, sampling, seed + i)
        rewards = [[reward(tokenizer.decode(o, skip_special_tokens=True), p.answer)
                    for o in outs[j * k:(j + 1) * k]] for j, p in enumerate(probs)]
        scores[domain] = avg_at_k(rewards)
    return scores


def format_scores(results: dict[str, dict[str, float]]) -> str:
    domains = sorted({d for r in results.values() for d in r})
    width = max(5, *(len(m) for m in results))
    lines = [f"{'model':<{width}}  " + "  ".join(f"{d:>10}" for d in domains),
             "-" * (width + 2 + 12 * len(domains))]
    for model, scores in results.items():
        lines.append(f"{model:<{width}}  " + "  ".join(f"{100 * scores[d]:>9.1f}%" for d in domains))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m opcod.evaluate", description=__doc__)
    ap.add_argument("models", nargs="+", help="Hugging Face model directories (safetensors)")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG),
                    help="a run config whose data section defines the problems (e.g. RUN_DIR/config.yaml)")
    ap.add_argument("--split", choices=["test", "validation"], default="test")
    ap.add_argument("--domains", nargs="*", help="default: the config's domains")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the config's evaluation setting")
    ap.add_argument("--engine", choices=["hf", "vllm"], default=None, help="default: the config's engine")
    ap.add_argument("--out", help="write the scores as JSON here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        overrides = [f"data.domains=[{','.join(args.domains)}]"] if args.domains else []
        # Only the data section matters here; the config's students are not needed.
        cfg = load_config(args.config, overrides + ["demo=true"])
        if args.k < 1:
            raise ConfigError("--k must be >= 1")
        from .models import check_model_dir, load_tokenizer
        for i, m in enumerate(args.models):
            check_model_dir(m, f"models[{i}]")
        from .train import load_domains
        _, val, test = load_domains(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"opcod.evaluate: {exc}", file=sys.stderr)
        return 2
    problems = test if args.split == "test" else val
    sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens or cfg.evaluation.max_new_tokens)
    kind = args.engine or cfg.engine.kind
    results = {}
    for m in args.models:
        tokenizer = load_tokenizer(m, m)
        if kind == "vllm":
            from .engine_vllm import VLLMEngine
            engine = VLLMEngine(m, 1 << 20, torch.bfloat16, args.seed, cfg.engine.gpu_memory_utilization,
                                cfg.engine.max_model_len)
        else:
            from .engine_hf import HFEngine
            engine = HFEngine(m, 1 << 20, torch.float32, tokenizer.pad_token_id, [tokenizer.eos_token_id])
        try:
            results[m] = evaluate_model(engine, tokenizer, problems, args.k, sampling, args.seed)
        finally:
            engine.close()
    print(f"avg@{args.k} on the {args.split} split (T={args.temperature}, top_p={args.top_p})")
    print(format_scores(results))
    if args.out:
        Path(args.out).write_text(json.dumps({"k": args.k, "split": args.split, "scores": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
