"""GRPO: advantages and loss against hand computations and a naive materializing log-prob path."""
import math

import pytest
import torch

from opcod.data import Problem
from opcod.models import Student, grpo_token_loss
from opcod.step import Rollout, group_advantages, grpo_backward, loss_denominator
from opcod.tiny import tiny_config


def test_group_advantages_by_hand():
    adv = group_advantages([1, 0, 0, 1, 1, 1, 1, 1], n=4, std_normalize=True)
    s = math.sqrt((4 * 0.25) / 3)  # unbiased std of (1, 0, 0, 1)
    assert adv[:4] == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], rel=1e-5)
    assert adv[4:] == pytest.approx([0, 0, 0, 0])  # a group that agrees carries no signal
    # SDPO's GRPO baseline (norm_adv_by_std_in_grpo: False): the mean is subtracted, nothing more.
    assert group_advantages([1, 0, 0, 1, 1, 1, 0, 1], n=4) == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, -0.75, 0.25])


def test_grpo_token_loss_clipping_by_hand():
    logp = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5]))
    old = torch.log(torch.tensor([0.25, 0.25, 0.5, 0.125, 0.625]))  # ratios 2, 2, 1, 4, 0.8
    adv = torch.tensor([1.0, -1.0, 3.0, -1.0, 2.0])
    loss = grpo_token_loss(logp, adv, old_logp=old, clip_low=0.2, clip_high=0.28, clip_dual=3.0)
    # A > 0: max(-2, -1.28) = -1.28; A < 0: max(2, 1.28) = 2 (under the dual clip 3); ratio 1: -3;
    # A < 0 at ratio 4: max(4, 1.28) = 4, capped by the dual clip at 3; A > 0 at ratio 0.8 (inside): -1.6.
    assert loss.tolist() == pytest.approx([-1.28, 2.0, -3.0, 3.0, -1.6])
    ref = torch.log(torch.tensor([0.5, 0.25, 0.5, 0.5, 0.5]))
    with_kl = grpo_token_loss(logp, adv, old_logp=old, ref_logp=ref, kl=0.1)
    d = math.log(0.5)  # ref - logp for the second token
    assert (with_kl - loss).tolist() == pytest.approx([0.0, 0.1 * (math.exp(d) - d - 1), 0.0, 0.0, 0.0],
                                                      rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("normalize", ["sequence", "token"])
def test_grpo_gradient_matches_naive_materializing_logprobs(normalize):
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
    denominator = loss_denominator(rollouts, normalize, "cpu").double()
    grpo_backward(student, None, rollouts, adv, micro_batch=4, pad_id=0, device="cpu", kl=0.0,
                  denominator=denominator, normalize=normalize)
    got = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    naive = 0.0
    for r, a in zip(rollouts, adv):  # one sequence at a time, full logits
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        L, M = len(r.prompt_ids), len(r.response_ids)
        logits = lm(ids).logits[0, L - 1:L - 1 + M]
        logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(r.response_ids)[:, None])[:, 0]
        ratio = torch.exp(logp - logp.detach())
        term = (-ratio * a).sum()
        naive = naive + (term / M if normalize == "sequence" else term)
    (naive / (len(rollouts) if normalize == "sequence" else sum(len(r.response_ids) for r in rollouts))).backward()
    for n, p in lm.named_parameters():  # the kernel's logits are fp32 by contract
        assert ((got[n] - p.grad).norm() / p.grad.norm()).item() <= 1e-5, n


def test_a_step_whose_gradient_norm_is_not_finite_is_skipped():
    """A finite loss can still give an inf/nan gradient norm: SDPO drops that update; so do we."""
    from opcod.models import apply_update, make_optimizer
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt, sched = make_optimizer(model, 0.1, 0.0, (0.9, 0.999), 0)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(2, 4)).sum().backward()
    model.weight.grad[0, 0] = float("inf")
    stepped, norm = apply_update(model, opt, 1.0)
    assert not stepped and not math.isfinite(norm)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters()) and not opt.state
    model(torch.randn(2, 4)).sum().backward()
    stepped, norm = apply_update(model, opt, 1.0)
    assert stepped and math.isfinite(norm) and not torch.equal(before[0], model.weight)
