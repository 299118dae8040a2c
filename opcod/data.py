"""Problems: SciKnowEval L3 MCQ (raw files, SDPO splits, or the Hugging Face dataset), splits, unions."""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .prompts import student_user_message

DOMAINS = ("chemistry", "physics", "material", "biology")
SPLITS = ("train", "test")
MCQ_TYPES = ("mcq-4-choices", "mcq-2-choices")
# The Hugging Face dataset's record order, reproduced from the raw files (see shared NOTES.md).
RAW_FILES = {
    "physics": ["general_physics_calculation"],
    "material": ["diffusion_rate_analysis", "lattice_volume_calculation",
                 "perovskite_stability_prediction", "valence_electron_difference_calculation"],
    "chemistry": ["molecule_structure_prediction", "molar_weight_calculation",
                  "molecular_property_calculation", "retrosynthesis", "reaction_prediction"],
    "biology": ["GB1_ftness_prediction", "fluorescence_prediction",
                "beta_lactamase_activity_prediction", "Protein_Protein_Interaction",
                "stability_prediction"],
}
SPLIT_SEED = 42
TEST_FRACTION = 0.1


@dataclass(frozen=True)
class Problem:
    id: str
    domain: str
    question: str
    options: list[tuple[str, str]]
    answer: str
    solution: str | None = field(default=None, compare=False)   # a worked solution, if known
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def prompt(self) -> str:
        """The student's user turn."""
        return student_user_message(self.question, self.options)

    @property
    def text(self) -> str:
        """Question and options: what feedback concepts are matched against."""
        return self.question + "\n" + "\n".join(t for _, t in self.options)


class DataError(ValueError):
    """Bad input data, with the file and line it came from."""


