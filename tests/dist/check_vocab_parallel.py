"""torchrun --nproc_per_node=2 check_vocab_parallel.py: fused_linear_jsd with the lm_head split over
the ranks' vocabulary (rank r holds rows [r V/2, (r+1) V/2)) equals the one-rank result: the loss,
dH on every rank, and each rank's rows of dW; for every beta, a separate teacher head, and a head
with a bias (each rank holds its entries), called through the FusedLinearJSD module."""
import os
import sys

import torch
import torch.distributed as dist

import opcod_kernels as K


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    N, H, V = 23, 16, 1000
    hs, ht = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
    W, Wt = torch.randn(V, H, generator=g) / 4, torch.randn(V, H, generator=g) / 4
    tw = (torch.rand(N, generator=g) > 0.3).float()
    B = torch.randn(V, generator=g)
    rows = slice(rank * V // world, (rank + 1) * V // world)
    worst = 0.0
    for beta in (0.0, 0.4, 1.0):
        for teacher, bias in ((None, None), (Wt, None), (None, B)):
            outs = []
            for part in (False, True):
                a = hs.clone().requires_grad_()
                w = (W[rows] if part else W).clone().requires_grad_()
                t = None if teacher is None else (teacher[rows] if part else teacher)
                b = None if bias is None else (bias[rows] if part else bias).clone().requires_grad_()
                # The module form, which takes process_group like the function.
                loss_fn = K.FusedLinearJSD(beta=beta, chunk_size=8, process_group=dist.group.WORLD if part else None)
                loss = loss_fn(a, ht, w, t, token_weights=tw, bias=b)
                loss.backward()
                outs.append((loss.detach(), a.grad, w.grad if part else w.grad[rows])
                            + (() if b is None else (b.grad if part else b.grad[rows],)))
            for x, y in zip(*outs):
                worst = max(worst, ((x - y).norm() / y.norm()).item())
    ok = torch.tensor([int(worst <= 1e-5)])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"vocab-parallel {'ok' if ok.item() else 'FAILED'}: worst rel err {worst:.2e}", flush=True)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0 if ok.item() else 1)


if __name__ == "__main__":
    main()
