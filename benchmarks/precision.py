"""Prints fused_linear_jsd's relative error against float64 for each input dtype (docs/kernels.md).

python benchmarks/precision.py [--n 256 --h 64 --v 32768 --backend auto]

For fp32, bf16 and fp16 inputs (fp16 also under a GradScaler-style loss scale of 2^16, the gradients
divided by it in float64 afterwards), and fp32 weights under torch.autocast(bfloat16): the loss, dH and dW
of the fused op against the float64 reference, (a) on the same inputs as the op saw (its own error:
fp32 rows, one rounding of the gradients into the input dtype) and (b) on the fp32 inputs before
they were rounded (what the precision of the inputs costs on top). Worst over beta in {0, 0.5, 1}
and over three regimes: an independent teacher, a teacher near the student (self-distillation) and
logits of magnitude 100+."""
import argparse

import torch

import opcod_kernels as K


def rel(out, ref):
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm()).item()


def regime(name, n, h, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = 40.0 if name == "large logits" else 1.0
    hs = torch.randn(n, h, generator=g) * scale
    ht = torch.randn(n, h, generator=g) * scale if name == "independent" else \
        hs + (0.03 if name == "large logits" else 0.02) * scale * torch.randn(n, h, generator=g)
    W = torch.randn(v, h, generator=g) / h ** 0.5
    return hs, ht, W


def run(hs, ht, W, beta, dtype, backend, scale=1.0):
    """(fused loss, dH, dW) for inputs in `dtype` ("autocast": fp32 tensors inside bf16 autocast)."""
    cast = torch.float32 if dtype == "autocast" else dtype
    a = hs.to(cast).detach().requires_grad_()
    Wa = W.to(cast).detach().requires_grad_()
    if dtype == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = K.fused_linear_jsd(a, ht, Wa, beta=beta, backend=backend)
    else:
        out = K.fused_linear_jsd(a, ht.to(cast), Wa, beta=beta, backend=backend)
    (out * scale).backward()
    return out.detach(), a.grad.double() / scale, Wa.grad.double() / scale


def reference(hs, ht, W, beta):
    b = hs.double().requires_grad_()
    Wb = W.double().requires_grad_()
    out = K.reference_fused_linear_jsd(b, ht.double(), Wb, beta=beta)
    out.backward()
    return out.detach(), b.grad, Wb.grad


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--h", type=int, default=64)
    p.add_argument("--v", type=int, default=32768)
    p.add_argument("--backend", default="auto")
    args = p.parse_args()
    print(f"fused_linear_jsd vs float64: N={args.n}, H={args.h}, V={args.v}, backend={args.backend}, "
          f"torch {torch.__version__}; worst over beta in (0, 0.5, 1)")
    print(f"{'inputs':<17} {'regime':<14} {'own: loss':>10} {'dH':>9} {'dW':>9}  "
          f"{'vs fp32 inputs: loss':>20} {'dH':>9} {'dW':>9}")
    rounding = {torch.float32: lambda t: t, torch.bfloat16: lambda t: t.bfloat16(), torch.float16: lambda t: t.half(),
                "autocast": lambda t: t.bfloat16()}
    for dtype, scale in ((torch.float32, 1.0), (torch.bfloat16, 1.0), (torch.float16, 1.0),
                         (torch.float16, 2.0 ** 16), ("autocast", 1.0)):
        for name in ("independent", "near teacher", "large logits"):
            hs, ht, W = regime(name, args.n, args.h, args.v)
            own, total = [0.0] * 3, [0.0] * 3
            for beta in (0.0, 0.5, 1.0):
                got = run(hs, ht, W, beta, dtype, args.backend, scale)
                r = rounding[dtype]
                same = reference(r(hs).float(), r(ht).float(), r(W).float(), beta)
                exact = reference(hs, ht, W, beta)
                own = [max(x, rel(o, s)) for x, o, s in zip(own, got, same)]
                total = [max(x, rel(o, e)) for x, o, e in zip(total, got, exact)]
            label = "fp32 W, autocast" if dtype == "autocast" else str(dtype).replace("torch.", "")
            label += " x2^16" if scale != 1.0 else ""
            print(f"{label:<17} {name:<14} {own[0]:>10.1e} {own[1]:>9.1e} {own[2]:>9.1e}  "
                  f"{total[0]:>20.1e} {total[1]:>9.1e} {total[2]:>9.1e}")


if __name__ == "__main__":
    main()
