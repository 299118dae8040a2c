"""torchrun --nproc_per_node=2 check_ema.py [--lora]: the EMA teacher under FSDP2 against SDPO's update
written out on full tensors (lasgroup/SDPO verl/workers/actor/dp_actor.py, _update_teacher:
teacher.mul_(1 - rate).add_(student, alpha=rate) after each optimizer step), step by step and in
closed form over three steps; with --lora, only the adapters are updated."""
import os
import sys
import tempfile

import torch
import torch.distributed as dist

from opcod.config import LoRAConfig
from opcod.models import apply_update, ema_update, frozen_student, load_student, make_optimizer
from opcod.tiny import tiny_config

RATE = 0.05


def full(module) -> dict[str, torch.Tensor]:
    """Every parameter gathered whole, in float64 (each rank holds only its shard)."""
    out = {}
    for name, p in module.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().double().clone()
    return out


def main():
    from transformers import Qwen3ForCausalLM
    lora = LoRAConfig(rank=4) if "--lora" in sys.argv else None
    torch.manual_seed(0)
    made = Qwen3ForCausalLM(tiny_config(97, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, tie=False))
    tmp = tempfile.mkdtemp()
    made.save_pretrained(tmp)  # before the group exists: transformers saves on rank 0 only
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cpu = torch.device("cpu")
    student = load_student(tmp, cpu, lora)
    if lora is not None:  # PEFT starts B at 0: move the adapters so that the teacher's differ from the base's
        with torch.no_grad():
            for p in student.parameters():
                if p.requires_grad:
                    p.add_(0.01)
    teacher = frozen_student(tmp, cpu, like=student, lora=lora)
    opt, _ = make_optimizer(student, 1e-2, 0.01, [0.9, 0.999], 0)
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(1 + rank)
    t0 = full(teacher)
    teacher_now, students = t0, []
    worst = 0.0
    for _ in range(3):
        ids = torch.randint(1, 97, (2, 7), generator=g)
        loss = student(ids, torch.ones_like(ids), torch.arange(12), targets=ids[:, 1:].reshape(-1)[:12])
        loss.backward()
        stepped, _ = apply_update(student, opt, 1.0)
        assert stepped
        s = full(student)
        students.append(s)
        ema_update(teacher, student, RATE)
        after = full(teacher)
        for name, before in teacher_now.items():
            # SDPO's update on the parameters the student trains; the rest (a LoRA base) is shared
            # by both and stays.
            want = before * (1 - RATE) + s[name] * RATE if name in trained else before
            err = ((after[name] - want).norm() / want.norm().clamp_min(1e-30)).item()
            worst = max(worst, err)
        teacher_now = after
    # closed form: T_3 = (1 - r)^3 T_0 + sum_i r (1 - r)^(3 - i) S_i, i = 1..3
    closed = 0.0
    for name in trained:
        want = (1 - RATE) ** 3 * t0[name] + sum(RATE * (1 - RATE) ** (3 - i) * students[i - 1][name]
                                                 for i in (1, 2, 3))
        closed = max(closed, ((teacher_now[name] - want).norm() / want.norm()).item())
    moved = max((teacher_now[n] - t0[n]).abs().max().item() for n in trained)
    # the update must not touch the student
    same_student = all(torch.equal(a, b) for a, b in zip(full(student).values(), students[-1].values()))
    ok = worst <= 1e-6 and closed <= 1e-6 and moved > 0 and same_student and len(trained) > 0
    if rank == 0:
        print(f"ema: worst step rel err {worst:.2e}, closed-form rel err {closed:.2e}, teacher moved {moved:.2e}, "
              f"{len(trained)} trained of {len(t0)} parameters{' (LoRA)' if lora else ''}", flush=True)
    flags = torch.tensor([int(ok)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0 if flags.item() else 1)


if __name__ == "__main__":
    main()
