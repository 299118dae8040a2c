#!/usr/bin/env bash
# The one prepared GPU check (sized for 8 minutes on one H100 or H200; every stage has a time limit)
# and its CPU rehearsal. Stages: the kernels against the float64 reference and `pytest benchmarks/`
# at Qwen3-8B shapes (fused vs its GEMMs, naive, Liger chunked and Liger Triton); a random
# Qwen3-8B-shaped bf16 model (399 tensors, 16.4 GB) pushed twice through the real bucket protocol
# over CUDA IPC into a spawned receiver running the engines' receiving code, bit-equal, with GB/s,
# and a delayed receiver with and without the synchronisation of issue 29.1; FSDP2 at Qwen3-8B width
# (4 layers, full vocabulary, bf16 mixed precision, activation checkpointing, the fused loss) through
# one OPCoD update step, each phase's measured peak beside opcod.plan's for the same config.json,
# the optimizer-state offload round trip, checkpoint save/load and the HF export. Prints one table.
#
#   bash benchmarks/gpu_check.sh            on a GPU machine (torch, triton, transformers; no vLLM,
#                                           no pip registry: opcod is imported from the checkout)
#   bash benchmarks/gpu_check.sh --smoke    every stage on the CPU at toy shapes (CI runs this)
#
# OUT (default /tmp/gpu_check) receives the logs and each stage's JSON; GPU_CHECK_TMP the stage's
# scratch files (the FSDP stage writes ~30 GB there on a GPU). Optional wheels (liger-kernel) may be
# carried in .whl/. PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0
[ "${1:-}" = "--smoke" ] && smoke=1
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
rm -f "$out"/{env.txt,kernels.log,bench.json,ipc.json,fsdp.json}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# opcod and opcod_kernels are imported from the checkout without pip (the device has no registry).
export PYTHONPATH="$PWD:$PWD/kernels:${PYTHONPATH:-}"

if [ $smoke = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""          # the rehearsal runs on the CPU even on a GPU machine
  flag=--smoke
  # Kernel table at toy shapes; the kernel tests without the Triton interpreter's slow cases.
  export OPCOD_BENCH_H=64 OPCOD_BENCH_V=4096 OPCOD_BENCH_N=256
  kernel_tests=(-k "not triton")
  limits=(120 180 180 240)
else
  flag=
  kernel_tests=()
  limits=(80 180 60 150)                  # kernels, benchmarks, ipc, fsdp: 470 s at most
fi

{ date -u +"%Y-%m-%d %H:%M UTC"
  if [ $smoke = 1 ]; then echo "smoke: CPU, toy shapes"; else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"; fi
  "$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

echo "== kernels vs float64 reference ($SECONDS s)"
timeout "${limits[0]}" "$py" -m pytest tests/test_kernels.py -q -x -p no:cacheprovider "${kernel_tests[@]}" \
  > "$out/kernels.log" 2>&1
tail -1 "$out/kernels.log"

echo "== kernel benchmarks ($SECONDS s)"
OPCOD_BENCH_JSON="$out/bench.json" timeout "${limits[1]}" "$py" -m pytest benchmarks/ -q -p no:cacheprovider \
  > "$out/bench.log" 2>&1
tail -1 "$out/bench.log"

echo "== CUDA-IPC push ($SECONDS s)"
timeout "${limits[2]}" "$py" benchmarks/gpu_check.py ipc --out "$out" $flag > "$out/ipc.log" 2>&1
tail -1 "$out/ipc.log"

echo "== FSDP2 at Qwen3-8B width ($SECONDS s)"
timeout "${limits[3]}" "$py" benchmarks/gpu_check.py fsdp --out "$out" $flag > "$out/fsdp.log" 2>&1
tail -1 "$out/fsdp.log"

echo
"$py" benchmarks/gpu_check.py table --out "$out" --seconds "$SECONDS"
