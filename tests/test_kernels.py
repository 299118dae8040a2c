"""fused_linear_jsd and jsd on every backend against the float64 reference."""
import pytest
import torch

import opcod_kernels as K

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "cpp", "triton"] if DEVICE == "cpu" else ["torch", "triton"]
BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
N, H, V = 37, 24, 2500  # N not a multiple of the chunk (8); V not a multiple of any block


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def make(seed, dtype=torch.float32, teacher="random", scale=1.0, Ht=None):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H, generator=g) * scale
    W = torch.randn(V, H, generator=g) / H ** 0.5
    if teacher == "close":
        ht = hs + 0.02 * scale * torch.randn(N, H, generator=g)
    elif teacher == "random":
        ht = torch.randn(N, Ht or H, generator=g) * scale
    tw = (torch.rand(N, generator=g) > 0.3).float()
    tw[3] = 0.0
    return [t.to(DEVICE, dtype) for t in (hs, ht, W)] + [tw.to(DEVICE)]


def run_both(hs, ht, W, tw, backend, Wt=None, upstream=None, **kw):
    a = hs.clone().requires_grad_()
    Wa = W.clone().requires_grad_()
    out = K.fused_linear_jsd(a, ht, Wa, Wt, token_weights=tw, chunk_size=8, backend=backend, **kw)
    (out if upstream is None else (out * upstream).sum()).backward()
    b = hs.double().requires_grad_()
    Wb = W.double().requires_grad_()
    ref = K.reference_fused_linear_jsd(b, ht.double(), Wb, None if Wt is None else Wt.double(),
                                       token_weights=tw.double(), **kw)
    (ref if upstream is None else (ref * upstream.double()).sum()).backward()
    return (out, a.grad, Wa.grad), (ref, b.grad, Wb.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
def test_matches_float64_reference(backend, beta):
    hs, ht, W, tw = make(1)
    got, ref = run_both(hs, ht, W, tw, backend, beta=beta,
                        student_temperature=1.3, teacher_temperature=0.7)
    for name, o, r in zip(("loss", "dH", "dW"), got, ref):
        assert rel_err(o, r) <= 1e-4, (name, rel_err(o, r))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
def test_teacher_close_to_student(backend, beta):
    hs, ht, W, tw = make(2, teacher="close")
    got, ref = run_both(hs, ht, W, tw, backend, beta=beta)
    assert ref[0].item() < 1e-2  # the self-distillation regime: a tiny loss
    for name, o, r in zip(("loss", "dH", "dW"), got, ref):
        assert rel_err(o, r) <= 1e-3, (name, rel_err(o, r))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
def test_large_logits(backend, beta):
    # Logits of magnitude 100+ with overlapping distributions (disjoint ones have ~zero gradient).
    hs, ht, W, tw = make(3, teacher="close", scale=40.0)
    g = torch.Generator().manual_seed(33)
    ht = hs + 0.03 * 40.0 * torch.randn(hs.shape, generator=g).to(DEVICE)
    assert (hs @ W.T).abs().max() > 100
    got, ref = run_both(hs, ht, W, tw, backend, beta=beta)
    for name, o, r in zip(("loss", "dH", "dW"), got, ref):
        assert torch.isfinite(o).all()
        assert rel_err(o, r) <= 1e-4, (name, rel_err(o, r))
    # Against the same fp32 logits, the row math alone is far tighter than the GEMM's rounding.
    zs = (hs @ W.T).double().requires_grad_()
    K.reference_jsd(zs, (ht @ W.T).double(), beta=beta, token_weights=tw.double()).backward()
    assert rel_err(got[1], zs.grad @ W.double()) <= 2e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_bf16(backend, beta):
    hs, ht, W, tw = make(4, dtype=torch.bfloat16)
    got, ref = run_both(hs, ht, W, tw, backend, beta=beta)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    for name, o, r in zip(("loss", "dH", "dW"), got, ref):
        assert rel_err(o, r) <= 2e-2, (name, rel_err(o, r))


@pytest.mark.parametrize("backend", BACKENDS)
def test_separate_teacher_weight(backend):
    hs, ht, W, tw = make(5, Ht=16)
    Wt = (torch.randn(V, 16) / 4).to(DEVICE).requires_grad_()
    htg = ht.clone().requires_grad_()
    got, ref = run_both(hs, htg, W, tw, backend, Wt=Wt, beta=0.5)
    for name, o, r in zip(("loss", "dH", "dW"), got, ref):
        assert rel_err(o, r) <= 1e-4, (name, rel_err(o, r))
    assert htg.grad is None and Wt.grad is None  # the teacher is stop-gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_into_teacher_when_sharing_weight(backend):
    hs, ht, W, tw = make(6)
    ht.requires_grad_()
    a = hs.clone().requires_grad_()
    K.fused_linear_jsd(a, ht, W, backend=backend).backward()
    assert ht.grad is None and a.grad is not None and W.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(backend, reduction):
    hs, ht, W, tw = make(7)
    upstream = torch.randn(N, device=DEVICE) if reduction == "none" else None
    got, ref = run_both(hs, ht, W, tw, backend, beta=0.5, reduction=reduction, upstream=upstream)
    if reduction == "none":
        assert got[0].shape == (N,) and got[0][3] == 0
    for name, o, r in zip(("loss", "dH", "dW"), got, ref):
        assert rel_err(o, r) <= 1e-4, (name, rel_err(o, r))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bool_weights_and_fully_masked_batch(backend):
    hs, ht, W, tw = make(8)
    got, ref = run_both(hs, ht, W, tw.bool(), backend, beta=0.5)
    assert rel_err(got[0], ref[0]) <= 1e-4
    a = hs.clone().requires_grad_()
    Wa = W.clone().requires_grad_()
    out = K.fused_linear_jsd(a, ht, Wa, token_weights=torch.zeros(N, device=DEVICE), backend=backend)
    out.backward()
    assert torch.isfinite(out) and out.item() == 0.0
    assert a.grad.abs().max() == 0 and Wa.grad.abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_on_logits(backend, beta):
    g = torch.Generator().manual_seed(9)
    zs = (torch.randn(N, V, generator=g) * 3).to(DEVICE)
    zt = (torch.randn(N, V, generator=g) * 3).to(DEVICE)
    a = zs.clone().requires_grad_()
    out = K.jsd(a, zt, beta=beta, student_temperature=0.9, teacher_temperature=1.1, backend=backend)
    out.backward()
    b = zs.double().requires_grad_()
    ref = K.reference_jsd(b, zt.double(), beta=beta, student_temperature=0.9, teacher_temperature=1.1)
    ref.backward()
    assert rel_err(out, ref) <= 1e-4 and rel_err(a.grad, b.grad) <= 1e-4


def test_module_matches_function():
    hs, ht, W, tw = make(10)
    loss_fn = K.FusedLinearJSD(beta=0.3, student_temperature=2.0)
    assert "beta=0.3" in repr(loss_fn)
    a = loss_fn(hs, ht, W, token_weights=tw)
    b = K.fused_linear_jsd(hs, ht, W, beta=0.3, student_temperature=2.0, token_weights=tw)
    assert torch.equal(a, b)


def test_default_chunk_is_bounded_and_divides_nicely():
    assert K.default_chunk_size(10, 151936, torch.device("cpu")) == 10
    c = K.default_chunk_size(100000, 151936, torch.device("cpu"))
    assert c % 64 == 0 and c * 151936 * 8 <= (1 << 29)


@pytest.mark.parametrize("kwargs, name", [
    (dict(beta=1.5), "beta"), (dict(beta=-0.1), "beta"),
    (dict(student_temperature=0.0), "student_temperature"),
    (dict(teacher_temperature=-1.0), "teacher_temperature"),
    (dict(reduction="avg"), "reduction"), (dict(backend="cuda"), "backend"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(token_weights=torch.ones(5)), "token_weights"),
    (dict(token_weights=torch.ones(N, dtype=torch.int64)), "token_weights"),
])
def test_bad_arguments_name_themselves(kwargs, name):
    hs, ht, W, _ = [t.cpu() for t in make(11)]
    with pytest.raises(ValueError, match=name):
        K.fused_linear_jsd(hs, ht, W, **kwargs)


def test_bad_tensors_name_themselves():
    hs, ht, W, _ = [t.cpu() for t in make(12)]
    with pytest.raises(ValueError, match="teacher_hidden"):
        K.fused_linear_jsd(hs, ht[:5], W)
    with pytest.raises(ValueError, match="weight"):
        K.fused_linear_jsd(hs, ht, W[:, :5])
    with pytest.raises(ValueError, match="student_hidden"):
        K.fused_linear_jsd(hs.long(), ht, W)
    with pytest.raises(ValueError, match="teacher_weight"):
        K.fused_linear_jsd(hs, ht, W, W[0])
    with pytest.raises(ValueError, match="student_hidden"):
        K.fused_linear_jsd(hs[None], ht, W)
    with pytest.raises(ValueError, match="device"):
        K.fused_linear_jsd(hs, ht.to("meta"), W)
    with pytest.raises(ValueError, match="teacher_logits"):
        K.jsd(torch.randn(4, 10), torch.randn(5, 10))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_linear_logprobs_against_float64(dtype, tol):
    hs, _, W, _ = make(13, dtype=dtype)
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    a, Wa = hs.clone().requires_grad_(), W.clone().requires_grad_()
    out = K.fused_linear_logprobs(a, Wa, targets, temperature=0.8, chunk_size=8)
    (out * upstream).sum().backward()
    b, Wb = hs.double().requires_grad_(), W.double().requires_grad_()
    ref = K.reference_logprobs(b, Wb, targets, temperature=0.8)
    (ref * upstream.double()).sum().backward()
    for name, o, r in (("logp", out, ref), ("dH", a.grad, b.grad), ("dW", Wa.grad, Wb.grad)):
        assert rel_err(o, r) <= tol, (name, rel_err(o, r))
    with pytest.raises(ValueError, match="targets"):
        K.fused_linear_logprobs(hs, W, targets.int())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_row_kernel_writes_low_precision_gradient_into_grad_out(backend, beta):
    # The chunk loop hands bf16 weights a bf16 gradient buffer; it must hold the fp32 gradient
    # rounded once (within one bf16 ulp: Triton's interpreter truncates, CUDA rounds to nearest).
    from opcod_kernels.fused import _rows_fn
    g = torch.Generator().manual_seed(7)
    zs = (torch.randn(9, V, generator=g) * 3).to(DEVICE)
    zt = (torch.randn(9, V, generator=g) * 3).to(DEVICE)
    scale = torch.rand(9, generator=g).to(DEVICE)
    scale[2] = 0.0
    rows = _rows_fn(backend, torch.device(DEVICE))
    ref_grad, ref_loss = zs.clone(), torch.empty(9, device=DEVICE)
    rows(ref_grad, zt, scale, ref_loss, 1.0, 1.0, beta, True)
    out = torch.full((9, V), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    loss = torch.empty(9, device=DEVICE)
    rows(zs.clone(), zt, scale, loss, 1.0, 1.0, beta, True, grad_out=out)
    assert torch.equal(loss, ref_loss)
    assert not out.isnan().any()
    assert ((out.float() - ref_grad).abs() <= ref_grad.abs() * 2.0 ** -7).all()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-3)])
def test_fused_linear_logprobs_with_a_bias(dtype, tol):
    hs, _, W, _ = make(14, dtype=dtype)
    g = torch.Generator().manual_seed(14)
    bias = torch.randn(V, generator=g).to(DEVICE, dtype)
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    upstream = torch.randn(N, generator=g).to(DEVICE)
    a, Wa, ba = (t.clone().requires_grad_() for t in (hs, W, bias))
    out = K.fused_linear_logprobs(a, Wa, targets, temperature=0.8, chunk_size=8, bias=ba)
    (out * upstream).sum().backward()
    b, Wb, bb = (t.double().requires_grad_() for t in (hs, W, bias))
    ref = K.reference_logprobs(b, Wb, targets, temperature=0.8, bias=bb)
    (ref * upstream.double()).sum().backward()
    assert ba.grad.dtype == dtype
    for name, o, r in (("logp", out, ref), ("dH", a.grad, b.grad), ("dW", Wa.grad, Wb.grad), ("db", ba.grad, bb.grad)):
        assert rel_err(o, r) <= tol, (name, rel_err(o, r))
