"""The command lines: options and key=value overrides in any order, --print-config, defaults in
--help, evaluate's choice of questions, the hf-engine warning on a GPU box, no empty run directory
after a refused start, the default config's two copies, the generated configuration page."""
import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ENV

ROOT = Path(__file__).parent.parent


def _parsers():
    """Every command's parser (the commands with verbs are checked through their --help)."""
    from opcod import compare, evaluate, plan, rationales, sft, train
    out = {m.__name__: m.build_parser() for m in (train, plan, sft, evaluate, compare, rationales)}
    return out


def test_options_and_overrides_in_any_order(qwen3_8b, capsys):
    from opcod import plan
    paper = str(ROOT / "configs" / "phys_chem.yaml")
    a = [f"students.0.path={qwen3_8b}", f"students.1.path={qwen3_8b}"]
    assert plan.main(["--config", paper, *a, "--gpu-gib", "141"]) == 0
    first = capsys.readouterr().out
    assert plan.main([a[0], "--config", paper, a[1], "--gpu-gib", "141", "model.micro_batch_size=4"]) == 0
    assert capsys.readouterr().out == first and first.strip().endswith("of 141 GiB")
    from opcod.train import parse_args
    args = parse_args(["rounds=3", "--config", "x.yaml", "optim.lr=1e-5", "--print-config", "seed=2"])
    assert (args.config, args.overrides, args.print_config) == ("x.yaml", ["rounds=3", "optim.lr=1e-5", "seed=2"], True)
    from opcod import analyze
    with pytest.raises(SystemExit):   # verbs: options on either side of the run directories
        analyze.main(["compare", "--out", "x.json", "a", "--help"])
    assert "--out OUT" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "plan", "sft", "evaluate", "compare", "rationales"])
def test_print_config_prints_the_resolved_config_and_exits(command, qwen3_8b, tmp_path, capsys):
    import importlib
    module = importlib.import_module(f"opcod.{command}")
    paper = str(ROOT / "configs" / "phys_chem.yaml")
    argv = {"train": ["rounds=3", "--config", paper, "--print-config", "optim.lr=3e-6"],
            "plan": ["--print-config", "rounds=3", "--config", paper, "optim.lr=3e-6"],
            "sft": ["--config", str(ROOT / "configs" / "sft" / "physics.yaml"), "--print-config", "epochs=3", "lr=3e-6"],
            "evaluate": ["models/x", "--config", paper, "rounds=3", "--print-config", "optim.lr=3e-6"],
            "compare": ["--config", paper, "rounds=3", "--print-config", "optim.lr=3e-6", "--seeds", "4"],
            "rationales": ["--config", paper, "--domain", "physics", "--model", "m", "--out", str(tmp_path / "o.jsonl"),
                           "--print-config", "rounds=3", "optim.lr=3e-6"]}[command]
    assert module.main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    key = "epochs" if command == "sft" else "rounds"
    assert printed[key] == 3 and (printed["lr"] if command == "sft" else printed["optim"]["lr"]) == 3e-6
    if command == "compare":
        assert (printed["seed"], printed["method"], printed["run_name"]) == (4, "opcod", "opcod-seed4")
    assert not (tmp_path / "o.jsonl").exists() and not (ROOT / "runs" / "phys_chem").exists()


def test_every_option_shows_its_default_in_help(capsys):
    from opcod.cli import HelpFormatter
    for name, ap in _parsers().items():
        fmt = HelpFormatter(ap.prog)
        for action in ap._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, (name, action.dest)
            shown = fmt._get_help_string(action)
            if action.default not in (None, False):
                assert "default" in shown, (name, action.dest, shown)
            elif action.default is None and action.type is not None:
                # an option without a value of its own says what it falls back to, or that it is optional
                assert "default" in shown or action.required or action.dest in {"out", "base_url", "config"}, \
                    (name, action.dest)
    from opcod import evaluate
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "samples per problem (avg@k) (default: 16)" in text and "(default: 0.95)" in text
    for module, argv, want in (("opcod.analyze", ["break-rate", "--help"], "rollouts per problem (default: 8)"),
                               ("opcod.data", ["prepare", "--help"], "(default: 100)"),
                               ("opcod.hub", ["download", "--help"], "Hub ids")):
        res = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, env=ENV, cwd=ROOT)
        assert res.returncode == 0 and want in " ".join(res.stdout.split()), (module, res.stdout)


# ----------------------------------------------------------------------------- opcod.evaluate

def test_evaluate_refuses_models_that_are_not_the_demos_without_a_config(tmp_path, monkeypatch, capsys):
    from opcod import evaluate
    from opcod.demo import VERSION
    other = tmp_path / "qwen"
    other.mkdir()
    assert evaluate.main([str(other)]) == 2
    assert "not the demo's students" in capsys.readouterr().err
    # the demo's cached students and a demo run's exports: the demo's questions (then the missing
    # weights of these empty folders are what stops it)
    monkeypatch.setenv("OPCOD_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / f"demo-{VERSION}" / "chem_student"
    run = tmp_path / "runs" / "r"
    exported = run / "students" / "A"
    for d in (cached, exported):
        d.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"demo": True, "data": {"split_seed": 1}}))
    assert evaluate.demo_config([str(cached)]) == str(evaluate.DEFAULT_CONFIG)
    assert evaluate.demo_config([str(exported)]) == str(run / "config.yaml")
    assert evaluate.demo_config([str(cached), str(exported)]) is None   # two demos' questions: say which
    assert evaluate.demo_config([str(cached), str(other)]) is None
    for argv in ([str(cached)], [str(other), "--config", "demo"], [str(other), "--config", str(run / "config.yaml")]):
        assert evaluate.main(argv) == 2
        err = capsys.readouterr().err
        assert "no config.json" in err and "not the demo's" not in err


