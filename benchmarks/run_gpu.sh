#!/usr/bin/env bash
# Every GPU measurement and check of this project in one go, for a lent GPU machine (one call, about 8 minutes on an
# H100). Logs go to $OUT (or ./gpu-out). The README's GPU rows come from this script's output.
#   bash benchmarks/run_gpu.sh
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
step() {  # name, limit in seconds, command...
    local name=$1 limit=$2; shift 2
    echo "=== $name"
    timeout "$limit" "$@" 2>&1 | grep --line-buffered -v "it/s]\|s/it]" | tee "$OUT/$name.txt"
}
step gpu_step_ckpt_b8 120 python3 benchmarks/bench_gpu_step.py
step gpu_step_ckpt_b32 100 python3 benchmarks/bench_gpu_step.py --batch 32
step gpu_step_ckpt_b8_compiled 150 python3 benchmarks/bench_gpu_step.py --compile
step gpu_step_ckpt_b32_compiled 120 python3 benchmarks/bench_gpu_step.py --compile --batch 32
step gpu_step_nockpt_b32 100 python3 benchmarks/bench_gpu_step.py --no-checkpointing --batch 32
step llama_7b_layers 150 python3 benchmarks/bench_llama.py --size 7b-layers --batch 8 --seq 512 --repeats 10
step audio 100 python3 benchmarks/bench_audio.py --repeats 5
step gpu_checks 180 python3 benchmarks/gpu_checks.py --out "$OUT"
