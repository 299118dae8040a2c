"""torchrun --nproc_per_node=2 check_sync.py CONFIG.yaml: after a sync, every engine's weights
equal the trainer's full parameters bitwise (fp32); also for the round snapshot and a shared engine,
and for the weights the engines loaded from disk, which are not pushed again."""
import sys

import torch
import torch.distributed as dist

from opcod.config import load_config
from opcod.distributed import init_distributed, quiet_transformers
from opcod.train import CoDistillation


def check(run, role, name, source):
    engine_sd = run.engines.by_role[role].state_dict()
    for key, full in source.items():
        got = engine_sd[key]
        if not torch.equal(got, full):
            raise AssertionError(f"{role} engine: {key} differs from {name}'s trainer weights")


def full_params(student):
    from opcod.weight_sync import iter_full_params
    return {k: v.clone() for k, v in iter_full_params(student, strip="lm.")}


def main():
    quiet_transformers()
    init_distributed()
    cfg = load_config(sys.argv[1], sys.argv[2:])
    run = CoDistillation(cfg)
    a, b = run.names
    try:
        # Every engine started from students[0]'s files: its first use sends nothing, and what the
        # engines loaded from disk is bitwise what the trainer holds.
        assert run.ensure("rollout", a) is None and run.ensure("tutor", a) is None
        full_a = full_params(run.students[a])  # every rank: the gathers are collectives
        if dist.get_rank() == 0:
            for role in ("rollout", "tutor"):
                check(run, role, a, full_a)
        run.snapshots = {n: run.take_snapshot(n) for n in run.names}
        snap_b = full_params(run.students[b])
        # move student b away from its snapshot, as a training step would
        with torch.no_grad():
            for p in run.students[b].parameters():
                p.add_(0.01)
        run.progress.versions[b] += 1
        stats = run.ensure("rollout", b)
        assert stats is not None and stats.bytes > 0
        assert run.ensure("rollout", b) is None  # already in sync: nothing sent
        if dist.get_rank() == 0:
            check(run, "rollout", b, full_params(run.students[b]))
        else:
            full_params(run.students[b])  # the gathers are collectives
        run.ensure("tutor", b, snapshot=True)
        if dist.get_rank() == 0:
            check(run, "tutor", b, snap_b)
        run.ensure("tutor", a)
        if dist.get_rank() == 0:
            check(run, "tutor", a, full_params(run.students[a]))
        else:
            full_params(run.students[a])
        if dist.get_rank() == 0:
            print(f"sync ok ({cfg.engine.tutor} engines, {stats.bytes} bytes in {stats.buckets} buckets)", flush=True)
    finally:
        run.close()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
