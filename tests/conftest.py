"""Test setup: without a GPU, Triton kernels run in its interpreter, which must be chosen before import."""
import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """A small byte-level BPE tokenizer with a Qwen-style chat template, built offline."""
    from opcod.tiny import build_tokenizer
    corpus = ["The molar mass of water is 18.02 g/mol.", "Please reason step by step.",
              "Correct solution: the force is measured in newtons."] * 20
    return build_tokenizer(corpus, vocab_size=400)
