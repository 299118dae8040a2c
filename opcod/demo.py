"""The embedded default's students: a tiny Qwen3-architecture base that knows the common facts of
both synthetic domains and plays every OPCoD role, then one SFT student per domain that also
knows its domain's specialist facts; built on first use and cached, so later runs start at once."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import time
from pathlib import Path

import torch.distributed as dist

from . import prompts
from .config import Config, SFTConfig, StudentConfig
from .sft import run_sft
from .synthetic import textbook, wrong_attempt
from .tiny import build_tokenizer, create_model_dir, tiny_config

VERSION = "v8"  # bumped whenever the synthetic data or the recipe changes: old caches are rebuilt
BASE = dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, vocab=2048)
# The base learns in two stages. Answering is the slow skill: mixed with the tutor and teacher
# records from the start, it learned less in twice the steps. So it first reads the worked
# solutions and the textbook; fitting them comes early, but answering held-out phrasings from the
# item in the question came only after 10-16 epochs, and weight decay makes it come surely.
KNOWLEDGE_SFT = dict(epochs=16, lr=2e-3, batch_size=16, lora_rank=0, warmup_ratio=0.05, weight_decay=0.1)
BOOK_REPEATS = 2  # the textbook also states the facts of items no train question asks about
# Then the roles: the tutor's feedback, and the self-teacher with a solution, feedback or both in
# its context, with drills on made-up items so that it learns to read that context.
TEACHER_DRILLS = 320
RIGHT_REVIEWS = 1 / 3  # the share of the tutor's training reviews that are of right attempts (see records)
ROLES_SFT = dict(epochs=3, lr=1e-3, batch_size=16, lora_rank=0, warmup_ratio=0.05)
# Each student then reads its own domain's worked solutions, roles and whole textbook: enough to
# learn the specialist facts (LoRA at this size learned them for train questions only), gentle
# enough to keep the other domain (at lr 1e-3 a student lost half of it). It also rereads the other
# domain's common records and textbook: without them the physics student scored 50.6 % on
# chemistry validation questions (its base 52.5 %), with them 70.6 % (avg@8, one build). One more
# review of a wrong attempt per own-domain problem (more_reviews) taught the chemistry tutor its
# specialist facts: on the other student's wrong specialist attempts at validation questions its
# hint named the right fact 26 of 40 times, 13 of 40 without (the physics tutor: 11 of 28, 12 of 26
# without). Half as many teacher drills again keep the self-teacher reading its context: given
# the question's own critique, the physics student's teacher then fixed 23 of 24 of its wrong
# chemistry attempts, against 8 of 23 when only the base had read drills.
DOMAIN_SFT = dict(epochs=3, lr=5e-4, batch_size=16, lora_rank=0, warmup_ratio=0.1)
# SHA-256 of each student's model.safetensors in the build the README's table came from (split seed
# 0, `torchrun --nproc_per_node=2`, 2026-12-05, a 2-core Intel Xeon with AVX-512, pinned to AVX2).
# The same bits come out on Intel CPUs with AVX2 only: on other vendors MKL ignores MKL_CBWR=AVX2
# and its GEMMs round otherwise (measured 2026-12-06 on an AMD EPYC: with MKL made to take its Intel
# path, the same machine built these bits and printed the README's table; docs/demo.md).
README_STUDENTS = {"chem_student": "bf0858675d8fc41a263ed29ea178d282efc29da714a8861908db71cc2052275d",
                   "phys_student": "a9796446daf0fb7cb332624385fd44152a1bc9c81d5801752ab9a7c6a659e236"}


def _cpuinfo() -> str:
    import platform
    if platform.machine() != "x86_64":
        return ""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read(1 << 16)
    except OSError:
        return ""


def avx2_machine() -> bool:
    """Whether this is an x86-64 machine whose CPU has AVX2 (the machines the demo pins)."""
    return any(line.startswith("flags") and " avx2" in line for line in _cpuinfo().splitlines())


def readme_machine() -> bool:
    """Whether this machine builds the README's students bit for bit: an Intel CPU with AVX2, where
    MKL honours MKL_CBWR=AVX2 (its docs: on other vendors that setting falls back to AUTO)."""
    return avx2_machine() and any(line.startswith("vendor_id") and "GenuineIntel" in line
                                  for line in _cpuinfo().splitlines())


def pin_cpu_numerics() -> None:
    """The demo's CPU kernels take their AVX2 paths on every x86-64 machine that has AVX2: ATen's
    vectorized kernels (softmax and attention sum in another order with AVX-512) and MKL's BLAS
    (MKL_CBWR, its reproducibility mode), so Intel machines of other instruction sets build the same
    students (MKL honours MKL_CBWR=AVX2 on Intel CPUs only). Call before the process's first tensor operation; a value already set wins."""
    if not avx2_machine():
        return
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    os.environ.setdefault("MKL_CBWR", "AVX2")
    import torch
    # ATen reads its capability once, at the first kernel it dispatches: after that the pin is void.
    if os.environ["ATEN_CPU_CAPABILITY"] == "avx2" and torch.backends.cpu.get_cpu_capability() != "AVX2":
        import warnings
        warnings.warn("opcod.demo: ATen chose its CPU kernels before they could be pinned to AVX2; this "
                      "machine may build other demo students than the README's", stacklevel=2)


