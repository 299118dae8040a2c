"""The trainer: config errors, bad inputs, FSDP gradients, weight sync, the step's prompts, a
2-process run with every artifact, and resume after SIGKILL. Multi-process parts use torchrun."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from opcod import synthetic
from opcod.config import ConfigError, load_config
from opcod.demo import readme_machine
from opcod.feedback import OutcomeCounts
from opcod.step import Rollout, request_feedback, self_anchors, teacher_contexts

HERE = Path(__file__).parent
from conftest import DEMO_SHORT, ENV, torchrun, two_launchers


@pytest.fixture(scope="session")
def tiny_students(tmp_path_factory):
    """Two randomly initialised tiny students sharing one tokenizer, and a small config for them."""
    from opcod import prompts
    from opcod.tiny import build_tokenizer, create_model_dir, tiny_config
    root = tmp_path_factory.mktemp("tiny")
    corpus = []
    for d in synthetic.SYNTHETIC_DOMAINS:
        for p in synthetic.generate(d, 60, seed=0):
            corpus += [prompts.SYSTEM_PROMPT, p.prompt, p.solution, p.meta["feedback"]]
    tok = build_tokenizer(corpus * 2, vocab_size=400)
    for name, seed in (("A", 1), ("B", 2)):
        create_model_dir(root / name, tok, tiny_config(len(tok), hidden=32, intermediate=64), seed=seed)
    cfg = {"rounds": 1, "steps_per_phase": 2, "prompts_per_step": 4, "rollouts_per_prompt": 2,
           "output_dir": str(root / "runs"), "run_name": "tiny", "eval_k": 1, "val_k": 1,
           "students": [{"name": "A", "path": str(root / "A")}, {"name": "B", "path": str(root / "B")}],
           "data": {"source": "synthetic", "val_size": 4, "synthetic_train": 12, "synthetic_test": 4},
           "rollout": {"max_new_tokens": 8}, "evaluation": {"max_new_tokens": 8},
           "feedback": {"max_new_tokens": 8}}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return root, path


# ----------------------------------------------------------------------------- config and inputs

def test_config_overrides_and_errors(tmp_path):
    cfg = load_config(overrides=["demo=true", "optim.lr=3e-5", "rounds=3", "loss.teacher_weights=ema"])
    assert (cfg.optim.lr, cfg.rounds, cfg.loss.teacher_weights) == (3e-5, 3, "ema")
    for bad, name in [("nope=1", "nope"), ("optim.nope=1", "optim.nope"), ("rounds=x", "rounds"),
                      ("tau=-0.5", "tau"), ("gate=sometimes", "gate"), ("method=ppo", "method")]:
        with pytest.raises(ConfigError, match=name):
            load_config(overrides=["demo=true", bad])
    f = tmp_path / "c.yaml"
    f.write_text("rounds: 2\nstudents: [{name: a, path: x, colour: red}]\n")
    with pytest.raises(ConfigError, match="students.0.colour"):
        load_config(str(f))
    with pytest.raises(ConfigError, match="at least two students"):
        load_config(overrides=[])


def test_the_trainer_gates_domain_selective_on_each_students_configured_domain(tmp_path):
    """CoDistillation.stronger, which the step's gate and summary.json's rounds read: the domain
    StudentConfig.domain names, the validation argmax only for a student without one. Guards against
    StudentConfig.domain being read nowhere (it was "for tables only")."""
    from types import SimpleNamespace

    from opcod.train import CoDistillation
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"gate": "domain_selective", "data": {"domains": ["chemistry", "physics"]},
                                 "students": [{"name": "chem", "path": "x", "domain": "chemistry"},
                                              {"name": "other", "path": "y"}]}))
    cfg = load_config(str(f))
    validation = {"chem": {"chemistry": 0.5, "physics": 0.7}, "other": {"chemistry": 0.6, "physics": 0.6}}
    run = SimpleNamespace(cfg=cfg, progress=SimpleNamespace(validation=validation))
    assert CoDistillation.stronger(run) == {"chem": {"domains": ["chemistry"], "from": "config"},
                                            "other": {"domains": ["chemistry"], "from": "validation"}}
    f.write_text(f.read_text().replace("domain: chemistry", "domain: geology"))
    with pytest.raises(ConfigError, match="students.0.domain"):
        load_config(str(f))


def _cli(tmp_path, cfg_dict, *extra):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg_dict))
    return subprocess.run([sys.executable, "-m", "opcod.train", "--config", str(path), *extra],
                          capture_output=True, text=True, timeout=300, env=ENV)


def test_cli_rejects_bad_inputs_by_name(tiny_students, tmp_path):
    root, cfg_path = tiny_students
    base = yaml.safe_load(cfg_path.read_text())
    base["output_dir"] = str(tmp_path / "runs")
    res = _cli(tmp_path, base, "learning_rate=1")
    assert res.returncode == 2 and "unknown config key 'learning_rate'" in res.stderr
    missing = {**base, "students": [{"name": "A", "path": str(tmp_path / "nowhere")}, base["students"][1]]}
    res = _cli(tmp_path, missing)
    assert res.returncode == 2 and "students.0.path" in res.stderr and "does not exist" in res.stderr
    # a tokenizer without a chat template
    bare = tmp_path / "bare"
    subprocess.run(["cp", "-r", str(root / "A"), str(bare)], check=True)
    tc = json.loads((bare / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tc))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    res = _cli(tmp_path, {**base, "students": [{"name": "A", "path": str(bare)}, base["students"][1]]})
    assert res.returncode == 2 and "chat template" in res.stderr and "students.0.path" in res.stderr
    res = _cli(tmp_path, {**base, "data": {**base["data"], "domains": ["geology"]}})
    assert res.returncode == 2 and "geology" in res.stderr
    assert not (tmp_path / "runs" / "tiny" / "metrics.jsonl").exists()  # nothing ran


# ----------------------------------------------------------------------------- the step

@pytest.mark.parametrize("args", [["--normalize", "token"], ["--ac", "--normalize", "sequence"],
                                  ["--ac", "--own-head", "--normalize", "sequence"]],
                         ids=["token", "sequence-checkpointing", "sequence-checkpointing-teacher-head"])
def test_fsdp_distillation_gradients_match_float64_reference(args):
    """Over 2 ranks and micro-batches with sequences of different lengths: the token mean or each
    sequence's token mean averaged over all sequences; checkpointing really recomputing layers
    (guards against model.activation_checkpointing silently doing nothing: the recompute is counted
    in every case, with or without a separate teacher); an EMA-like teacher scoring with its own
    lm_head."""
    res = torchrun(HERE / "dist" / "check_distill_fsdp.py", *args)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "worst grad rel err" in res.stdout


def test_ema_update_by_hand():
    """loss.teacher_weights=ema: teacher <- 0.95 teacher + 0.05 student on every trained parameter
    (SDPO's dp_actor._update_teacher), by hand on numbers: 1 -> 0.95 * 1 + 0.05 * 3 = 1.1. Guards
    against the rate applied the other way round (0.05 teacher + 0.95 student = 2.9) and against
    frozen parameters moving."""
    from opcod.models import ema_update
    teacher, student = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        teacher.weight.fill_(1.0), teacher.bias.fill_(-1.0)
        student.weight.fill_(3.0), student.bias.fill_(5.0)
    student.bias.requires_grad_(False)            # as a LoRA student's frozen base
    ema_update(teacher, student, 0.05)
    assert torch.allclose(teacher.weight, torch.full((2, 2), 1.1))
    assert torch.equal(teacher.bias, torch.full((2,), -1.0))
    assert torch.equal(student.weight, torch.full((2, 2), 3.0))   # the student is untouched


@pytest.mark.parametrize("args", [[], ["--lora"]], ids=["full", "lora"])
def test_fsdp_ema_teacher_follows_sdpos_update_over_steps(args):
    """Under FSDP2 on 2 ranks, after real optimizer steps: every shard of the teacher follows SDPO's
    update, step by step and in closed form over three steps (tests/dist/check_ema.py), with LoRA on
    the adapters. Guards against an update that misses a rank's shard or inverts the rate (a frozen
    parameter moving: test_ema_update_by_hand, since a LoRA base equals the teacher's anyway)."""
    res = torchrun(HERE / "dist" / "check_ema.py", *args)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "closed-form rel err" in res.stdout


@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_engine_weights_equal_trainer_weights_after_sync(tiny_students, mode):
    _, cfg_path = tiny_students
    res = torchrun(HERE / "dist" / "check_sync.py", cfg_path, f"engine.tutor={mode}", "engine.bucket_mb=0")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert f"sync ok ({mode} engines" in res.stdout


def test_feedback_gate_and_teacher_prompt(tokenizer):
    problem = synthetic.generate("chemistry", 1, seed=3)[0]
    ids = [1, 2, 3]
    good = Rollout(problem, ids, [4], problem.solution, 1.0)
    bad = Rollout(problem, ids, [5], "<answer>Z</answer>", 0.0)
    group = [bad, good]
    self_anchors(group, allow_self=False)
    assert bad.solution == problem.solution and good.solution is None  # only *other* correct rollouts
    asked = []

    def tutor(prompts_):
        asked.extend(prompts_)
        return [tokenizer.encode(problem.meta["feedback"] + " The answer is (B).")] * len(prompts_)

    closed = request_feedback(group, lambda r: False, tutor, tokenizer)
    assert closed.total() == 0 and not asked and bad.feedback is None
    opened = request_feedback(group, lambda r: True, tutor, tokenizer)
    assert opened.as_dict()["kept"] == 2 and len(asked) == 2
    teacher_contexts(group, tokenizer, 64, 64)
    text = tokenizer.decode(bad.teacher_prompt_ids)
    critique = problem.meta["feedback"].split("</concept>")[1].strip()
    assert "The following is feedback on your earlier attempt:" in text and critique[:30] in text
    assert "The answer is (B)" not in text and "<concept>" not in text
    assert "Correct solution:" in text and "Correctly solve the original question." in text
    alone = Rollout(problem, ids, [6], "x", 0.0)
    teacher_contexts([alone], tokenizer, 64, 64)
    assert alone.teacher_prompt_ids is None  # neither solution nor feedback: no teacher
    assert isinstance(closed, OutcomeCounts)


# ----------------------------------------------------------------------------- whole runs

def test_self_distillation_metrics_mean_what_sdpos_trainer_means(tokenizer):
    """success_sample_fraction is the share of samples with a solution in the teacher's context
    (lasgroup/SDPO verl/trainer/ppo/ray_trainer.py: num_with_solution / batch_size), written out
    here from the rewards alone as SDPO's _get_solution does with dont_reprompt_on_self_success.
    Guards against the defect it had: the share of correct samples under SDPO's name (3/12 here)."""
    from opcod.step import sdpo_counts, sdpo_fractions
    problem = synthetic.generate("chemistry", 1, seed=3)[0]
    n, rewards = 4, [1, 0, 0, 0,   0, 0, 0, 0,   1, 1, 0, 0]
    rollouts = [Rollout(problem, [1], [2 + j], f"r{j}", float(x)) for j, x in enumerate(rewards)]
    for g in range(0, len(rollouts), n):
        self_anchors(rollouts[g:g + n], allow_self=False)
    rollouts[5].feedback = "Check the group of the element."   # feedback on a rollout with no solution
    rollouts[9].feedback = "Check the period."                 # and on one with a solution
    teacher_contexts(rollouts, tokenizer, 64, 64)

    def sdpo_has_solution(i):   # SDPO: success_by_uid[uid] minus the sample itself, non-empty
        g = i // n * n
        return any(rewards[j] >= 0.5 and j != i for j in range(g, g + n))
    with_solution = sum(sdpo_has_solution(i) for i in range(len(rewards)))
    assert with_solution == 3 + 0 + 4   # by hand: the lone success has none; a pair anchor each other
    m = sdpo_fractions(sdpo_counts(rollouts, n))
    assert m["self_distillation/success_sample_fraction"] == 7 / 12 != sum(rewards) / 12
    assert m["self_distillation/success_group_fraction"] == 2 / 3
    assert m["self_distillation/feedback_used_fraction"] == 2 / 12
    assert m["self_distillation/reprompt_sample_fraction"] == (7 + 1) / 12   # solution or feedback


def test_two_process_default_run_writes_every_artifact(demo_run, demo_env):
    run_dir, res = demo_run
    assert "mutual Pareto improvement:" in res.stdout and "feedback outcomes:" in res.stdout
    assert "[95 % interval]" in res.stdout
    # CI builds the demo students afresh on its own machine (a developer's OPCOD_TEST_CACHE holds a
    # build of theirs): on an Intel CPU with AVX2 they are the README's, bit for bit; elsewhere the
    # run says they are not and why (MKL's GEMMs take other paths on other vendors).
    line = next((x for x in res.stdout.splitlines() if x.startswith("demo students: ")), None)
    assert line is not None, res.stdout[-3000:]
    if readme_machine():
        assert line.startswith("demo students: bit-identical to the README's"), line
    else:
        assert line.startswith("demo students: not the README's, bit for bit") and "Intel CPU" in line, line
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["rounds"] == 2 and cfg["method"] == "opcod" and len(cfg["students"]) == 2
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["kind"] == "step"]
    assert len(steps) == 2 * 2 * 2 and [s["step"] for s in steps] == list(range(1, 9))
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/lr", "critic/rewards/mean", "response_length/mean",
                "response_length/max", "response_length/clip_ratio", "timing_s/gen", "timing_s/update_actor",
                "timing_s/update_weights", "timing_s/step", "perf/throughput",
                "self_distillation/success_sample_fraction", "self_distillation/feedback_used_fraction",
                "self_distillation/reprompt_sample_fraction", "opcod/gate_open", "opcod/feedback/kept"):
        assert key in steps[0], key
    assert all(s["response_length/max"] <= 160 and s["response_length/mean"] <= s["response_length/max"]
               for s in steps)
    assert any(s["actor/pg_loss"] > 0 for s in steps)
    assert any(s["self_distillation/reprompt_sample_fraction"] > 0 for s in steps)
    # The default measures the feedback's effect each step: every kept-feedback rollout re-answered
    # in each arm, and nothing else.
    for s in steps:
        assert s["opcod/effects/correct"] + s["opcod/effects/wrong"] == s["opcod/feedback/kept"]
        for arm in ("feedback", "solution", "nothing"):
            assert 0 <= s[f"opcod/effects/{arm}/broken"] <= s["opcod/effects/correct"]
            assert 0 <= s[f"opcod/effects/{arm}/fixed"] <= s["opcod/effects/wrong"]
    assert any(s["opcod/feedback/kept"] > 0 for s in steps)
    scores = [x for x in lines if x["kind"] == "test"]
    assert set(scores[0]) >= {f"val-core/{n}/{d}/acc/mean@2" for n in ("chem_student", "phys_student")
                              for d in ("chemistry", "physics")}
    assert {x["kind"] for x in lines} == {"test", "validation", "step"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) == {"students", "mutual_pareto_improvement", "rounds", "feedback_outcomes", "config"}
    for name, s in summary["students"].items():
        assert set(s) == {"initial", "final", "pareto_improved", "intervals_95"}
        assert set(s["initial"]) == {"chemistry", "physics"}
        for d, ci in s["intervals_95"].items():  # each interval holds its point estimate
            assert ci["initial"][0] <= s["initial"][d] <= ci["initial"][1]
            assert ci["final"][0] <= s["final"][d] <= ci["final"][1]
            assert ci["change"][0] <= s["final"][d] - s["initial"][d] <= ci["change"][1]
        assert (run_dir / "students" / name / "model.safetensors").is_file()
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert set(summary["rounds"][0]) == {"round", "validation", "gaps", "cognizant", "stronger_domains"}
    # the demo's students are built for one domain each, and the config says which
    assert {n: v["from"] for n, v in summary["rounds"][0]["stronger_domains"].items()} == \
        {n: "config" for n in summary["students"]}
    assert set(summary["feedback_outcomes"]) == {"kept", "no_match", "no_concept_tag", "empty", "all_generic",
                                                 "no_critique", "sanitized_empty"}
    assert (run_dir / "validation.png").stat().st_size > 1000
    assert (run_dir / "checkpoints" / "latest").is_file()
    # exported students load with transformers, tokenizer and chat template included
    from transformers import AutoModelForCausalLM, AutoTokenizer
    name = next(iter(summary["students"]))
    model = AutoModelForCausalLM.from_pretrained(run_dir / "students" / name)
    tok = AutoTokenizer.from_pretrained(run_dir / "students" / name)
    assert tok.chat_template and model.config.model_type == "qwen3"
    # a finished run exits at once
    again = torchrun("-m", "opcod.train", f"output_dir={run_dir.parent}", "run_name=full", *DEMO_SHORT,
                     env=demo_env)
    assert again.returncode == 0 and "finished already" in again.stdout


