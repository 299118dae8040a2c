"""GRPO: advantages and loss against hand computations and a naive materializing log-prob path."""
import math

import pytest
import torch

from opcod.data import Problem
from opcod.models import Student, grpo_token_loss
from opcod.step import Rollout, group_advantages, grpo_backward
from opcod.tiny import tiny_config


def test_group_advantages_by_hand():
    adv = group_advantages([1, 0, 0, 1, 1, 1, 1, 1], n=4)
    s = math.sqrt((4 * 0.25) / 3)  # unbiased std of (1, 0, 0, 1)
    assert adv[:4] == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], rel=1e-5)
    assert adv[4:] == pytest.approx([0, 0, 0, 0])  # a group that agrees carries no signal


def test_grpo_token_loss_clipping_by_hand():
    logp = torch.log(torch.tensor([0.5, 0.5, 0.5]))
    old = torch.log(torch.tensor([0.25, 0.25, 0.5]))  # ratios 2, 2, 1
    adv = torch.tensor([1.0, -1.0, 3.0])
    loss = grpo_token_loss(logp, adv, old_logp=old, clip=0.2)
    # A > 0: min(2, 1.2) * 1 -> -1.2; A < 0: min(-2, -1.2) -> 2; ratio 1: -3
    assert loss.tolist() == pytest.approx([-1.2, 2.0, -3.0])
    ref = torch.log(torch.tensor([0.5, 0.25, 0.5]))
    with_kl = grpo_token_loss(logp, adv, old_logp=old, clip=0.2, ref_logp=ref, kl=0.1)
    d = math.log(0.5)  # ref - logp for the second token
    assert (with_kl - loss).tolist() == pytest.approx([0.0, 0.1 * (math.exp(d) - d - 1), 0.0], rel=1e-5, abs=1e-7)


def test_grpo_gradient_matches_naive_materializing_logprobs():
    from transformers import Qwen3ForCausalLM
    torch.manual_seed(0)
    lm = Qwen3ForCausalLM(tiny_config(89, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64)).double()
    student = Student(lm)
    g = torch.Generator().manual_seed(3)
    prob = Problem("p", "x", "q", [("A", "a")], "A")
    rollouts = [Rollout(prob, torch.randint(1, 89, (4 + i,), generator=g).tolist(),
                        torch.randint(1, 89, (2 + i % 3,), generator=g).tolist(), "", float(i % 2))
                for i in range(6)]
    adv = group_advantages([r.reward for r in rollouts], n=3)
    total = torch.tensor(float(sum(len(r.response_ids) for r in rollouts)), dtype=torch.float64)
    grpo_backward(student, None, rollouts, adv, micro_batch=4, pad_id=0, device="cpu", clip=0.2,
                  kl=0.0, total_tokens=total)
    got = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    naive = 0.0
    for r, a in zip(rollouts, adv):  # one sequence at a time, full logits
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        L, M = len(r.prompt_ids), len(r.response_ids)
        logp = torch.log_softmax(lm(ids).logits[0, L - 1:L - 1 + M], -1).gather(1, torch.tensor(r.response_ids)[:, None])[:, 0]
        ratio = torch.exp(logp - logp.detach())
        naive = naive + (-ratio * a).sum()
    (naive / total).backward()
    for n, p in lm.named_parameters():  # the kernel's logits are fp32 by contract
        assert ((got[n] - p.grad).norm() / p.grad.norm()).item() <= 1e-5, n
