"""opcod.plan: parameter counts from config.json, the paper configs on 2 x H200, refusals by key."""
import subprocess
import sys
from pathlib import Path

import pytest

from opcod.config import load_config
from opcod.plan import Shape, make_plan

ROOT = Path(__file__).parent.parent


def test_parameter_count_matches_the_model():
    assert Shape(**{"vocab": 151936, "hidden": 4096, "layers": 36, "intermediate": 12288, "heads": 32,
                    "kv_heads": 8, "head_dim": 128, "tied": False}).params == 8_190_735_360
    from transformers import Qwen3ForCausalLM

    from opcod.tiny import tiny_config
    for tie in (True, False):
        cfg = tiny_config(97, hidden=32, layers=3, heads=4, kv_heads=2, intermediate=48, tie=tie)
        model = Qwen3ForCausalLM(cfg)
        shape = Shape(97, 32, 3, 48, 4, 2, 8, tie)
        assert shape.params == sum(p.numel() for p in model.parameters())
    from opcod.adapters import attach
    for targets in ("all-linear", ["q_proj", "v_proj"], ["down_proj"]):   # the adapters PEFT makes
        lm = attach(Qwen3ForCausalLM(tiny_config(97, hidden=32, layers=3, heads=4, kv_heads=2, intermediate=48)),
                    4, 8.0, 0.0, targets)
        assert shape.lora_params(4, targets) == sum(p.numel() for p in lm.parameters() if p.requires_grad)


def _plan_cli(*args):
    return subprocess.run([sys.executable, "-m", "opcod.plan", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("config", ["phys_chem.yaml", "chem_mat.yaml", "mat_phys.yaml"])
def test_paper_configs_fit_two_h200(config, qwen3_8b):
    res = _plan_cli("--config", ROOT / "configs" / config, f"students.0.path={qwen3_8b}",
                    f"students.1.path={qwen3_8b}")
    assert res.returncode == 0, res.stdout + res.stderr
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("peak per GPU: ") and last.endswith("of 140 GiB")
    for part in ("trainer weights", "AdamW", "gradients", "activations", "vLLM engines awake", "buckets"):
        assert part in res.stdout


def test_a_plan_that_does_not_fit_names_the_key(qwen3_8b):
    base = ["--config", ROOT / "configs" / "phys_chem.yaml", f"students.0.path={qwen3_8b}",
            f"students.1.path={qwen3_8b}"]
    res = _plan_cli(*base, "engine.gpu_memory_utilization=0.6")
    assert res.returncode == 3 and "change engine.gpu_memory_utilization" in res.stdout
    res = _plan_cli(*base, "model.activation_checkpointing=false")
    assert res.returncode == 3 and "change model.activation_checkpointing" in res.stdout
    res = _plan_cli(*base, "--gpus", "1")  # two 8B students with AdamW on one GPU
    assert res.returncode == 3
    res = _plan_cli(*base[:2], "students.0.path=/nowhere", f"students.1.path={qwen3_8b}")
    assert res.returncode == 2 and "/nowhere/config.json" in res.stderr


def test_plan_parts_follow_the_config(qwen3_8b):
    cfg = load_config(str(ROOT / "configs" / "phys_chem.yaml"),
                      [f"students.0.path={qwen3_8b}", f"students.1.path={qwen3_8b}"])
    plan = make_plan(cfg, 2)
    per_gpu_weights = 2 * 8_190_735_360 * 4 / 2 / 2**30
    assert next(p for p in plan.parts if p.name.startswith("trainer weights")).gib == pytest.approx(per_gpu_weights)
    ema = make_plan(load_config(str(ROOT / "configs" / "phys_chem.yaml"),
                                [f"students.0.path={qwen3_8b}", f"students.1.path={qwen3_8b}",
                                 "loss.teacher_weights=ema"]), 2)
    assert any(p.name.startswith("teacher copies") for p in ema.parts)
    assert ema.phase_total("student") == pytest.approx(plan.phase_total("student") + per_gpu_weights)
    doubled = make_plan(load_config(str(ROOT / "configs" / "phys_chem.yaml"),
                                    [f"students.0.path={qwen3_8b}", f"students.1.path={qwen3_8b}",
                                     "model.micro_batch_size=8"]), 2)
    assert doubled.phase_total("student") > plan.phase_total("student")


def test_lora_counts_adapters_only_and_the_initial_teacher_costs_nothing(qwen3_8b):
    args = [f"students.0.path={qwen3_8b}", f"students.1.path={qwen3_8b}"]
    full = make_plan(load_config(str(ROOT / "configs" / "phys_chem.yaml"), args), 2)
    lora = make_plan(load_config(str(ROOT / "configs" / "phys_chem.yaml"), args + ["model.lora.rank=64"]), 2)
    adam = {p.name: p.gib for p in lora.parts}["tutee's AdamW state, fp32 shards"]
    assert adam == pytest.approx(2 * 174_587_904 * 4 / 2 / 2**30)   # Qwen3-8B, r = 64, all seven projections
    assert lora.peak_gib < full.peak_gib - 20
    initial = make_plan(load_config(str(ROOT / "configs" / "phys_chem.yaml"),
                                    args + ["model.lora.rank=64", "loss.teacher_weights=initial"]), 2)
    assert not any(p.name.startswith("teacher copies") for p in initial.parts)


def test_every_push_and_each_engine_process_is_in_the_plan(qwen3_8b):
    """A push runs with the tutee's AdamW state on the device and the receiving engine's weights
    woken; with a separate tutor, the tutor's push runs while the rollout engine is awake; an
    engine process's CUDA context lies outside vLLM's budget in every phase."""
    args = [f"students.0.path={qwen3_8b}", f"students.1.path={qwen3_8b}"]
    plan = make_plan(load_config(str(ROOT / "configs" / "phys_chem.yaml"), args), 2)
    in_phase = {ph: {p.name for p in plan.parts if ph in p.phases} for ph in plan.phases}
    for phase in ("sync", "tutor sync"):
        assert {"tutee's AdamW state, fp32 shards", "engine's weights, woken for a push",
                "engine's received copies: a bucket + one layer",
                "sync: one gathered tensor, fp32 + engine dtype"} <= in_phase[phase], phase
    assert any(n.startswith("rollout engine awake") for n in in_phase["tutor sync"])
    contexts = next(p for p in plan.parts if p.name.startswith("vLLM processes outside their budget"))
    assert set(contexts.phases) == set(plan.phases) and contexts.owner == "engine"
    woken = next(p for p in plan.parts if p.name == "engine's weights, woken for a push")
    assert woken.gib == pytest.approx(8_190_735_360 * 2 / 2**30)   # a whole bf16 copy on each rank
    shared = make_plan(load_config(str(ROOT / "configs" / "phys_chem.yaml"), args + ["engine.tutor=shared"]), 2)
    assert "tutor sync" not in shared.phases and "sync" in shared.phases
    hf = make_plan(load_config(str(ROOT / "configs" / "phys_chem.yaml"), args + ["engine.kind=hf"]), 2)
    assert all(p.owner == "trainer" for p in hf.parts)   # the hf engine lives in host memory