def _weights(run_dir):
    from safetensors.torch import load_file
    return {n: load_file(run_dir / "students" / n / "model.safetensors")
            for n in sorted(os.listdir(run_dir / "students"))}


def test_the_default_run_prints_the_readmes_table(demo_env, tmp_path):
    """What a fresh clone's first command prints is the table README.md shows, to the last digit on
    an Intel CPU with AVX2 (where the README's students come out bit for bit), its shape elsewhere:
    in CI, on students built on CI's machine (a developer's OPCOD_TEST_CACHE may hold theirs)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    head = "student                                            chemistry"
    block = readme[readme.index("```\n" + head) + 4:]
    expected = block[:block.index("```")].splitlines()
    res = torchrun("-m", "opcod.train", f"output_dir={tmp_path}", env=demo_env, timeout=3000)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert expected[0] in lines, res.stdout[-3000:]
    start = lines.index(expected[0])
    printed = lines[start:start + len(expected)]
    if readme_machine():  # the README's students: its table to the last digit
        assert printed == expected, "\n".join(printed)
    else:  # other students (docs/demo.md): the table's shape, row by row
        def shape(line):  # numbers, verdicts and spacing blanked out
            line = re.sub(r"[-+]?\d+(\.\d+)?", "#", line)
            return re.sub(r"\s+", "", re.sub(r"\b(yes|no|cognizant|incognizant)\b", "?", line))
        assert [shape(x) for x in printed] == [shape(x) for x in expected], "\n".join(printed)


def _steps_logged(metrics: Path) -> int:
    return sum('"kind": "step"' in x for x in metrics.read_text().splitlines()) if metrics.exists() else 0


def _wait_for_steps(metrics: Path, n: int, proc, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while _steps_logged(metrics) < n and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d))
            except OSError:
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill_the_tree(proc) -> None:
    """SIGKILL torchrun and its workers at once, as a lost node would, and return once none runs.
    torchrun starts each worker in a session of its own, so killing the launcher's process group
    leaves them alive until their launcher watch stops them: up to a second in which they could
    still finish the checkpoint being written, after the test looked for the last whole one."""
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    for group in (proc.pid, *workers):
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + 30
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.01)
    assert not any(_alive(w) for w in workers), "a worker outlived SIGKILL by 30 s"


def _rerun_matches_the_uninterrupted_run(cmd, demo_env, full_dir, run_dir, note, cwd=None):
    from opcod import checkpoint
    # A kill inside the first checkpoint's write leaves none whole: the rerun must start afresh then.
    last = checkpoint.latest(run_dir / "checkpoints")
    res = subprocess.run(cmd, capture_output=True, text=True, env=demo_env, timeout=900, cwd=cwd)
    assert res.returncode == 0, note + res.stdout[-2000:] + res.stderr[-3000:]
    if last is None:
        assert "resumed from" not in res.stdout, note + "no whole checkpoint was left"
    else:
        assert f"resumed from {last} " in res.stdout, note + res.stdout[-2000:]
    a, b = _weights(full_dir), _weights(run_dir)
    assert a.keys() == b.keys()
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (note, name, key)
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"kind": "step"' in x]
    assert [s["step"] for s in steps] == list(range(1, 9)), note  # no step logged twice
    return res


def test_sigkill_of_the_whole_tree_at_a_random_point_resumes_bit_identically(demo_run, demo_env):
    import random
    full_dir, _ = demo_run
    out = full_dir.parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "opcod.train",
           f"output_dir={out}", "run_name=killed", *DEMO_SHORT]
    rng = random.Random()
    after, delay = rng.randint(1, 7), rng.uniform(0.0, 1.5)  # inside a phase, mid-step or mid-checkpoint
    note = f"killed after {after} steps + {delay:.2f} s: "
    log = open(out / "killed.log", "w")
    # Started outside the checkout (the full run started from its root): the same weights either way.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=demo_env, start_new_session=True,
                            cwd=out)
    metrics = out / "killed" / "metrics.jsonl"
    _wait_for_steps(metrics, after, proc)
    assert _steps_logged(metrics) >= after, note + (out / "killed.log").read_text()[-3000:]
    time.sleep(delay)
    _kill_the_tree(proc)
    assert not (out / "killed" / "summary.json").exists(), note
    _rerun_matches_the_uninterrupted_run(cmd, demo_env, full_dir, out / "killed", note, cwd=out)


def test_a_killed_launcher_leaves_no_writer_and_one_writer_at_a_time(demo_run, demo_env):
    """SIGKILL to torchrun alone: its workers stop within seconds (before, they ran on and wrote
    checkpoints beside a rerun). While a run writes, a second launcher on its directory is refused.
    This run leaves out the feedback-effects diagnostic that the full run measured: the weights
    must still come out bit-identical (the diagnostic's generations draw on no shared randomness)."""
    full_dir, _ = demo_run
    out = full_dir.parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "opcod.train", f"output_dir={out}", "run_name=orphaned", *DEMO_SHORT,
           "logging.feedback_effects=false"]  # --standalone: two launchers at once
    log = open(out / "orphaned.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=demo_env, start_new_session=True)
    try:
        metrics = out / "orphaned" / "metrics.jsonl"
        _wait_for_steps(metrics, 2, proc)
        assert _steps_logged(metrics) >= 2, (out / "orphaned.log").read_text()[-3000:]
        second = subprocess.run(cmd, capture_output=True, text=True, env=demo_env, timeout=300)
        # torchrun exits 1 when a worker fails; the worker said why.
        assert second.returncode != 0 and "is being written by another run: pid" in second.stderr, \
            second.stderr[-3000:]
        workers = _children(proc.pid)
        assert len(workers) == 2
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only
        killed_at = time.time()
        while any(_alive(w) for w in workers) and time.time() - killed_at < 30:
            time.sleep(0.1)
        lived = time.time() - killed_at
        assert lived < 5, f"workers outlived their launcher by {lived:.1f} s"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _rerun_matches_the_uninterrupted_run(cmd, demo_env, full_dir, out / "orphaned", "launcher killed: ")
    steps = [json.loads(x) for x in (out / "orphaned" / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    assert not any("opcod/effects/correct" in s for s in steps)


def test_a_finished_run_is_reused_only_under_the_same_config(demo_run, demo_env):
    run_dir, _ = demo_run
    base = ["-m", "opcod.train", f"output_dir={run_dir.parent}", "run_name=full", *DEMO_SHORT]
    res = torchrun(*base, "optim.lr=1e-3", env=demo_env)
    assert res.returncode != 0 and "optim.lr: 5e-05 -> 0.001" in res.stderr and "run_name=" in res.stderr
    assert "finished already" not in res.stdout
    res = torchrun(*base, "save_every=2", env=demo_env)   # the later override wins
    assert res.returncode != 0 and "save_every: 1 -> 2" in res.stderr and "resume=force" in res.stderr
    res = torchrun(*base, "save_every=2", "resume=force", env=demo_env)
    assert res.returncode == 0 and "finished already" in res.stdout


def test_two_process_grpo_run_reported_to_tensorboard_and_wandb(tiny_students, tmp_path):
    from test_trackers import tensorboard_scalars, wandb_history
    _, cfg_path = tiny_students
    res = torchrun("-m", "opcod.train", "--config", cfg_path, "method=grpo", "run_name=grpo",
                   "logging.report_to=[jsonl,tensorboard,wandb]", env={**ENV, "WANDB_MODE": "offline"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    run_dir = Path(yaml.safe_load(cfg_path.read_text())["output_dir"]) / "grpo"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["students"]) == {"A", "B"} and summary["feedback_outcomes"]["kept"] == 0
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    # both trackers hold the numbers metrics.jsonl holds, at the same steps
    steps = [s for s in steps if s["kind"] == "step"]
    tb = tensorboard_scalars(run_dir)
    rows = [r for r in wandb_history(run_dir) if "timing_s/step" in r]
    for key in ("timing_s/step", "actor/pg_loss", "response_length/mean"):
        assert [x[0] for x in tb[key]] == [s["step"] for s in steps] == [r["_step"] for r in rows]
        assert [x[1] for x in tb[key]] == pytest.approx([s[key] for s in steps], rel=1e-6)   # float32 there
        assert [r[key] for r in rows] == [s[key] for s in steps]
    assert all(s["self_distillation/reprompt_sample_fraction"] == 0 and not s["opcod/gate_open"]
               for s in steps if s["kind"] == "step")


def test_two_process_sdpo_run_with_ema_teacher_and_topk(tiny_students):
    """SDPO's recipe pieces in one short run, on LoRA students: an EMA teacher (a sharded copy with
    adapters of its own: deepcopy of an FSDP2 module is refused) with its own head, top-k
    distillation with a tail, sequence normalisation."""
    _, cfg_path = tiny_students
    res = torchrun("-m", "opcod.train", "--config", cfg_path, "method=sdpo", "run_name=sdpo_ema",
                   "loss.teacher_weights=ema", "loss.topk=20", "loss.normalize=sequence", "model.lora.rank=4")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    run_dir = Path(yaml.safe_load(cfg_path.read_text())["output_dir"]) / "sdpo_ema"
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"kind": "step"' in x]
    assert steps and all(not s["opcod/gate_open"] for s in steps)


@pytest.mark.parametrize("recipe", ["sdpo", "grpo", "opcod"])
def test_sdpo_recipe_configs_run_on_the_demo_students(demo_run, demo_env, recipe, tmp_path):
    """configs/sdpo_recipe/ as a user points it at other students (here the demo's, on the
    synthetic data, short): SDPO's EMA teacher with top-100 + tail, its GRPO's mini-batch updates."""
    from opcod.demo import VERSION
    cache = Path(demo_env["OPCOD_CACHE"]) / f"demo-{VERSION}"
    res = torchrun("-m", "opcod.train", "--config", HERE.parent / "configs" / "sdpo_recipe" / f"{recipe}.yaml",
                   f"students.0.path={cache / 'phys_student'}", f"students.1.path={cache / 'chem_student'}",
                   "data.source=synthetic", "data.val_size=4", "data.synthetic_train=16",
                   "data.synthetic_test=4", "rounds=1", "steps_per_phase=1", "prompts_per_step=4",
                   "rollouts_per_prompt=2", "eval_k=1", "val_k=1", "save_every=0", "rollout.max_new_tokens=160",
                   "evaluation.max_new_tokens=160", "feedback.max_new_tokens=64", "engine.kind=hf",
                   "engine.max_model_len=0", f"output_dir={tmp_path}", env=demo_env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    run_dir = tmp_path / f"sdpo_recipe_{recipe}"
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"kind": "step"' in x]
    assert len(steps) == 2 and json.loads((run_dir / "summary.json").read_text())["students"]
    if recipe == "grpo":   # 2 prompts per rank in SDPO's 4 mini-batches: 2 updates per step
        assert cfg["loss"]["grpo_mini_batches"] == 4 and all(s["opcod/optimizer_updates"] == 2 for s in steps)
    else:
        assert (cfg["loss"]["teacher_weights"], cfg["loss"]["topk"], cfg["loss"]["normalize"]) == \
            ("ema", 100, "sequence")
        assert all(s["opcod/optimizer_updates"] == 1 and s["actor/pg_loss"] > 0 for s in steps
                   if s["self_distillation/reprompt_sample_fraction"] > 0)


def test_two_launchers_on_one_machine_run_what_one_launcher_runs(tiny_students, tmp_path):
    """torchrun --nnodes=2 (one launcher per "node", rendezvous on 127.0.0.1) gives the summary of the
    one-node, two-process run: the multi-host path, short of a second host."""
    _, cfg_path = tiny_students
    args = ["-m", "opcod.train", "--config", str(cfg_path), "method=sdpo", f"output_dir={tmp_path}"]
    one = torchrun(*args, "run_name=one")
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    two = two_launchers(*args, "run_name=two")
    assert all(rc == 0 for rc, _ in two), two[0][1][-2000:] + two[1][1][-2000:]
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two")]
    assert summaries[0] == summaries[1]


def test_compare_runs_three_methods_from_the_same_students_and_reuses_them(tiny_students, tmp_path):
    """opcod.compare: OPCoD, SDPO and GRPO runs, one table with every method and the Fig. 7 plot;
    run again, it reuses the finished runs (opcod.train checks their configs) and prints the same."""
    _, cfg_path = tiny_students
    cmd = [sys.executable, "-m", "opcod.compare", "--config", str(cfg_path), "--out", str(tmp_path), "--seeds", "0"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    table = (tmp_path / "comparison.txt").read_text()
    for method in ("opcod", "sdpo", "grpo"):
        summary = json.loads((tmp_path / f"{method}-seed0" / "summary.json").read_text())
        cfg = yaml.safe_load((tmp_path / f"{method}-seed0" / "config.yaml").read_text())
        assert cfg["method"] == method and cfg["seed"] == 0
        assert f"{method}: mutual Pareto improvement: seed 0 " in table
        blocks = {b.split(" ", 1)[0]: b for b in table.split("\n\n")[:2]}  # one block per student
        for name in ("A", "B"):  # every method's row, with its own final scores
            row = next(x for x in blocks[name].splitlines() if x.startswith(f"{method:<7}    0 "))
            assert f"-> {100 * summary['students'][name]['final']['chemistry']:5.1f}" in row
    assert (tmp_path / "comparison.png").stat().st_size > 10_000
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert again.returncode == 0 and again.stdout.count("is finished already") == 3, again.stdout[-2000:]
    assert (tmp_path / "comparison.txt").read_text() == table
    bad = subprocess.run([*cmd, "seed=3"], capture_output=True, text=True, timeout=60, env=ENV)
    assert bad.returncode == 2 and "'seed=3'" in bad.stderr


def test_lora_run_on_the_demo_changes_only_adapters_and_exports_merged_and_peft(demo_run, demo_env, tmp_path):
    """model.lora through PEFT on the demo students, the initial teacher being the student with its
    adapters off: the merged export equals base + adapter as PEFT itself merges it, and every weight
    outside the adapted projections is the initial student's, bit for bit."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from opcod.demo import VERSION
    cache = Path(demo_env["OPCOD_CACHE"]) / f"demo-{VERSION}"
    res = torchrun("-m", "opcod.train", f"output_dir={tmp_path}", "run_name=lora", "rounds=1", "steps_per_phase=2",
                   "prompts_per_step=4", "rollouts_per_prompt=4", "eval_k=1", "val_k=1", "model.lora.rank=8",
                   "model.lora.alpha=16", "optim.lr=1e-3", "loss.teacher_weights=initial", "data.test_size=8",
                   env=demo_env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    steps = [json.loads(x) for x in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()
             if '"kind": "step"' in x]
    assert any(s["opcod/optimizer_updates"] for s in steps)
    for name in ("chem_student", "phys_student"):
        out = tmp_path / "lora" / "students" / name
        initial = load_file(cache / name / "model.safetensors")
        final = load_file(out / "model.safetensors")
        assert set(final) == set(initial)
        changed = {k for k in final if not torch.equal(final[k], initial[k])}
        assert changed and all(k.split(".")[-2].endswith("_proj") for k in changed), sorted(changed)[:5]
        base = AutoModelForCausalLM.from_pretrained(cache / name, dtype=torch.float32)
        peft_merged = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload().state_dict()
        exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
        for k, v in exported.items():
            torch.testing.assert_close(v, peft_merged[k], rtol=0, atol=1e-6)
