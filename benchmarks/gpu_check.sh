#!/usr/bin/env bash
# The one prepared GPU check (about 7 minutes on one H200): the kernels on CUDA against the float64
# reference, `pytest benchmarks/` at Qwen3-8B shapes (H=4096, V=151936, bf16, N in 2048/8192/16384),
# the CUDA-IPC bucket handle crossing into a process that sees only this GPU, a short training smoke
# run, and the memory rehearsal (a Qwen3-1.7B-shaped pair, two steps, measured peak beside
# opcod.plan's). Prints one table at the end. The device image has no vLLM: the engines are `hf`.
# Run from the repository root; optional wheels (liger-kernel) may be carried in .whl/, and a built
# demo cache (OPCOD_CACHE) saves the smoke run from building its students first.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu_check}; mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# opcod and opcod_kernels are imported from the checkout without pip (the device has no registry).
export PYTHONPATH="$PWD:$PWD/kernels:${PYTHONPATH:-}"

date -u +"%Y-%m-%d %H:%M UTC" | tee "$out/gpu.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"

echo "== kernels vs float64 reference on CUDA"
timeout 150 python3 -m pytest tests/test_kernels.py -q -x -p no:cacheprovider 2>&1 | tee "$out/kernels.log" | tail -3

echo "== benchmarks at Qwen3-8B shapes"
timeout 270 python3 -m pytest benchmarks/ -q -p no:cacheprovider 2>&1 | tee "$out/bench.log" \
  | sed -n '/fused_linear_jsd fwd+bwd/,/Peak = memory/p'

if [ -f opcod/train.py ] && [ -f benchmarks/gpu_smoke.yaml ]; then
  echo "== training smoke run"
  timeout 150 torchrun --nproc_per_node=1 -m opcod.train --config benchmarks/gpu_smoke.yaml \
    output_dir="$out/runs" 2>&1 | tee "$out/smoke.log" | tail -15
fi

echo "== CUDA-IPC bucket handle"
timeout 60 python3 benchmarks/ipc_check.py 2>&1 | tee "$out/ipc.log" | tail -1

echo "== memory rehearsal"
timeout 240 python3 benchmarks/memory_rehearsal.py "$out/rehearsal" 2>&1 | tee "$out/rehearsal.log" | tail -30

echo "== summary ($SECONDS s)"
if [ -f "$out/runs/gpu_smoke/metrics.jsonl" ]; then
  python3 - "$out/runs/gpu_smoke/metrics.jsonl" <<'PY'
import json, sys
steps = [json.loads(l) for l in open(sys.argv[1]) if '"kind": "step"' in l]
rates = [s["sync_gb_s"] for s in steps if s["sync_gb_s"]]
print(f"smoke run: {len(steps)} steps, mean step {sum(s['times']['step'] for s in steps) / max(1, len(steps)):.2f} s, "
      f"weight sync {sum(rates) / max(1, len(rates)):.2f} GB/s ({steps[0]['sync_bytes'] if steps else 0} bytes)")
PY
fi
grep -E "passed|failed" "$out/kernels.log" | tail -1
grep "ipc bucket:" "$out/ipc.log" || echo "ipc bucket: no result"
grep "memory rehearsal:" "$out/rehearsal.log" || echo "memory rehearsal: no result"
sed -n '/fused_linear_jsd fwd+bwd/,/Peak = memory/p' "$out/bench.log"
