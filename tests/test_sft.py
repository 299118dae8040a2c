"""opcod.sft: LoRA merging against a float64 reference, and whole runs (full and LoRA) that learn."""
import json

import pytest
import torch
from torch import nn

from conftest import torchrun
from opcod.lora import LoRALinear, merge_state_dict


def test_lora_merge_matches_the_adapted_layer_in_float64():
    torch.manual_seed(0)
    base = nn.Linear(12, 7, bias=True).double()
    layer = LoRALinear(base, rank=3, alpha=6.0).double()
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at zero; make the adapter do something
    x = torch.randn(5, 12, dtype=torch.float64)
    sd = {f"m.{k}": v for k, v in layer.state_dict().items()}
    merged = merge_state_dict(sd, layer.scale)
    assert set(merged) == {"m.weight", "m.bias"}
    plain = nn.Linear(12, 7).double()
    plain.load_state_dict({"weight": merged["m.weight"], "bias": merged["m.bias"]})
    torch.testing.assert_close(plain(x), layer(x), rtol=0, atol=1e-12)


def _response_logprob(path, records):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opcod import prompts
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    total = 0.0
    for r in records:
        p = tok.encode(prompts.render(tok, r["messages"]), add_special_tokens=False)
        ids = p + tok.encode(r["response"], add_special_tokens=False)
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        total += sum(logp[i - 1, ids[i]].item() for i in range(len(p), len(ids)))
    return total / len(records), model


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_sft_run_learns_its_responses_and_writes_a_loadable_model(tmp_path, tokenizer, lora_rank):
    from opcod.tiny import create_model_dir, tiny_config
    init = create_model_dir(tmp_path / "init", tokenizer, tiny_config(len(tokenizer)), seed=0)
    records = [{"messages": [{"role": "user", "content": f"Say the number {n}."}], "response": f"The number is {n}."}
               for n in range(12)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    res = torchrun("-m", "opcod.sft", f"model={init}", f"output={tmp_path / 'out'}", f"data={data}",
                   "epochs=6", "batch_size=4", "lr=3e-3", f"lora_rank={lora_rank}", nproc=2)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    before, init_model = _response_logprob(init, records)
    after, tuned = _response_logprob(tmp_path / "out", records)
    assert after > before + 5.0, (before, after)  # mean over responses of each one's summed log-prob, nats
    same_embedding = torch.equal(init_model.get_input_embeddings().weight, tuned.get_input_embeddings().weight)
    assert same_embedding == bool(lora_rank)  # LoRA adapts the decoder's linear layers only
    assert (tmp_path / "out" / "sft_config.yaml").is_file()