def _check(domain: str, split: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; valid domains: {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def read_jsonl(path: str | os.PathLike) -> Iterable[tuple[int, dict]]:
    """(line number, record) for each non-blank line; a malformed line names the file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, rec


def _field(rec: dict, key: str, path, lineno):
    if key not in rec:
        raise DataError(f"{path}:{lineno}: missing field {key!r}")
    return rec[key]


def split_indices(n: int) -> tuple[list[int], list[int]]:
    """SDPO's 9:1 split: a seeded permutation; test is its first ceil(n/10), train the rest."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n).tolist()
    cut = math.ceil(TEST_FRACTION * n)
    return perm[cut:], perm[:cut]


def _raw_records(root: Path, domain: str) -> list[Problem]:
    folder = root / domain.capitalize() / "L3"
    out: list[Problem] = []
    for name in RAW_FILES[domain]:
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing SciKnowEval file for domain {domain!r}")
        for lineno, rec in read_jsonl(path):
            if _field(rec, "type", path, lineno) not in MCQ_TYPES:
                continue
            choices = _field(rec, "choices", path, lineno)
            try:
                # zip, not strict: one upstream record has five texts for four labels, and SDPO's
                # prompts keep the first four.
                options = list(zip(choices["label"], choices["text"]))
            except (KeyError, TypeError):
                raise DataError(f"{path}:{lineno}: 'choices' must hold 'label' and 'text' lists") from None
            answer = _field(rec, "answerKey", path, lineno)
            if answer not in [label for label, _ in options]:
                raise DataError(f"{path}:{lineno}: answerKey {answer!r} is not one of the option labels")
            idx = len(out)
            out.append(Problem(id=f"{domain}-{idx}", domain=domain,
                               question=_field(rec, "question", path, lineno), options=options,
                               answer=answer, meta={"idx": idx, "task": rec.get("details", {}).get("task")}))
    return out


_OPTION = re.compile(r"^([A-Z]): ", re.MULTILINE)
_CUE = "\nPlease reason step by step."


def parse_prompt(prompt: str) -> tuple[str, list[tuple[str, str]]]:
    """Question and options back out of a student prompt (the inverse of student_user_message)."""
    body = prompt[:-len(_CUE)] if prompt.endswith(_CUE) else prompt
    start = body.rfind("\n\nA: ")
    if start < 0:
        raise ValueError("no options block ('\\n\\nA: ...') in the prompt")
    question, block = body[:start], body[start + 2:]
    marks = list(_OPTION.finditer(block))
    options = [(m.group(1), block[m.end():(marks[i + 1].start() - 1 if i + 1 < len(marks) else len(block))])
               for i, m in enumerate(marks)]
    return question, options


def _sdpo_records(root: Path, domain: str, split: str) -> list[Problem]:
    path = root / domain / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing SDPO split file")
    out = []
    for lineno, rec in read_jsonl(path):
        try:
            question, options = parse_prompt(_field(rec, "prompt", path, lineno))
        except ValueError as exc:
            raise DataError(f"{path}:{lineno}: {exc}") from None
        answer = _field(rec, "answer", path, lineno)
        if answer not in [label for label, _ in options]:
            raise DataError(f"{path}:{lineno}: answer {answer!r} is not one of the option labels")
        idx = _field(rec, "idx", path, lineno)
        out.append(Problem(id=f"{domain}-{idx}", domain=domain, question=question, options=options,
                           answer=answer, meta={"idx": idx}))
    return out


def _hf_records(name: str, domain: str) -> list[Problem]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{name!r} is not a local folder, and loading it as a Hugging Face dataset "
                         "needs the 'datasets' package (pip install 'opcod[data]')") from None
    try:
        ds = datasets.load_dataset(name, split="test")
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, ...: say which and why
        raise ValueError(f"could not load the Hugging Face dataset {name!r}: {exc}") from None
    out = []
    for rec in ds:
        if (rec.get("domain", "").lower() != domain or rec.get("details", {}).get("level") != "L3"
                or rec.get("type") not in MCQ_TYPES):
            continue
        idx = len(out)
        options = list(zip(rec["choices"]["label"], rec["choices"]["text"]))
        out.append(Problem(id=f"{domain}-{idx}", domain=domain, question=rec["question"],
                           options=options, answer=rec["answerKey"], meta={"idx": idx}))
    return out


def load_sciknoweval(path, domain: str, split: str) -> list[Problem]:
    """SciKnowEval L3 MCQ problems of one domain and split, in SDPO's split and order.

    path: a raw_data root (<Domain>/L3/*.jsonl), an SDPO-split root (<domain>/{train,test}.json),
    or a Hugging Face dataset name such as "hicai-zju/SciKnowEval".
    """
    _check(domain, split)
    root = Path(path)
    if root.is_dir():
        if (root / domain / f"{split}.json").is_file():
            return _sdpo_records(root, domain, split)
        if (root / domain.capitalize()).is_dir() or (root / "raw_data").is_dir():
            if (root / "raw_data").is_dir():
                root = root / "raw_data"
            records = _raw_records(root, domain)
        else:
            first = f"{domain.capitalize()}/L3/{RAW_FILES[domain][0]}.jsonl"
            raise FileNotFoundError(f"{root}: not a SciKnowEval layout opcod knows: expected {root}/raw_data/{first} "
                                    f"(a clone of the SciKnowEval repository), {root}/{first} (its raw_data "
                                    f"folder) or {root}/{domain}/{split}.json (SDPO's split)")
    elif os.sep in str(path) and not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        raise FileNotFoundError(f"{path}: no such folder")
    else:
        records = _hf_records(str(path), domain)
    train, test = split_indices(len(records))
    return [records[i] for i in (train if split == "train" else test)]


def validation_split(problems: Sequence[Problem], size: int, seed: int = 0,
                     stratum: Callable[[Problem], Hashable] | None = None) -> tuple[list[Problem], list[Problem]]:
    """(train, validation): a seeded subset of `size` problems carved out of a train split; with
    `stratum`, each stratum holds its share of the subset (largest remainders), as a test split does."""
    if not 0 <= size <= len(problems):
        raise ValueError(f"validation size {size} must be between 0 and the {len(problems)} problems")
    rng = random.Random(seed)
    if stratum is None:
        order = list(range(len(problems)))
        rng.shuffle(order)
        held = set(order[:size])
    else:
        strata: dict = {}
        for i, p in enumerate(problems):
            strata.setdefault(stratum(p), []).append(i)
        held = set()
        for key, n in quotas({k: len(v) for k, v in strata.items()}, size).items():
            held.update(rng.sample(strata[key], n))
    return ([p for i, p in enumerate(problems) if i not in held],
            [problems[i] for i in sorted(held)])


def quotas(sizes: dict, n: int) -> dict:
    """n items shared among strata in proportion to their sizes, by largest remainders."""
    total = sum(sizes.values())
    exact = {k: n * size / total for k, size in sizes.items()}
    quota = {k: int(x) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: quota[k] - exact[k])[:n - sum(quota.values())]:
        quota[k] += 1
    return quota


def union(*splits: Sequence[Problem], seed: int | None = None) -> list[Problem]:
    """All problems of several domains in one list (shuffled when a seed is given)."""
    out = [p for s in splits for p in s]
    ids = [p.id for p in out]
    if len(set(ids)) != len(ids):
        raise ValueError("union: problem ids repeat across splits")
    if seed is not None:
        random.Random(seed).shuffle(out)
    return out


def read_problems(path: str | os.PathLike) -> list[Problem]:
    """Problems from a JSON-lines file in opcod's own format (what write_problems writes)."""
    out = []
    for lineno, rec in read_jsonl(path):
        try:
            out.append(Problem(id=str(rec["id"]), domain=rec["domain"], question=rec["question"],
                               options=[tuple(o) for o in rec["options"]], answer=rec["answer"],
                               solution=rec.get("solution"), meta=rec.get("meta", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}:{lineno}: bad problem record ({exc!r})") from None
        if out[-1].answer not in [label for label, _ in out[-1].options]:
            raise DataError(f"{path}:{lineno}: answer {out[-1].answer!r} is not one of the option labels")
    return out


def problems_text(problems: Iterable[Problem]) -> str:
    """Problems as JSON lines in opcod's own format (what read_problems reads)."""
    return "".join(json.dumps({"id": p.id, "domain": p.domain, "question": p.question, "options": p.options,
                               "answer": p.answer, "solution": p.solution, "meta": p.meta}) + "\n"
                   for p in problems)


def write_problems(path: str | os.PathLike, problems: Iterable[Problem]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(problems_text(problems))


# ----------------------------------------------------------------------------- python -m opcod.data prepare

PREPARED_SPLITS = ("train", "validation", "test")
# SDPO's split of each domain's L3 MCQ questions (train, test), for a note when a source differs.
SDPO_SIZES = {"chemistry": (1890, 210), "physics": (720, 80), "material": (841, 94), "biology": (450, 50)}
DEFAULT_VAL_SIZE = 100   # the paper configs' data.val_size (configs/*.yaml)


def ids_digest(problems: Iterable[Problem]) -> str:
    """SHA-256 of the problem ids, in order, one per line: the same digest means the same split."""
    return hashlib.sha256("".join(p.id + "\n" for p in problems).encode()).hexdigest()


def prepare(source, out, *, domains: Sequence[str] = DOMAINS, val_size: int = DEFAULT_VAL_SIZE,
            split_seed: int = 0, overwrite: bool = False, log=print) -> dict:
    """Write out/<domain>/{train,validation,test}.jsonl: SDPO's test split, and its train split less
    a validation subset carved exactly as the trainer carves it (validation_split, data.split_seed).
    Every file is checked before any is written; one that exists with other problems is replaced
    only with `overwrite`. Returns the manifest also written to out/prepare.json."""
    out = Path(out)
    texts, manifest = {}, {"source": str(source), "val_size": val_size, "split_seed": split_seed, "domains": {}}
    for domain in domains:
        _check(domain, "train")
        train, test = load_sciknoweval(source, domain, "train"), load_sciknoweval(source, domain, "test")
        if (len(train), len(test)) != SDPO_SIZES[domain]:
            log(f"note: {domain} has {len(train)} train / {len(test)} test problems, SDPO's split "
                f"{SDPO_SIZES[domain][0]} / {SDPO_SIZES[domain][1]}: {source} is another version of SciKnowEval")
        if not 0 <= val_size <= len(train):
            raise ValueError(f"--val-size {val_size}: {domain} has {len(train)} train problems")
        train, val = validation_split(train, val_size, seed=split_seed)
        manifest["domains"][domain] = {}
        for split, problems in zip(PREPARED_SPLITS, (train, val, test)):
            texts[out / domain / f"{split}.jsonl"] = problems_text(problems)
            manifest["domains"][domain][split] = {"count": len(problems), "ids_sha256": ids_digest(problems)}
    texts[out / "prepare.json"] = json.dumps(manifest, indent=2) + "\n"
    changed = [p for p, t in texts.items() if p.is_file() and p.read_text(encoding="utf-8") != t]
    if changed and not overwrite:
        raise FileExistsError(f"{changed[0]} exists and holds other problems (another source, --val-size or "
                              f"--split-seed; {len(changed)} file(s) differ): pass --overwrite to replace them, "
                              "or choose another OUT")
    for path, text in texts.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)  # a reader never sees half a file
    return manifest


def format_manifest(manifest: dict) -> str:
    lines = [f"{'domain':<10} " + " ".join(f"{s:>10}" for s in PREPARED_SPLITS) + "  ids sha256 (train / validation / test)"]
    for domain, splits in manifest["domains"].items():
        lines.append(f"{domain:<10} " + " ".join(f"{splits[s]['count']:>10}" for s in PREPARED_SPLITS) + "  "
                     + " / ".join(splits[s]["ids_sha256"][:12] for s in PREPARED_SPLITS))
    return "\n".join(lines)


def main(argv=None) -> int:
    import sys

    from . import cli
    ap = cli.parser("python -m opcod.data", __doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", formatter_class=cli.HelpFormatter, description=prepare.__doc__,
                       help="SciKnowEval L3 MCQ in SDPO's split, as <domain>/{train,validation,test}.jsonl")
    p.add_argument("source", help="a clone of the SciKnowEval repository, its raw_data/ folder, a folder of SDPO's "
                                  "split (<domain>/{train,test}.json) or a Hugging Face dataset id "
                                  "(hicai-zju/SciKnowEval; needs pip install 'opcod[data]')")
    p.add_argument("out", help="the folder to write; train on it with data.path=OUT")
    p.add_argument("--val-size", type=int, default=DEFAULT_VAL_SIZE,
                   help="validation problems per domain, carved out of SDPO's train split (data.val_size)")
    p.add_argument("--split-seed", type=int, default=0, help="the carve-out's seed (data.split_seed)")
    p.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS), help="domains to write")
    p.add_argument("--overwrite", action="store_true", help="replace files of OUT that hold other problems")
    args = cli.parse(ap, argv)
    try:
        manifest = prepare(args.source, args.out, domains=args.domains, val_size=args.val_size,
                           split_seed=args.split_seed, overwrite=args.overwrite,
                           log=lambda m: print(m, file=sys.stderr))
    except (OSError, ValueError) as exc:
        print(f"opcod.data: {exc}", file=sys.stderr)
        return 2
    print(format_manifest(manifest))
    print(f"wrote {args.out}: train with data.path={args.out} data.val_size={args.val_size}"
          + (f" data.split_seed={args.split_seed}" if args.split_seed else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
