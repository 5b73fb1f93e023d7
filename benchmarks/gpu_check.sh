#!/usr/bin/env bash
# Every GPU check of kd_llm in one command (benchmarks/gpu_check.py): tiny-model trainer under bf16/fp16 on CUDA,
# fused vs dense loss memory at V=262,144, a KD step at SmolLM2-135M shapes, FSDP2 on one GPU.
# Results: benchmarks/results/gpu_check.json. Needs torch (CUDA), transformers, accelerate, safetensors; not
# datasets/evaluate, no network. Bounded at 8 minutes (timeout). --dry-run: the same on CPU at toy sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then  # the machine's python, or this checkout's venv when that one has no torch
    PYTHON=python
    if ! "$PYTHON" -c "import torch" 2>/dev/null && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" TOKENIZERS_PARALLELISM=false
exec timeout 470 "$PYTHON" benchmarks/gpu_check.py "$@"
