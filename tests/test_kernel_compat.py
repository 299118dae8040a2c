"""opcod_kernels.compat against a float64 re-statement of Liger-Kernel's fused linear JSD losses, on
Liger's own kinds of cases: shapes, fp32/bf16, biases, betas, temperatures, hard/soft weights,
ignore_index, fully ignored batches and AMP. liger-kernel itself is not needed."""
import math

import pytest
import torch
import torch.nn.functional as F

import opcod_kernels as K
from opcod_kernels.compat import LigerFusedLinearJSD, LigerFusedLinearJSDLoss


def rel_err(out, ref):
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def liger_divergence(s, t, beta):
    """Liger's generalized JSD per row from log-probs (s student, t teacher), in their dtype."""
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.log((1 - beta) * s.exp() + beta * t.exp())
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


def chunked_reference(hs, Ws, ht, Wt, labels, bs, bt, *, weight_hard_loss, weight_soft_loss, beta, ignore_index,
                      temperature):
    """Liger's chunked-loss LigerFusedLinearJSDLoss, restated in plain torch (pass float64)."""
    zs = hs @ Ws.T + (0 if bs is None else bs)
    zt = ht @ Wt.T + (0 if bt is None else bt)
    mask = labels != ignore_index
    n = mask.sum().clamp_min(1)
    hard = F.cross_entropy(zs, labels, ignore_index=ignore_index, reduction="sum") / n
    if zt.shape[1] > zs.shape[1]:  # a padded teacher vocabulary: the student's logits padded with 0
        zs = F.pad(zs, (0, zt.shape[1] - zs.shape[1]))
    rows = liger_divergence(torch.log_softmax(zs / temperature, -1), torch.log_softmax(zt / temperature, -1), beta)
    soft = (rows * mask).sum() / n
    return weight_hard_loss * hard + weight_soft_loss * soft, soft, hard


