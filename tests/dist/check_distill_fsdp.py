"""torchrun --nproc_per_node=2 check_distill_fsdp.py [--ac] [--normalize sequence|token] [--own-head]:
distill_backward under FSDP2 (optionally with activation checkpointing, or with a separate teacher
that scores with its own lm_head, as an EMA teacher does) against a float64, unsharded reference
computed on full logits (positions, masks, teacher alignment, normalisation, gradient sums)."""
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from opcod.data import Problem
from opcod.models import Student, frozen_student, load_causal_lm, shard
from opcod.step import Rollout, distill_backward, loss_denominator
from opcod.tiny import tiny_config
from opcod_kernels import reference_jsd


def main():
    from transformers import Qwen3ForCausalLM
    ac, own_head = "--ac" in sys.argv, "--own-head" in sys.argv
    normalize = sys.argv[sys.argv.index("--normalize") + 1] if "--normalize" in sys.argv else "sequence"
    torch.manual_seed(0)
    # An untied head when the teacher has its own: the teacher's head then differs from the student's.
    made = Qwen3ForCausalLM(tiny_config(97, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, tie=not own_head))
    ref = Qwen3ForCausalLM(made.config).double()
    ref.load_state_dict({k: v.double() for k, v in made.state_dict().items()})
    ref_teacher = ref
    if own_head:
        ref_teacher = Qwen3ForCausalLM(made.config).double()
        ref_teacher.load_state_dict(ref.state_dict())
        with torch.no_grad():
            ref_teacher.lm_head.weight.mul_(1.7).add_(0.05)
    tmp = tempfile.mkdtemp()  # loaded as the trainer loads students (eval mode)
    made.save_pretrained(tmp)  # before the group exists: transformers saves on rank 0 only
    lm = load_causal_lm(tmp)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1)
    prob = Problem("p", "x", "q", [("A", "a")], "A")

    def rnd(n):
        return torch.randint(1, 97, (n,), generator=g).tolist()
    # 6 rollouts per rank, ragged lengths; every other one without a teacher (weight 0).
    all_rollouts = []
    for r in range(world):
        chunk = []
        for j in range(6):
            ro = Rollout(prob, rnd(3 + j), rnd(2 + (j * 3) % 5), "", 0.0)
            ro.teacher_prompt_ids = rnd(5 + j) if j % 2 == 0 else None
            chunk.append(ro)
        all_rollouts.append(chunk)
    mine = all_rollouts[rank]
    student = shard(Student(lm), torch.device("cpu"), activation_checkpointing=ac)
    teacher, head = student, None
    if own_head:  # as the trainer makes an EMA teacher: a sharded frozen copy, then its own weights
        teacher = frozen_student(tmp, torch.device("cpu"))
        with torch.no_grad():
            w = teacher.lm.lm_head.weight
            w.to_local().mul_(1.7).add_(0.05)
        head = teacher.output_weight(torch.float32)
    # Counted inside the layer (its MLP): transformers checkpoints a layer's forward, not its
    # __call__, so hooks on the layer itself do not run again when backward recomputes it.
    calls, teacher_calls = [], []
    student.lm.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    if teacher is not student:
        teacher.lm.model.layers[0].mlp.register_forward_pre_hook(lambda *_: teacher_calls.append(1))
    loss = distill_backward(student, teacher, mine, micro_batch=4, pad_id=0, device=torch.device("cpu"),
                            beta=0.5, denominator=loss_denominator(mine, normalize, torch.device("cpu")),
                            normalize=normalize, teacher_weight=head)
    dist.all_reduce(loss)
    # Per micro-batch, on the student's layer: its own forward, the teacher's when the student is its
    # own teacher, and with checkpointing one more in backward (only in training mode). A separate
    # teacher runs its own layer once. Checking the count in every case is what makes a lost
    # checkpointing fail here (it passed by construction when the teacher had its own head).
    micro_batches = -(-len(mine) // 4)
    expected = micro_batches * (1 + (teacher is student) + ac)
    recomputed = len(calls) == expected and len(teacher_calls) == (0 if teacher is student else micro_batches)

    # reference: every rollout of every rank, one sequence at a time, float64 logits; "sequence":
    # each sequence's token mean (0 without a teacher), averaged over all sequences of all ranks.
    everyone = [r for c in all_rollouts for r in c]
    ref_loss = torch.zeros((), dtype=torch.float64)
    for ro in everyone:
        if ro.teacher_prompt_ids is None:
            continue
        s = torch.tensor([ro.prompt_ids + ro.response_ids])
        t = torch.tensor([ro.teacher_prompt_ids + ro.response_ids])
        L, Lt, M = len(ro.prompt_ids), len(ro.teacher_prompt_ids), len(ro.response_ids)
        zs = ref(s).logits[0, L - 1:L - 1 + M]
        with torch.no_grad():
            zt = ref_teacher(t).logits[0, Lt - 1:Lt - 1 + M]
        div = reference_jsd(zs, zt, beta=0.5, reduction="sum")
        ref_loss = ref_loss + (div / M if normalize == "sequence" else div)
    ref_loss = ref_loss / (len(everyone) if normalize == "sequence" else sum(len(r.response_ids) for r in everyone))
    ref_loss.backward()
    worst = 0.0
    ref_grads = dict(ref.named_parameters())
    for name, p in student.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        r = ref_grads[name.removeprefix("lm.")].grad
        worst = max(worst, ((grad.double() - r).norm() / r.norm().clamp_min(1e-30)).item())
    ok = abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()) and worst <= 1e-4 and recomputed
    if rank == 0:
        print(f"loss {loss.item():.8f} ref {ref_loss.item():.8f} worst grad rel err {worst:.2e}; "
              f"layer-0 MLP forwards {len(calls)} (expected {expected}), teacher's {len(teacher_calls)}, "
              f"for {micro_batches} micro-batches ({normalize}"
              f"{', own teacher head' if own_head else ''})", flush=True)
    flags = torch.tensor([int(ok)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # The verdict is settled; skip interpreter teardown, where a background autograd/gloo thread
    # left by non-reentrant checkpointing has been seen to abort the process (SIGABRT) at exit.
    os._exit(0 if flags.item() else 1)


if __name__ == "__main__":
    main()
