"""pytest-benchmark cases: fused_linear_jsd fwd+bwd against the naive materializing loss, Liger and
the GEMM floor, with peak memory; the summary table is printed at the end of the run."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import RESULTS
from impls import CUDA, HAS_LIGER, IMPLS, SIZES, make_inputs, peak_bytes

ROUNDS = {"naive": 2, "liger_chunked": 2, "naive_top100": 2} if not CUDA else {}


def _peak_mib(impl, n):
    if CUDA:
        return peak_bytes(impl, n) / 2**20
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("measure_memory.py")), impl, str(n)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 2**20


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_fwd_bwd(benchmark, impl, n):
    if impl.startswith("liger") and not HAS_LIGER:
        pytest.skip("liger-kernel is not installed: no Liger column (pip install liger-kernel)")
    if impl.startswith("naive") and CUDA and n > 8192:
        pytest.skip(f"naive at N={n} needs several [N, V] fp32 tensors; measured up to N=8192")
    inputs = make_inputs(n)
    fn = IMPLS[impl]
    sync = torch.cuda.synchronize if CUDA else (lambda: None)

    def run():
        fn(*inputs)
        sync()

    benchmark.group = f"N={n}"
    benchmark.pedantic(run, rounds=ROUNDS.get(impl, 3 if not CUDA else 10), iterations=1,
                       warmup_rounds=1)
    inputs.clear()  # free them before the memory probe
    mib = _peak_mib(impl, n)
    RESULTS[(n, impl)] = {"ms": benchmark.stats.stats.min * 1e3, "mib": mib}