def make(B, T, H, V, dtype, bias, seed=0, Vt=None):
    """Liger's test inputs: uniform [0, 1) hidden states and weights, a student half the teacher's width."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.rand(B * T, H // 2, generator=g).to(dtype)
    ht = torch.rand(B * T, H, generator=g).to(dtype)
    Ws = torch.rand(V, H // 2, generator=g).to(dtype)
    Wt = torch.rand(Vt or V, H, generator=g).to(dtype)
    bs = torch.rand(V, generator=g).to(dtype) if bias else None
    bt = torch.rand(Vt or V, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, V, (B * T,), generator=g)
    return hs, Ws, ht, Wt, labels, bs, bt


def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def run_chunked(case, **kw):
    hs, Ws, ht, Wt, labels, bs, bt = case
    a, Wa, ba = leaf(hs), leaf(Ws), leaf(bs)
    loss, soft, hard = LigerFusedLinearJSDLoss(return_soft_hard_loss=True, **kw)(a, Wa, ht, Wt, labels, ba, bt)
    loss.backward()
    b, Wb, bb = leaf(hs.double()), leaf(Ws.double()), leaf(None if bs is None else bs.double())
    ref = chunked_reference(b, Wb, ht.double(), Wt.double(), labels, bb, None if bt is None else bt.double(), **kw)
    ref[0].backward()
    got = {"loss": loss, "soft": soft, "hard": hard, "dH": a.grad, "dW": Wa.grad,
           "db": None if ba is None else ba.grad}
    want = {"loss": ref[0], "soft": ref[1], "hard": ref[2], "dH": b.grad, "dW": Wb.grad,
            "db": None if bb is None else bb.grad}
    return got, want


TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("B, T, H, V", [(2, 16, 128, 512), (3, 47, 31, 123)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("temperature, weight_hard_loss, weight_soft_loss, beta",
                         [(1.0, 0.5, 0.5, 0.5), (2.0, 0.0, 1.0, 0.8), (0.5, 1.0, 0.0, 0.2), (1.0, 0.3, 0.7, 0.0),
                          (1.0, 0.3, 0.7, 1.0)])
@pytest.mark.parametrize("ignore_index", [-100, 42])
def test_chunked_loss_signature_matches_liger_math(B, T, H, V, dtype, bias, temperature, weight_hard_loss,
                                                   weight_soft_loss, beta, ignore_index):
    case = make(B, T, H, V, dtype, bias, seed=B * T + V)
    labels = case[4]
    labels[torch.randperm(B * T, generator=torch.Generator().manual_seed(1))[:B * T // 3]] = ignore_index
    got, want = run_chunked(case, temperature=temperature, weight_hard_loss=weight_hard_loss,
                            weight_soft_loss=weight_soft_loss, beta=beta, ignore_index=ignore_index)
    for name in got:
        if got[name] is None or (name == "hard" and weight_hard_loss == 0):
            continue
        if name == "dH" and not (weight_hard_loss or weight_soft_loss):
            continue
        assert got[name].dtype == (torch.float32 if name in ("loss", "soft", "hard") else dtype), name
        assert rel_err(got[name], want[name]) <= TOL[dtype], (name, rel_err(got[name], want[name]))


def test_chunked_loss_with_every_row_ignored_is_zero_with_zero_gradients():
    case = make(2, 8, 32, 100, torch.float32, bias=True)
    case[4].fill_(42)
    got, want = run_chunked(case, temperature=1.0, weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5,
                            ignore_index=42)
    assert got["loss"].item() == 0.0 and want["loss"].item() == 0.0
    assert not got["dH"].any() and not got["dW"].any() and not got["db"].any()


def test_chunked_loss_pads_the_students_logits_with_zeros_like_liger():
    """A teacher head padded past the student's vocabulary: Liger pads the student's logits with 0."""
    case = make(2, 9, 32, 100, torch.float32, bias=True, Vt=128)
    got, want = run_chunked(case, temperature=1.5, weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5,
                            ignore_index=-100)
    assert got["dW"].shape == (100, 16) and got["db"].shape == (100,)
    for name in got:
        assert rel_err(got[name], want[name]) <= 1e-4, name
    hs, Ws, ht, Wt, labels, bs, bt = case
    with pytest.raises(ValueError, match="student_weight"):
        LigerFusedLinearJSDLoss()(hs, torch.cat([Ws, Ws[:40]]), ht, Wt, labels)


@pytest.mark.parametrize("beta", [0.1, 0.2, 0.8])
def test_ligers_beta_is_ours_and_trls(beta):
    """Liger's beta weighs KL(P||M) with M = beta P + (1 - beta) Q: the same number as our (TRL's)
    convention with the same beta, and not with 1 - beta (nor Liger 0.5.3-0.5.5's swapped mixture)."""
    hs, Ws, ht, Wt, labels, _, _ = make(2, 8, 32, 200, torch.float32, bias=False, seed=3)
    ours = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta)(hs, Ws, ht, Wt, labels)
    zs, zt = hs.double() @ Ws.double().T, ht.double() @ Wt.double().T
    same = K.reference_jsd(zs, zt, beta=beta)
    flipped = K.reference_jsd(zs, zt, beta=1 - beta)
    s, t = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    m_old = torch.log(beta * s.exp() + (1 - beta) * t.exp())
    old = (beta * (t.exp() * (t - m_old)).sum(-1) + (1 - beta) * (s.exp() * (s - m_old)).sum(-1)).mean()
    assert rel_err(ours, same) <= 1e-5
    assert rel_err(ours, flipped) > 1e-2 and rel_err(ours, old) > 1e-2


def transformers_reference(hs, Ws, ht, Wt, labels, *, beta, ignore_index, temperature):
    """Liger's transformers LigerFusedLinearJSD, restated: the masked mean of the generalized JSD."""
    s = torch.log_softmax((hs @ Ws.T) / temperature, -1)
    t = torch.log_softmax((ht @ Wt.T) / temperature, -1)
    rows = liger_divergence(s, t, beta)
    if labels is None:
        return rows.mean()
    mask = labels != ignore_index
    return (rows * mask).sum() / mask.sum().clamp_min(1)


