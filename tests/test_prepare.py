"""python -m opcod.data prepare: SciKnowEval L3 MCQ in SDPO's split, checked against SDPO's own split files."""
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ENV, SHARED
from opcod.data import DOMAINS, read_problems

ROOT = Path(__file__).parent.parent
SKE = Path(SHARED) / "data" / "sciknoweval"
needs_data = pytest.mark.skipif(not SKE.is_dir(), reason=f"SciKnowEval copy not found at {SKE}")


def _run(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env or ENV, cwd=ROOT)


def _sha(ids) -> str:
    return hashlib.sha256("".join(i + "\n" for i in ids).encode()).hexdigest()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("ske") / "sciknoweval"
    res = _run("-m", "opcod.data", "prepare", SKE, out) if SKE.is_dir() else None
    return out, res


@needs_data
def test_prepare_writes_sdpos_split_with_the_trainers_validation(prepared):
    """Counts and id digests of every split against SDPO's own split files, read here directly:
    test is SDPO's test in its order; train + validation is SDPO's train, validation being the
    carve-out the trainer makes (100 problems drawn by random.Random(0), kept in train's order)."""
    out, res = prepared
    assert res.returncode == 0, res.stderr
    for domain in DOMAINS:
        sdpo = {split: [json.loads(line) for line in (SKE / "sdpo_splits" / domain / f"{split}.json").open()]
                for split in ("train", "test")}
        got = {split: [json.loads(line) for line in (out / domain / f"{split}.jsonl").open()]
               for split in ("train", "validation", "test")}
        train_ids = [f"{domain}-{r['idx']}" for r in sdpo["train"]]
        test_ids = [f"{domain}-{r['idx']}" for r in sdpo["test"]]
        order = list(range(len(train_ids)))
        random.Random(0).shuffle(order)
        held = set(order[:100])
        want = {"train": [i for j, i in enumerate(train_ids) if j not in held],
                "validation": [train_ids[j] for j in sorted(held)], "test": test_ids}
        for split, records in got.items():
            assert _sha(r["id"] for r in records) == _sha(want[split]), (domain, split)
            # the same line in the summary it prints and in prepare.json
            digest = json.loads((out / "prepare.json").read_text())["domains"][domain][split]["ids_sha256"]
            assert digest == _sha(want[split]) and digest[:12] in res.stdout
        # SDPO's answers and prompts, problem by problem
        by_id = {f"{domain}-{r['idx']}": r for r in sdpo["train"] + sdpo["test"]}
        for problem in (read_problems(out / domain / "test.jsonl") + read_problems(out / domain / "train.jsonl")):
            assert (problem.prompt, problem.answer) == (by_id[problem.id]["prompt"], by_id[problem.id]["answer"])
    counts = {d: [len((out / d / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "validation", "test")]
              for d in DOMAINS}
    assert counts == {"chemistry": [1790, 100, 210], "physics": [620, 100, 80], "material": [741, 100, 94],
                      "biology": [350, 100, 50]}
    assert "chemistry        1790        100        210" in res.stdout


@needs_data
def test_prepared_folder_trains_on_the_same_problems_as_the_raw_files(prepared):
    from opcod.config import ConfigError, load_config
    from opcod.domains import load_domains
    out, _ = prepared
    for source, path in (("sciknoweval", out), ("jsonl", out), ("sciknoweval", SKE / "raw_data")):
        cfg = load_config(overrides=["demo=true", f"data.source={source}", f"data.path={path}",
                                     "data.domains=[physics,material]", "data.val_size=100"])
        train, val, test = load_domains(cfg)
        if path == out:
            first = (train, val, test)
        else:
            assert (train, val, test) == first
    # a config that asks for another carve-out than the one prepared is refused, by key
    for bad, key in (("data.val_size=50", "data.val_size"), ("data.split_seed=1", "data.split_seed")):
        cfg = load_config(overrides=["demo=true", "data.source=sciknoweval", f"data.path={out}", "data.val_size=100",
                                     bad])
        with pytest.raises(ConfigError, match=key):
            load_domains(cfg)


@needs_data
def test_prepare_refuses_unknown_layouts_and_never_overwrites_other_problems(tmp_path, prepared):
    res = _run("-m", "opcod.data", "prepare", tmp_path, tmp_path / "out")
    assert res.returncode == 2
    assert str(tmp_path / "raw_data" / "Chemistry" / "L3" / "molecule_structure_prediction.jsonl") in res.stderr
    assert not (tmp_path / "out").exists()
    # a clone missing one task file: that file is named
    clone = tmp_path / "clone" / "raw_data"
    (clone / "Material" / "L3").mkdir(parents=True)
    for d in ("Physics", "Chemistry"):
        (clone / d).symlink_to(SKE / "raw_data" / d)
    res = _run("-m", "opcod.data", "prepare", clone.parent, tmp_path / "out2", "--domains", "physics", "material")
    assert res.returncode == 2 and "Material/L3/diffusion_rate_analysis.jsonl" in res.stderr
    # SDPO's split files as the source give the same files; another --val-size is refused unless asked
    out, _ = prepared
    again = tmp_path / "again"
    assert _run("-m", "opcod.data", "prepare", SKE / "sdpo_splits", again, "--domains", "physics").returncode == 0
    assert [p.id for p in read_problems(again / "physics" / "validation.jsonl")] == \
        [p.id for p in read_problems(out / "physics" / "validation.jsonl")]
    before = (again / "physics" / "train.jsonl").read_bytes()
    res = _run("-m", "opcod.data", "prepare", "--val-size", "10", SKE / "sdpo_splits", again, "--domains", "physics")
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert (again / "physics" / "train.jsonl").read_bytes() == before
    res = _run("-m", "opcod.data", "prepare", SKE / "sdpo_splits", again, "--val-size", "10", "--overwrite",
               "--domains", "physics")
    assert res.returncode == 0 and len(read_problems(again / "physics" / "validation.jsonl")) == 10


def test_prepare_from_a_hub_dataset_without_datasets_names_the_extra(tmp_path):
    # datasets may be installed here (TRL, in the test extra, pulls it in): hide it as if it were not.
    code = ("import sys; sys.modules['datasets'] = None; from opcod.data import main; "
            f"sys.exit(main(['prepare', 'hicai-zju/SciKnowEval', {str(tmp_path / 'out')!r}]))")
    res = _run("-c", code)
    assert res.returncode == 2 and "opcod[data]" in res.stderr, res.stderr[-2000:]
