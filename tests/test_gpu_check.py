"""benchmarks/gpu_check.sh --smoke: the prepared GPU check runs every stage on the CPU at toy shapes
and prints its table with no failed row, so a renamed key or a moved function breaks CI, not the
few minutes of a lent GPU."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_gpu_check_smoke_runs_every_stage(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "GPU_CHECK_TMP": str(tmp_path),
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke"], capture_output=True,
                         text=True, timeout=900, env=env)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((tmp_path / "out").glob("*.log")))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:] + logs
    table = res.stdout[res.stdout.index("gpu_check: "):]
    rows = {}  # check -> (status, result): columns are separated by two spaces or more
    for line in table.splitlines()[3:]:
        if line.strip():
            check, status, result = re.split(r"\s{2,}", line.strip(), maxsplit=2)
            rows[check] = (status, result)
    for check in ("kernels vs float64 reference (pytest)", "ipc push 1", "ipc push 2 (perturbed)",
                  "delayed receiver, synchronized (the fix)", "delayed receiver, not synchronized (issue 29.1)",
                  "fsdp: one OPCoD update step", "fsdp student: plan vs measured", "fsdp teacher: plan vs measured",
                  "fsdp optimizer: plan vs measured", "fsdp sync: plan vs measured",
                  "optimizer state offload round trip", "checkpoint save/load", "HF export"):
        assert any(name.startswith(check) for name in rows), (check, table)
    assert any(name.startswith("kernel N=256 fused") for name in rows), table
    # The CPU stand-in for a delayed stream must show the race the synchronisation prevents:
    # otherwise the GPU run could not show it either.
    assert next(v for k, v in rows.items() if k.startswith("delayed receiver, not synchronized"))[0] == "shown"
    assert all(status in ("ok", "n/a", "info", "shown") for status, _ in rows.values()), table