def test_evaluate_scores_on_a_named_config_with_overrides_and_warns_of_the_cpu_engine_on_a_gpu_box(
        tmp_path, monkeypatch, capsys, tokenizer):
    import torch

    from opcod import cli, evaluate
    from opcod.tiny import create_model_dir, tiny_config
    model = create_model_dir(tmp_path / "m", tokenizer, tiny_config(len(tokenizer), hidden=32, intermediate=64))
    cfg = tmp_path / "data.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"source": "synthetic", "val_size": 2, "synthetic_train": 4,
                                            "synthetic_test": 3}}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(evaluate, "device_of_rank", lambda: torch.device("cpu"))   # only the warning sees a GPU
    assert evaluate.main([str(model), "--k", "1", "--max-new-tokens", "2", "--config", str(cfg),
                          "data.synthetic_test=2", "--out", str(tmp_path / "s.json")]) == 0
    captured = capsys.readouterr()
    assert "engine.kind=hf generates on the CPU although this machine has a GPU" in captured.err
    scores = json.loads((tmp_path / "s.json").read_text())
    assert {d: len(r) for d, r in scores["rewards"][str(model)].items()} == {"chemistry": 2, "physics": 2}
    assert cli.warn_cpu_engine("vllm", "x") is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.warn_cpu_engine("hf", "x") is False


# ----------------------------------------------------------------------------- runs

def test_a_refused_start_leaves_no_run_directory(tmp_path):
    cfg = {"output_dir": str(tmp_path / "runs"), "run_name": "r", "data": {"source": "synthetic"},
           "students": [{"name": "a", "path": str(tmp_path / "none-a")}, {"name": "b", "path": str(tmp_path / "none-b")}]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "opcod.train", "--config", str(path)], capture_output=True, text=True,
                         timeout=300, env=ENV)
    assert res.returncode == 2 and "students.0.path" in res.stderr
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "kept").mkdir(parents=True)   # what was there before stays
    res = subprocess.run([sys.executable, "-m", "opcod.train", "--config", str(path)], capture_output=True, text=True,
                         timeout=300, env=ENV)
    assert res.returncode == 2 and sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["kept"]
    res = subprocess.run([sys.executable, "-m", "opcod.compare", "--config", str(path), "--methods", "sdpo", "--nproc",
                          "1", "--out", str(tmp_path / "compare")], capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode != 0 and "students.0.path" in res.stderr and not (tmp_path / "compare").exists()


def test_validation_plot_has_whole_round_ticks(tmp_path, monkeypatch):
    import matplotlib.figure

    from opcod import report
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    scores = {"a": {"physics": 0.5, "chemistry": 0.25}, "b": {"physics": 0.75, "chemistry": 0.5}}
    rounds = [{"round": r, "validation": scores} for r in (1, 2, 3)]
    report.plot_validation(tmp_path, rounds, scores)
    (fig,) = figures
    for ax in fig.axes:
        assert list(ax.get_xticks()) == [1, 2, 3, 4]


def test_configs_default_yaml_is_the_embedded_default():
    assert filecmp.cmp(ROOT / "configs" / "default.yaml", ROOT / "opcod" / "configs" / "default.yaml", shallow=False)


def test_configuration_page_is_generated_from_the_dataclasses():
    import dataclasses

    from opcod import config
    from opcod.config_doc import field_docs
    res = subprocess.run([sys.executable, "-m", "opcod.config", "--markdown"], capture_output=True, text=True, env=ENV,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout == (ROOT / "docs" / "configuration.md").read_text(), \
        "docs/configuration.md is stale: python -m opcod.config --markdown > docs/configuration.md"
    classes = [c for c in vars(config).values() if dataclasses.is_dataclass(c) and c.__module__ == config.__name__]
    for cls in classes:   # a new key needs a comment in opcod/config.py (or an entry in config_doc.EXTRA)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name) or dataclasses.is_dataclass(getattr(cls(), f.name)) or f.name == "students", \
                (cls.__name__, f.name)
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(getattr(cls(), f.name)) and f.name != "students":
                assert f"`{f.name}`" in res.stdout or f".{f.name}`" in res.stdout, (cls.__name__, f.name)


# ----------------------------------------------------------------------------- house files

def test_citation_names_the_paper_as_its_file_does():
    from conftest import SHARED
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "Apache-2.0" and cff["authors"]
    paper = cff["preferred-citation"]
    assert paper["url"] == "https://arxiv.org/abs/2606.14368"
    source = Path(SHARED) / "reference" / "opcod_paper.md"
    if not source.is_file():
        pytest.skip(f"the paper's text is not at {source}")
    text = source.read_text()
    assert text.startswith(f"Title: {paper['title']}\n")
    for a in paper["authors"]:
        assert f"{a['given-names']} {a['family-names']}" in text.split("###### Abstract")[0]
