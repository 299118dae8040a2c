"""Collects every benchmark's time and memory and prints them as one table with the ratios."""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

RESULTS = {}  # (n, impl) -> {"ms": float, "mib": float}


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    from impls import DEVICE, DTYPE, H, V, grad_bytes
    if os.environ.get("OPCOD_BENCH_JSON"):  # benchmarks/gpu_check.sh puts these rows in its table
        rows = [{"n": n, "impl": impl, "ms": r.get("ms"), "mib": r.get("mib")} for (n, impl), r in RESULTS.items()]
        Path(os.environ["OPCOD_BENCH_JSON"]).write_text(json.dumps(
            {"device": DEVICE, "dtype": str(DTYPE).removeprefix("torch."), "H": H, "V": V, "rows": rows}))
    w = terminalreporter
    w.section(f"fused_linear_jsd fwd+bwd: {DEVICE}, {DTYPE}, H={H}, V={V}")
    w.write_line(f"{'N':>6} {'impl':<14} {'time ms':>10} {'peak MiB':>10} {'x floor':>8} "
                 f"{'fused faster':>12} {'fused mem':>10} {'work MiB':>9}")
    for n in sorted({k[0] for k in RESULTS}):
        row = {impl: r for (m, impl), r in RESULTS.items() if m == n}
        floor = row.get("gemm_floor", {}).get("ms")
        fused = row.get("fused", {})
        for impl, r in row.items():
            ms, mib = r.get("ms"), r.get("mib")
            x_floor = f"{ms / floor:.2f}" if ms and floor else "-"
            speed = f"{ms / fused['ms']:.2f}x" if ms and fused.get("ms") and impl != "fused" else "-"
            mem = (f"{fused['mib'] / mib:.2f}" if mib and fused.get("mib") is not None
                   and impl not in ("fused", "gemm_floor") else "-")
            fmt = lambda v, p: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
            work = None if mib is None else mib - grad_bytes(n, impl) / 2**20
            w.write_line(f"{n:>6} {impl:<14} {fmt(ms, 1):>10} {fmt(mib, 0):>10} {x_floor:>8} "
                         f"{speed:>12} {mem:>10} {fmt(work, 0):>9}")
    w.write_line("x floor: time / the same GEMMs without the row kernel. fused faster: this time / "
                 "fused time. fused mem: fused peak / this peak. Peak = memory beyond the inputs; work = "
                 "peak - (dH + dW, plus our fp32 dW accumulator when inputs are bf16).")
