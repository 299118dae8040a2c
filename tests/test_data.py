"""SciKnowEval loading: SDPO's exact split from the raw files, SDPO split files, errors, subsets."""
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from conftest import SHARED
from opcod.data import (DOMAINS, DataError, Problem, load_sciknoweval, parse_prompt, read_problems,
                        quotas, union, validation_split, write_problems)

SKE = os.path.join(SHARED, "data", "sciknoweval")
RAW, SDPO = os.path.join(SKE, "raw_data"), os.path.join(SKE, "sdpo_splits")
SIZES = {"chemistry": (1890, 210), "physics": (720, 80), "material": (841, 94), "biology": (450, 50)}
needs_data = pytest.mark.skipif(not os.path.isdir(SKE), reason=f"SciKnowEval copy not found at {SKE}")


@needs_data
@pytest.mark.parametrize("domain", DOMAINS)
def test_raw_files_reproduce_sdpo_split_exactly(domain):
    for split, size in zip(("train", "test"), SIZES[domain]):
        raw = load_sciknoweval(RAW, domain, split)
        sdpo = load_sciknoweval(SDPO, domain, split)
        assert len(raw) == len(sdpo) == size
        assert [p.meta["idx"] for p in raw] == [p.meta["idx"] for p in sdpo]
        with open(os.path.join(SDPO, domain, f"{split}.json")) as f:
            records = [json.loads(line) for line in f]
        # The student prompt built from each raw record is SDPO's prompt, byte for byte.
        assert [p.prompt for p in raw] == [r["prompt"] for r in records]
        assert [p.answer for p in raw] == [r["answer"] for r in records]
        assert raw == sdpo


def content(p: Problem) -> tuple:
    """What makes two records the same question for a student: the question and its option texts
    (in any order, whitespace and case folded), whatever their ids."""
    def fold(t):
        return " ".join(t.split()).lower()
    return fold(p.question), tuple(sorted(fold(t) for _, t in p.options))


# SDPO's own split holds one question in both: material test 365 is in train too, with its options
# reordered (as 332, 377, 400, 407, 431; NOTES.md). Kept as SDPO has it, so the baselines compare;
# any other overlap is ours.
KNOWN_OVERLAP = {"material-365"}


@needs_data
@pytest.mark.parametrize("root", [RAW, SDPO], ids=["raw", "sdpo_splits"])
def test_no_test_question_is_in_training_but_sdpos_known_duplicate(root):
    """Every domain's test questions against the union of all domains' train splits (what a run
    trains on), by content rather than id. Guards against a split that leaks a test question into
    training under another id (the old test compared the ids of two disjoint slices of one domain)."""
    train = {content(p) for d in DOMAINS for p in load_sciknoweval(root, d, "train")}
    leaked = {p.id for d in DOMAINS for p in load_sciknoweval(root, d, "test") if content(p) in train}
    assert leaked == KNOWN_OVERLAP


@needs_data
def test_a_runs_validation_split_comes_from_train_and_holds_no_test_question(tmp_path):
    """load_domains as a run calls it: validation plus train is exactly SDPO's train split, and no
    validation or train question is a test question (beyond SDPO's known duplicate). Guards against
    a validation split carved from anywhere but the train split, which the gate would then read
    test questions from."""
    from opcod.config import load_config
    from opcod.domains import load_domains
    cfg = load_config(overrides=["demo=true", "data.source=sciknoweval", f"data.path={RAW}",
                                 "data.domains=[chemistry,physics,material,biology]", "data.val_size=50"])
    train, val, test = load_domains(cfg)
    for d in DOMAINS:
        ours = {p.id for p in train if p.domain == d} | {p.id for p in val[d]}
        assert len(val[d]) == 50 and not {p.id for p in val[d]} & {p.id for p in train}
        assert ours == {p.id for p in load_sciknoweval(RAW, d, "train")}
    tested = {content(p): p.id for ps in test.values() for p in ps}
    seen = {tested[content(p)] for p in train + [p for ps in val.values() for p in ps] if content(p) in tested}
    assert seen == KNOWN_OVERLAP


def test_unknown_domain_and_split_name_the_valid_ones():
    with pytest.raises(ValueError, match="chemistry, physics, material, biology"):
        load_sciknoweval(RAW, "geology", "train")
    with pytest.raises(ValueError, match="train, test"):
        load_sciknoweval(RAW, "physics", "validation")


def test_malformed_line_names_file_and_line(tmp_path):
    d = tmp_path / "physics"
    d.mkdir()
    good = {"idx": 0, "prompt": "Q?\n\nA: x\nB: y\nPlease reason step by step.", "answer": "A"}
    (d / "train.json").write_text(json.dumps(good) + "\n" + "{not json\n")
    with pytest.raises(DataError, match=r"train\.json:2"):
        load_sciknoweval(tmp_path, "physics", "train")
    (d / "train.json").write_text(json.dumps({**good, "answer": "E"}) + "\n")
    with pytest.raises(DataError, match=r"train\.json:1: answer 'E'"):
        load_sciknoweval(tmp_path, "physics", "train")


def test_missing_folder_and_hf_without_datasets(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_sciknoweval(tmp_path / "nope" / "deeper", "physics", "train")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="datasets"):
            load_sciknoweval("hicai-zju/SciKnowEval", "physics", "train")


