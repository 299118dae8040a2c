"""opcod.sft: LoRA merging against a float64 reference, and whole runs (full and LoRA) that learn."""
import json
import re

import pytest
import torch

from conftest import torchrun
from opcod.demo import avx2_machine


def test_lora_merge_matches_peft_merge_and_unload_in_float64(tokenizer, tmp_path):
    """opcod.adapters.merged (what engines and exports receive) against PEFT's own merge, on a tiny
    Qwen3 with random adapters, in float64."""
    from transformers import AutoModelForCausalLM

    from opcod.adapters import attach, merged, scale_of
    from opcod.tiny import create_model_dir, tiny_config
    path = create_model_dir(tmp_path / "m", tokenizer, tiny_config(len(tokenizer)), seed=0)
    lm = attach(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64), 4, 8.0, 0.0, "all-linear")
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_()   # B starts at zero; make every adapter do something
    ours = dict(merged(((n, p.detach()) for n, p in lm.named_parameters()), scale_of(lm)))
    theirs = dict(lm.merge_and_unload().named_parameters())
    assert set(ours) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k].detach(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="without their pair"):
        list(merged([("base_model.model.a.base_layer.weight", torch.zeros(2, 2))], 1.0))


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
    if lora_rank:   # the adapter in PEFT's format, beside the merged model: base + adapter = merged
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
        adapted = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").merge_and_unload()
        for k, v in tuned.state_dict().items():
            torch.testing.assert_close(adapted.state_dict()[k], v, rtol=0, atol=1e-6)


_SFT_STEPS = r"""
import hashlib, os, sys
if sys.argv[1] == "pinned":
    import opcod.train  # everything the trainer imports, before the pin, as under torchrun -m opcod.train
    from opcod.demo import pin_cpu_numerics
    pin_cpu_numerics()
import torch
from opcod.tiny import tiny_config
from transformers import Qwen3ForCausalLM
torch.manual_seed(0)
model = Qwen3ForCausalLM(tiny_config(512, hidden=128, layers=2, intermediate=384))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
ids = torch.randint(0, 512, (4, 96), generator=torch.Generator().manual_seed(1))
for _ in range(3):  # SFT steps: matmuls (MKL), attention and softmax (ATen), AdamW
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
print(torch.backends.cpu.get_cpu_capability(), os.environ.get("MKL_CBWR"), h)
"""


@pytest.mark.skipif(not avx2_machine(),
                    reason="the demo pins CPU kernels on x86-64 machines with AVX2 only")
