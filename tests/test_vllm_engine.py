"""The vLLM engine layer, for real: runs only where vllm is installed and a CUDA GPU is present
(its protocol half, packing and names, runs in every CPU test through the hf engine)."""
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
                                reason="needs the vllm package and a CUDA GPU")


def test_vllm_engine_takes_pushed_weights_and_generates(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from opcod.engine_hf import Sampling
    from opcod.engine_vllm import VLLMEngine
    from opcod.tiny import create_model_dir, tiny_config
    from opcod.weight_sync import push_weights
    path = create_model_dir(tmp_path / "m", tokenizer, tiny_config(len(tokenizer), hidden=64, intermediate=128))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # the engine started from the file; these weights differ
    engine = VLLMEngine(str(path), 8 << 20, torch.bfloat16, seed=0, gpu_memory_utilization=0.2, max_model_len=512)
    try:
        stats = push_weights(((n, p) for n, p in model.named_parameters()), engine)
        assert stats.bytes > 0
        (got,) = engine.llm.collective_rpc("opcod_weight_sum")
        want = float(sum(p.double().sum() for p in model.parameters()))
        assert got == pytest.approx(want, rel=1e-3)
        engine.sleep()
        outs = engine.generate([tokenizer.encode("hello")], Sampling(0.0, 1.0, 4), seed=0)
        assert len(outs) == 1 and 1 <= len(outs[0]) <= 4
    finally:
        engine.close()