def test_parse_prompt_multiline_options():
    q, opts = parse_prompt("Line one\n\nline two?\n\nA: first\nB: sec\nond\nPlease reason step by step.")
    assert q == "Line one\n\nline two?" and opts == [("A", "first"), ("B", "sec\nond")]


def make_problems(n, domain="x"):
    return [Problem(id=f"{domain}-{i}", domain=domain, question=f"q{i}", options=[("A", "a"), ("B", "b")],
                    answer="A") for i in range(n)]


def test_validation_split_is_seeded_and_disjoint():
    problems = make_problems(50)
    train, val = validation_split(problems, 10, seed=3)
    assert len(train) == 40 and len(val) == 10
    assert not {p.id for p in train} & {p.id for p in val}
    assert validation_split(problems, 10, seed=3) == (train, val)
    assert validation_split(problems, 10, seed=4)[1] != val
    with pytest.raises(ValueError, match="validation size"):
        validation_split(problems, 51)


def test_validation_split_by_stratum_holds_each_share():
    problems = make_problems(50)
    kind = {p.id: "rare" if i % 5 == 0 else "usual" for i, p in enumerate(problems)}  # 10 rare, 40 usual
    train, val = validation_split(problems, 12, seed=3, stratum=lambda p: kind[p.id])
    assert len(train) == 38 and not {p.id for p in train} & {p.id for p in val}
    assert sorted(kind[p.id] for p in val).count("rare") == 2   # 12 * 10 / 50 = 2.4
    assert validation_split(problems, 12, seed=3, stratum=lambda p: kind[p.id]) == (train, val)
    assert validation_split(problems, 12, seed=4, stratum=lambda p: kind[p.id])[1] != val


def test_the_demo_validation_split_asks_about_specialist_items_in_their_share():
    """Drawn at random, 6 of the demo's 20 chemistry validation questions were about specialist
    items (one item in five), so a student that knew every common fact could not come within tau
    = 0.2 of a specialist there; the split now keeps each family's common/specialist share."""
    from opcod.config import load_config
    from opcod.domains import load_domains
    from opcod.synthetic import stratum
    for split_seed in (0, 1, 2):
        cfg = load_config(str(Path(__file__).parents[1] / "opcod" / "configs" / "default.yaml"),
                          ["demo=true", f"data.split_seed={split_seed}"])
        train, val, _ = load_domains(cfg)
        for domain, problems in val.items():
            pool = [p for p in train if p.domain == domain] + problems
            want = quotas(Counter(stratum(p) for p in pool), len(problems))
            assert Counter(stratum(p) for p in problems) == {k: n for k, n in want.items() if n}, (domain, split_seed)
            assert sum(not p.meta["common"] for p in problems) == 4


def test_union_and_roundtrip(tmp_path):
    a, b = make_problems(3, "x"), make_problems(2, "y")
    both = union(a, b, seed=0)
    assert sorted(p.id for p in both) == sorted(p.id for p in a + b)
    with pytest.raises(ValueError, match="repeat"):
        union(a, a)
    write_problems(tmp_path / "p.jsonl", both)
    assert read_problems(tmp_path / "p.jsonl") == both


def test_run_seeds_share_the_splits_and_the_demo_students(tmp_path, monkeypatch):
    """`seed` varies training only: every run seed scores the same test split and starts from the
    same demo students, built from data.split_seed (before, seed=1 drew new splits whose test
    questions the cached seed-0 students had been fine-tuned on)."""
    import torch.distributed as dist

    from opcod import demo
    from opcod.config import load_config
    from opcod.domains import load_domains
    from opcod.train import DEFAULT_CONFIG

    def ids(cfg):
        train, val, test = load_domains(cfg)
        return [p.id + p.question for p in train], {d: [p.question for p in v] for d, v in val.items()}, \
            {d: [p.question for p in t] for d, t in test.items()}
    seeds = [load_config(str(DEFAULT_CONFIG), [f"seed={s}"]) for s in (0, 1, 2)]
    assert ids(seeds[0]) == ids(seeds[1]) == ids(seeds[2])
    other = load_config(str(DEFAULT_CONFIG), ["data.split_seed=1"])
    train, _, test = ids(other)
    assert test != ids(seeds[0])[2] and not {q for t in test.values() for q in t} & {t.split("synth-1-", 1)[1]
                                                                                     for t in train}
    # The build: the same records and SFT seeds for every run seed, and a cache of its own per split seed.
    calls = []

    def sft(cfg, log):  # records the stage and leaves an empty model where SFT would save one
        calls.append(cfg)
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output) / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(demo, "run_sft", sft)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        built = {}
        for s in (0, 1):
            monkeypatch.setenv("OPCOD_CACHE", str(tmp_path / f"cache{s}"))
            students = demo.prepare(seeds[s]).students
            assert [st.path for st in students] == [str(demo.cache_dir() / n) for n in ("chem_student", "phys_student")]
            built[s] = {f.name: f.read_bytes() for f in [*demo.cache_dir().glob("*.jsonl"),
                                                         *(demo.cache_dir() / "init").iterdir()]}
        assert built[0] == built[1] and len(built[0]) > 4
        assert len(calls) == 8 and {c.seed for c in calls} == {0}
        assert demo.cache_dir(1).name == f"demo-{demo.VERSION}-split1"
    finally:
        dist.destroy_process_group()