def test_the_demo_pins_cpu_kernels_to_avx2_so_other_instruction_sets_train_the_same_bits():
    """The demo's pin, taken inside a process that has imported the trainer, computes what a process
    launched with ATen and MKL on their AVX2 paths computes, i.e. what an AVX2 machine does; on an
    AVX-512 machine the unpinned default trains other bits (why the demo students used to differ
    between machines)."""
    import os
    import subprocess
    import sys
    flags = open("/proc/cpuinfo").read()
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    env["OMP_NUM_THREADS"] = "1"

    def run(mode, **extra):
        res = subprocess.run([sys.executable, "-c", _SFT_STEPS, mode], capture_output=True, text=True,
                             env={**env, **extra}, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout.split()
    pinned = run("pinned")
    avx2 = run("plain", ATEN_CPU_CAPABILITY="avx2", MKL_CBWR="AVX2")
    assert pinned == avx2 and pinned[:2] == ["AVX2", "AVX2"]
    default = run("plain")
    if " avx512f" in flags:
        assert default[0] == "AVX512" and default[2] != pinned[2]


@pytest.mark.skipif(not avx2_machine(),
                    reason="the demo pins CPU kernels on x86-64 machines with AVX2 only")
def test_mkl_honours_the_avx2_pin_exactly_where_the_demo_claims_the_readmes_students():
    """Why the README's students come out bit for bit on Intel CPUs only: MKL takes its AVX2
    reproducibility branch (CNR:AVX2 in its verbose log) there, and falls back to AUTO on other
    vendors (measured on an AMD EPYC, as MKL's docs say). readme_machine() must say the same as MKL."""
    import os
    import subprocess
    import sys

    from opcod.demo import readme_machine
    env = {**os.environ, "MKL_VERBOSE": "1", "MKL_CBWR": "AVX2", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", "import torch; torch.ones(64, 64) @ torch.ones(64, 64)"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    branch = re.search(r"CNR:(\w+)", res.stdout + res.stderr)
    assert branch, (res.stdout + res.stderr)[-2000:]
    assert (branch.group(1) == "AVX2") == readme_machine(), (branch.group(1), readme_machine())


def test_the_demo_says_whether_its_students_are_the_readmes_bit_for_bit(tmp_path, monkeypatch):
    """The line a demo run prints about its students: bit-identical to the README's build, or which
    student differs with both digests, or a build the README has no table for; docs/demo.md states
    the digests the code compares with."""
    import hashlib
    from pathlib import Path

    from opcod import demo
    from opcod.config import StudentConfig

    def sha(b):
        return hashlib.sha256(b).hexdigest()
    students = []
    for name, payload in (("chem_student", b"chem"), ("phys_student", b"phys")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(payload)
        students.append(StudentConfig(name, str(tmp_path / name), name[:4]))
    readme = {"chem_student": sha(b"chem"), "phys_student": sha(b"phys")}
    monkeypatch.setattr(demo, "README_STUDENTS", readme)
    assert demo.against_readme(students, 0).startswith("demo students: bit-identical to the README's")
    monkeypatch.setattr(demo, "README_STUDENTS", {**readme, "phys_student": sha(b"other")})
    line = demo.against_readme(students, 0)
    assert f"phys_student {sha(b'phys')[:12]} against {sha(b'other')[:12]}" in line
    assert "not the README's, bit for bit" in line and "chem_student" not in line
    assert "not the README's build" in demo.against_readme(students, 1)
    assert "not the README's build" in demo.against_readme(students[:1], 0)
    monkeypatch.undo()
    text = (Path(__file__).parents[1] / "docs" / "demo.md").read_text()  # where the README's build is stated
    assert all(digest in text for digest in demo.README_STUDENTS.values())


@pytest.mark.parametrize("group", [False, True])
def test_epoch_batches_hold_each_example_once_and_group_by_length_pads_less(group):
    import random

    from opcod.sft import epoch_batches
    rng = random.Random(3)
    lengths = [rng.choice([rng.randint(20, 40), rng.randint(150, 300)]) for _ in range(1000)]  # two kinds, mixed
    batches = epoch_batches(lengths, 16, seed=7, group_by_length=group)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert [len(b) for b in batches] == [16] * 62 + [8]  # the short batch last
    if not group:  # the plain seeded shuffle, cut in order
        order = random.Random(7).sample(range(1000), 1000)
        assert batches == [order[s:s + 16] for s in range(0, 1000, 16)]
        return
    plain = epoch_batches(lengths, 16, seed=7, group_by_length=False)

    def padded(bs):  # tokens computed by the slower of two ranks, each taking every other record
        return sum(2 * max(max(lengths[i] for i in b[r::2]) * len(b[r::2]) for r in (0, 1)) for b in bs)
    real = sum(lengths)
    assert real / padded(batches) > 0.85 > 0.6 > real / padded(plain)  # measured 0.88 and 0.48
    assert batches != epoch_batches(lengths, 16, seed=8, group_by_length=True)  # still shuffled per epoch


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_micro_batches_train_the_weights_of_whole_batches(tmp_path, tokenizer, lora_rank):
    """micro_batch_size=1 (each rank's records one at a time, unpadded, gradients reduced once per
    batch) against the whole share at once: the same weights up to float rounding, fully tuned or
    with LoRA (merged in the export)."""
    from safetensors.torch import load_file

    from opcod.sft import micro_batches
    from opcod.tiny import create_model_dir, tiny_config
    init = create_model_dir(tmp_path / "init", tokenizer, tiny_config(len(tokenizer)), seed=0)
    records = [{"messages": [{"role": "user", "content": "Count " + "up " * n + "please."}],
                "response": " ".join(str(k) for k in range(n + 1))} for n in range(10)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    weights = {}
    for micro in (0, 1):
        out = tmp_path / f"out{micro}"
        res = torchrun("-m", "opcod.sft", f"model={init}", f"output={out}", f"data={data}", "epochs=2",
                       "batch_size=6", "lr=3e-3", f"lora_rank={lora_rank}", f"micro_batch_size={micro}", nproc=2)
        # A worker's own last words come before torchrun's 2 kB summary of its exit: keep both (a CI
        # rehearsal saw rank 1 die of SIGABRT after the export, once, with only the summary to read).
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-8000:]
        weights[micro] = load_file(out / "model.safetensors")
    start = load_file(init / "model.safetensors")
    for k, w in weights[0].items():
        torch.testing.assert_close(weights[1][k], w, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(start[k], w) for k, w in weights[0].items())
    share = [([1] * n, [2]) for n in (3, 9, 1, 5, 7)]
    assert micro_batches(share, 0) == [share]
    assert [[len(p) for p, _ in m] for m in micro_batches(share, 2)] == [[9, 7], [5, 3], [1]]