def run_transformers(hs, Ws, ht, Wt, labels, amp=None, **kw):
    a, Wa = leaf(hs), leaf(Ws)
    loss_fn = LigerFusedLinearJSD(jsd_beta=kw["beta"], ignore_index=kw["ignore_index"], temperature=kw["temperature"])
    if amp is None:
        out = loss_fn(a, Wa, ht, Wt, labels)
    else:
        with torch.autocast("cpu", dtype=amp):
            out = loss_fn(a, Wa, ht, Wt, labels)
    out.backward()
    # Under AMP the reference sees what autocast computes on: the operands rounded to its dtype.
    rnd = (lambda t: t.to(amp).double()) if amp is not None else (lambda t: t.double())
    b, Wb = leaf(rnd(hs)), leaf(rnd(Ws))
    ref = transformers_reference(b, Wb, rnd(ht), rnd(Wt), labels, **kw)
    ref.backward()
    return (out, a.grad, Wa.grad), (ref, b.grad, Wb.grad)


@pytest.mark.parametrize("B, T, H, V", [(2, 2, 8, 8), (4, 23, 167, 1423)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature, beta", [(1.0, 0.5), (2.0, 0.1), (1.0, 0.0), (1.0, 1.0)])
@pytest.mark.parametrize("labels", ["none", "ignore -100", "ignore 42", "all ignored"])
def test_transformers_signature_matches_liger_math(B, T, H, V, dtype, temperature, beta, labels):
    hs, Ws, ht, Wt, y, _, _ = make(B, T, H, V, dtype, bias=False, seed=V)
    ignore_index = 42 if labels == "ignore 42" else -100
    if labels == "none":
        y = None
    elif labels == "all ignored":
        y.fill_(ignore_index)
    else:
        y[::3] = ignore_index
    got, want = run_transformers(hs, Ws, ht, Wt, y, beta=beta, ignore_index=ignore_index, temperature=temperature)
    if labels == "all ignored":
        assert got[0].item() == 0.0 and not got[1].any() and not got[2].any()
        return
    for name, o, r in zip(("loss", "dH", "dW"), got, want):
        assert o.dtype == (torch.float32 if name == "loss" else dtype)
        assert rel_err(o, r) <= TOL[dtype], (name, rel_err(o, r))


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_transformers_signature_under_amp(amp):
    """Liger's test_amp: fp32 heads, inputs in the autocast dtype, the loss inside torch.autocast."""
    hs, Ws, ht, Wt, y, _, _ = make(2, 4, 256, 320, torch.float32, bias=False, seed=5)
    y[1] = -100
    got, want = run_transformers(hs.to(amp), Ws, ht.to(amp), Wt, y, amp=amp, beta=0.5, ignore_index=-100,
                                 temperature=1.0)
    assert got[1].dtype == amp and got[2].dtype == torch.float32
    tol = {"loss": 1e-5, "dH": 2 ** -7 if amp == torch.bfloat16 else 2 ** -10, "dW": 1e-5}
    for name, o, r in zip(("loss", "dH", "dW"), got, want):
        assert rel_err(o, r) <= tol[name], (name, rel_err(o, r))


def test_liger_modules_keep_their_defaults_and_argument_order():
    import inspect
    assert list(inspect.signature(LigerFusedLinearJSDLoss.forward).parameters) == [
        "self", "student_input", "student_weight", "teacher_input", "teacher_weight", "true_labels",
        "student_bias", "teacher_bias"]
    defaults = {k: p.default for k, p in inspect.signature(LigerFusedLinearJSDLoss.__init__).parameters.items()}
    assert defaults == {"self": inspect.Parameter.empty, "weight_hard_loss": 0.5, "weight_soft_loss": 0.5,
                        "beta": 0.5, "ignore_index": -100, "temperature": 1.0, "compiled": True,
                        "chunk_size": 1024, "return_soft_hard_loss": False}
    assert list(inspect.signature(LigerFusedLinearJSD.forward).parameters) == [
        "self", "student_input", "student_weight", "teacher_input", "teacher_weight", "shift_labels"]
    assert math.isclose(LigerFusedLinearJSD().jsd_beta, 0.5)
