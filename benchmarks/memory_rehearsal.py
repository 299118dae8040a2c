"""The memory rehearsal of benchmarks/gpu_check.sh: a Qwen3-1.7B-shaped model built from its config
(random weights, no download) as both students, two OPCoD steps on one GPU, and the trainer's
measured peak beside opcod.plan's figure for the same config.

    python benchmarks/memory_rehearsal.py OUT_DIR

The device image has no vLLM, so the engines are `hf` (host memory): the rehearsal measures the
trainer's part of the plan, which is everything but the engines' shares.
"""
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

# Qwen3-1.7B's sizes (the 151,936-token vocabulary included); the tokenizer is a small one built
# here, so rows past it are never sampled, but every GEMM and buffer has the real shape.
SHAPE = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
             num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
             max_position_embeddings=4096, rope_theta=1000000.0)


def build(root: Path) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opcod import prompts, synthetic
    from opcod.tiny import build_tokenizer
    model_dir = root / "qwen3-1.7b-shape"
    if (model_dir / "model.safetensors").is_file():
        return model_dir
    corpus = [x for d in synthetic.SYNTHETIC_DOMAINS for p in synthetic.generate(d, 80, seed=0)
              for x in (prompts.SYSTEM_PROMPT, p.prompt, p.solution, p.meta["feedback"])]
    tok = build_tokenizer(corpus, vocab_size=2048)
    cfg = Qwen3Config(**SHAPE, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device("cuda"):  # random init on the GPU: seconds, not minutes
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    del model
    torch.cuda.empty_cache()
    return model_dir


def config(root: Path, model_dir: Path) -> Path:
    cfg = {"method": "opcod", "rounds": 1, "steps_per_phase": 1, "prompts_per_step": 4, "rollouts_per_prompt": 4,
           "gate": "always", "output_dir": str(root / "runs"), "run_name": "rehearsal", "eval_k": 1, "val_k": 1,
           "students": [{"name": "A", "path": str(model_dir)}, {"name": "B", "path": str(model_dir)}],
           "data": {"source": "synthetic", "synthetic_train": 16, "val_size": 2, "synthetic_test": 2},
           "rollout": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 48},
           "evaluation": {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 16},
           "feedback": {"temperature": 0.7, "top_p": 0.95, "max_new_tokens": 16},
           "engine": {"kind": "hf", "tutor": "separate", "bucket_mb": 512, "max_model_len": 512},
           "model": {"micro_batch_size": 16, "activation_checkpointing": True}}
    path = root / "rehearsal.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> int:
    root = Path(sys.argv[1])
    root.mkdir(parents=True, exist_ok=True)
    from opcod.config import load_config
    from opcod.plan import make_plan
    model_dir = build(root)
    cfg_path = config(root, model_dir)
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    plan = make_plan(load_config(str(cfg_path)), 1, total)
    print(plan.table())
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "-m", "opcod.train",
                          "--config", str(cfg_path)], capture_output=True, text=True)
    (root / "train.log").write_text(res.stdout + res.stderr)
    metrics = root / "runs" / "rehearsal" / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    steps = [json.loads(x) for x in lines if '"kind": "step"' in x]
    if res.returncode != 0 or len(steps) < 2:
        print(f"memory rehearsal: the run failed (exit {res.returncode}, {len(steps)} steps); "
              f"last lines:\n{(res.stdout + res.stderr)[-2000:]}")
        return 1
    reserved = max(s["max_memory_reserved_gib"] for s in steps)
    allocated = max(s["max_memory_allocated_gib"] for s in steps)
    print(f"memory rehearsal: {plan.shape.params / 1e9:.2f} B parameters x 2 students, {len(steps)} steps; "
          f"plan peak {plan.peak_gib:.1f} GiB ({plan.peak_phase}), measured peak reserved {reserved:.1f} GiB "
          f"(allocated {allocated:.1f} GiB), plan / measured {plan.peak_gib / reserved:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
