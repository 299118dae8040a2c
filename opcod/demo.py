"""The embedded default's students: a tiny Qwen3-architecture base trained on a textbook of both
synthetic domains' facts and on their worked solutions, tutor feedback and teacher reprompts,
then one SFT student per domain; built on first use and cached, so later runs start at once."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from pathlib import Path

import torch.distributed as dist

from . import prompts
from .config import Config, SFTConfig, StudentConfig
from .sft import run_sft
from .synthetic import LETTERS, reshuffled, textbook, wrong_attempt
from .tiny import build_tokenizer, create_model_dir, tiny_config

VERSION = "v2"  # bumped whenever the synthetic data or the recipe changes: old caches are rebuilt
BASE = dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, vocab=2048)
BASE_SFT = dict(epochs=5, lr=2e-3, batch_size=16, lora_rank=0, warmup_ratio=0.05)
SHUFFLES = 2      # option orders per question in the student role
BOOK_REPEATS = 3  # the textbook is short; repeat it so its facts are seen as often as the MCQs
# Copying lines from the prompt (an induction head) is what every checked option line needs; a
# model trained from scratch lacks it; a few hundred steps of copy drills start to form it.
COPY_DRILLS = 32000
COPY_SFT = dict(epochs=1, lr=3e-3, batch_size=64, lora_rank=0, warmup_ratio=0.05)
DOMAIN_SFT = dict(epochs=3, lr=1e-3, batch_size=16, lora_rank=0, warmup_ratio=0.1)


def cache_dir() -> Path:
    root = os.environ.get("OPCOD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "opcod")
    return Path(root) / f"demo-{VERSION}"


def records(problems, seed: int) -> list[dict]:
    """Every role on each problem: the student's worked solution, the tutor's feedback on a wrong
    attempt, and the self-teacher answering with a correct solution (and feedback) in its context,
    so one tiny model can play all three parts of OPCoD."""
    rng = random.Random(seed)
    out = []
    for p in problems:
        critique = p.meta["feedback"].split("</concept>", 1)[1].strip()
        # The same question under several option orders: the letter cannot be memorised from the
        # question, only found by looking the recalled fact up among the options.
        for variant in [p] + [reshuffled(p, rng) for _ in range(SHUFFLES - 1)]:
            out.append({"messages": prompts.messages(variant.prompt), "response": variant.solution})
        out.append({"messages": prompts.tutor_messages(p.prompt, wrong_attempt(p, rng)),
                    "response": p.meta["feedback"]})
        teacher = prompts.reprompt_message(p.prompt, p.solution, critique if rng.random() < 0.5 else None)
        out.append({"messages": prompts.messages(teacher), "response": p.solution})
    return out


def copy_drills(problems, n: int, seed: int) -> list[dict]:
    """n drills that repeat four random option texts of `problems`, given as "A: text" lines."""
    rng = random.Random(seed)
    pool = sorted({t for p in problems for _, t in p.options})
    out = []
    for _ in range(n):
        options = list(zip(LETTERS, rng.sample(pool, 4)))
        user = prompts.student_user_message("Repeat the options.", options)
        out.append({"messages": prompts.messages(user, system=None),
                    "response": "\n".join(f"{label}: {text}" for label, text in options)})
    return out


def _write(path: Path, recs: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return str(path)


def prepare(cfg: Config) -> Config:
    """cfg with its students set to the demo students, building them if the cache lacks them."""
    from .train import load_domains
    root = cache_dir()
    domains = cfg.data.domains
    names = [f"{d[:4]}_student" for d in domains]
    paths = [root / n for n in names]
    students = [StudentConfig(n, str(p), d) for n, p, d in zip(names, paths, domains)]
    if all((p / "model.safetensors").is_file() for p in paths):
        return dataclasses.replace(cfg, students=students)

    rank = dist.get_rank()
    start = time.perf_counter()
    train_set, _, _ = load_domains(cfg)  # the same train split the run will use: no val/test leak
    by_domain = {d: [p for p in train_set if p.domain == d] for d in domains}
    if rank == 0:
        print(f"building the demo students in {root} (first run only)", flush=True)
        root.mkdir(parents=True, exist_ok=True)
        corpus = [json.dumps(r) for r in records(train_set, cfg.seed)]
        tok = build_tokenizer(corpus, vocab_size=BASE["vocab"])
        create_model_dir(root / "init", tok, tiny_config(len(tok), BASE["hidden"], BASE["layers"], BASE["heads"],
                                                         BASE["kv_heads"], BASE["intermediate"]), seed=cfg.seed)
        book = [{"messages": [{"role": "user", "content": f"Tell me about {topic}."}], "response": fact}
                for d in domains for topic, fact in textbook(d)]
        _write(root / "base.jsonl", records(train_set, cfg.seed) + book * BOOK_REPEATS)
        _write(root / "copy.jsonl", copy_drills(train_set, COPY_DRILLS, cfg.seed))
        for d in domains:
            _write(root / f"{d}.jsonl", records(by_domain[d], cfg.seed + 1))
    dist.barrier()
    run_sft(SFTConfig(model=str(root / "init"), output=str(root / "copier"), data=str(root / "copy.jsonl"),
                      seed=cfg.seed, **COPY_SFT), log=_log)
    run_sft(SFTConfig(model=str(root / "copier"), output=str(root / "base"), data=str(root / "base.jsonl"),
                      seed=cfg.seed, **BASE_SFT), log=_log)
    for s, d in zip(students, domains):
        run_sft(SFTConfig(model=str(root / "base"), output=s.path, data=str(root / f"{d}.jsonl"),
                          seed=cfg.seed, **DOMAIN_SFT), log=_log)
    _log(f"demo students ready in {time.perf_counter() - start:.0f} s")
    return dataclasses.replace(cfg, students=students)


def _log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)