def cache_dir(split_seed: int = 0) -> Path:
    """Where the demo students of data.split_seed live (one set for every run seed)."""
    root = os.environ.get("OPCOD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "opcod")
    return Path(root) / (f"demo-{VERSION}" + (f"-split{split_seed}" if split_seed else ""))


def records(problems, seed: int) -> list[dict]:
    """Every role on each problem: the student's worked solution, the tutor's review of an attempt,
    and the self-teacher answering with a correct solution, the review or both in its context
    (OPCoD gives it each of the three), so one tiny model can play all parts of OPCoD."""
    rng = random.Random(seed)
    out = []
    for p in problems:
        concept, critique = p.meta["feedback"].split("</concept>", 1)
        # A third of the reviews are of right attempts, confirmed with the same hint. Reviewing
        # wrong ones only (v5), the tutor named another item and group on right attempts; reviewing
        # half right ones with the verdict first (v6), it called 29 of 39 wrong attempts right and
        # copied their hint, which fitted half its records. The review now opens with the hint, in
        # the textbook's words for the <concept> topic it has just named (synthetic.py), so the
        # tutor recalls it as it recalls the textbook, and its verdict comes last.
        if rng.random() < RIGHT_REVIEWS:
            attempt, review = p.solution, confirmation(critique.strip())
        else:
            attempt, review = wrong_attempt(p, rng), critique.strip()
        out.append(solution_record(p))
        out.append(review_record(p, attempt, concept, review))
        solution, feedback = rng.choice([(p.solution, None), (None, review), (p.solution, review)])
        out.append({"messages": prompts.messages(prompts.reprompt_message(p.prompt, solution, feedback)),
                    "response": p.solution})
    return out


def review_record(p, attempt: str, concept: str, review: str) -> dict:
    return {"messages": prompts.tutor_messages(p.prompt, attempt), "response": f"{concept}</concept>\n{review}"}


def more_reviews(problems, seed: int) -> list[dict]:
    """One more tutor review per problem, of a wrong attempt: a student learns to recall its own
    domain's facts as a tutor, after the question's concept, from more than one record each."""
    rng = random.Random(seed)
    out = []
    for p in problems:
        concept, critique = p.meta["feedback"].split("</concept>", 1)
        out.append(review_record(p, wrong_attempt(p, rng), concept, critique.strip()))
    return out


def confirmation(critique: str) -> str:
    """A critique's hint, said of a right attempt: "It is in group 1; ... The attempt is right."."""
    return critique.split(" The attempt ", 1)[0] + " The attempt is right."


def made_up_name(rng: random.Random, like: str) -> str:
    """A word no table holds, shaped like `like` (a symbol, a formula or a lower-case name)."""
    if len(like) <= 2 and like[:1].isupper():
        return rng.choice("QXZJ") + rng.choice("qxzjvw")[:len(like) - 1]
    if any(ch.isdigit() for ch in like):
        return f"{rng.choice('QXZJ')}{rng.choice('qxzv')}{rng.randint(2, 4)}"
    syllables = ["zor", "bli", "quen", "vat", "mur", "dax", "pel", "tro", "gim", "sul"]
    return "".join(rng.sample(syllables, 3)) + rng.choice(["ium", "ance", "ity", "on"])


def teacher_drills(problems, n: int, seed: int) -> list[dict]:
    """n self-teacher records about made-up items: the only way to their answer is the solution or
    feedback in the context, so the teacher learns to read it instead of answering from memory.
    (Trained on known items only, a student's teacher answered 29 of 40 held-out questions of its
    weaker domain with a correct solution in context and 31 without; with these drills, 37.)"""
    rng = random.Random(seed)
    by_family: dict[str, list] = {}
    for p in problems:
        by_family.setdefault(p.meta["family"], []).append(p)
    out = []
    for _ in range(n):
        family = rng.choice(sorted(by_family))
        asked, source = rng.choice(by_family[family]), rng.choice(by_family[family])
        fake = made_up_name(rng, asked.meta["item"])
        item = re.compile(rf"(?<![\w(]){re.escape(asked.meta['item'])}(?![\w)])")
        prompt = item.sub(fake, asked.prompt)
        critique = source.meta["feedback"].split("</concept>", 1)[1].strip()
        critique = re.sub(rf"(?<![\w(]){re.escape(source.meta['item'])}(?![\w)])", fake, critique)
        solution, feedback = rng.choice([(source.solution, None), (None, critique), (source.solution, critique)])
        out.append({"messages": prompts.messages(prompts.reprompt_message(prompt, solution, feedback)),
                    "response": source.solution})
    return out


def book(domains, common_only: bool) -> list[dict]:
    """The domains' textbook as "Tell me about X." records."""
    return [{"messages": [{"role": "user", "content": f"Tell me about {topic}."}], "response": fact}
            for d in domains for topic, fact in textbook(d, common_only)]


def solution_record(p) -> dict:
    return {"messages": prompts.messages(p.prompt), "response": p.solution}


def _write(path: Path, recs: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return str(path)


def prepare(cfg: Config) -> Config:
    """cfg with its students set to the demo students, building them if the cache lacks them."""
    from .domains import load_domains
    root = cache_dir(cfg.data.split_seed)
    # The students depend on the data's split seed only: runs of every `seed` start from the same
    # students, and none of them has read a question of the test split those runs score.
    seed = cfg.data.split_seed
    domains = cfg.data.domains
    names = [f"{d[:4]}_student" for d in domains]
    paths = [root / n for n in names]
    students = [StudentConfig(n, str(p), d) for n, p, d in zip(names, paths, domains)]
    if all((p / "model.safetensors").is_file() for p in paths):
        _log(against_readme(students, seed))
        return dataclasses.replace(cfg, students=students)

    rank = dist.get_rank()
    start = time.perf_counter()
    train_set, _, _ = load_domains(cfg)  # the same train split the run will use: no val/test leak
    by_domain = {d: [p for p in train_set if p.domain == d] for d in domains}
    if rank == 0:
        print(f"building the demo students in {root} (first run only)", flush=True)
        root.mkdir(parents=True, exist_ok=True)
        corpus = [json.dumps(r) for r in records(train_set, seed)]
        tok = build_tokenizer(corpus, vocab_size=BASE["vocab"])
        create_model_dir(root / "init", tok, tiny_config(len(tok), BASE["hidden"], BASE["layers"], BASE["heads"],
                                                         BASE["kv_heads"], BASE["intermediate"]), seed=seed)
        # The base knows the common facts of both domains; each student also learns its own
        # domain's specialist facts, so each is ahead on its own domain and the two stay close.
        common = [p for p in train_set if p.meta["common"]]
        _write(root / "knowledge.jsonl", [solution_record(p) for p in common] + book(domains, True) * BOOK_REPEATS)
        _write(root / "roles.jsonl", records(common, seed) + teacher_drills(common, TEACHER_DRILLS, seed))
        for d in domains:
            others = [o for o in domains if o != d]
            replay = records([p for o in others for p in by_domain[o] if p.meta["common"]], seed + 2)
            _write(root / f"{d}.jsonl", records(by_domain[d], seed + 1) + more_reviews(by_domain[d], seed + 3)
                   + teacher_drills(common, TEACHER_DRILLS // 2, seed + 4) + book([d], False) * BOOK_REPEATS
                   + replay + book(others, True) * BOOK_REPEATS)
    dist.barrier()
    # A tiny student's weights stay gathered; four records per forward, sorted by length, pad less
    # (the v7 recipe, 598 s against 663 s: the same students up to float rounding, so other bits).
    whole = dict(seed=seed, reshard_after_forward=False, micro_batch_size=4)
    run_sft(SFTConfig(model=str(root / "init"), output=str(root / "reader"), data=str(root / "knowledge.jsonl"),
                      **whole, **KNOWLEDGE_SFT), log=_log)
    run_sft(SFTConfig(model=str(root / "reader"), output=str(root / "base"), data=str(root / "roles.jsonl"),
                      **whole, **ROLES_SFT), log=_log)
    for s, d in zip(students, domains):
        run_sft(SFTConfig(model=str(root / "base"), output=s.path, data=str(root / f"{d}.jsonl"),
                          **whole, **DOMAIN_SFT), log=_log)
    _log(f"demo students ready in {time.perf_counter() - start:.0f} s")
    _log(against_readme(students, seed))
    return dataclasses.replace(cfg, students=students)


def against_readme(students: list[StudentConfig], split_seed: int) -> str:
    """One line: whether these demo students are, bit for bit, the ones the README's table came
    from, so a user whose figures differ from it knows whether the students or the run differ."""
    digests = {s.name: hashlib.sha256((Path(s.path) / "model.safetensors").read_bytes()).hexdigest()
               for s in students}
    if split_seed != 0 or digests.keys() != README_STUDENTS.keys():
        return "demo students: not the README's build (it used data.split_seed=0 and both default domains)"
    differ = [n for n in digests if digests[n] != README_STUDENTS[n]]
    if not differ:
        return "demo students: bit-identical to the README's (sha256 " + ", ".join(
            f"{n} {d[:12]}" for n, d in digests.items()) + "); the default run, seed 0, printed its table from them"
    why = ("e.g. another torch, --nproc_per_node or data key built other students here" if readme_machine() else
           "the README's were built on an Intel CPU with AVX2, and on this CPU MKL takes other GEMM paths")
    return ("demo students: not the README's, bit for bit (sha256 " + ", ".join(
        f"{n} {digests[n][:12]} against {README_STUDENTS[n][:12]}" for n in differ)
        + f"): {why}, so the table will differ from the README's (docs/demo.md, 'The same students')")


def _log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)
