#!/usr/bin/env bash
# The Python packages the GPU checks need that the lent H200's image lacks (its package list is in the device tool's
# KINDS.md: torch, transformers, sentencepiece, tokenizers, safetensors, Pillow are there; soundfile, which the
# training checks' synthetic audio needs, is not), as wheels for its Python 3.12, into .whl/ (.gitignore has it).
# run_gpu.sh installs whatever is in .whl/ before it starts. Run this here, once, then carry .whl:
#   bash benchmarks/gpu_wheels.sh
#   device run: command "bash benchmarks/run_gpu.sh", carry [".whl"], timeout_s 600
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
ls .whl
