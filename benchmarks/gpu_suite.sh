#!/usr/bin/env bash
# The GPU benchmark suite (JSON lines on stdout, last line a summary): LoRA training ours vs HF Trainer +
# PEFT vs TRL SFTTrainer (padding-free) with MFU, QLoRA peak memory, serving at concurrency 64 vLLM vs HF
# generate, eval generation rows/s. Random-initialised Qwen2.5-0.5B / 7B shapes: nothing is downloaded.
#
#   benchmarks/gpu_suite.sh             # one CUDA GPU (sized for < 9 minutes on one H200)
#   benchmarks/gpu_suite.sh --dry-run   # the same code, tiny shapes, CPU (CI runs this)
#
# PYTHON: the training environment (default .venv/bin/python). LLMFT_VLLM_PYTHON: a Python with the model
# server's set (bentos/requirements-gpu.txt, vLLM); default .venv-serve/bin/python when it exists.
# LLMFT_SUITE_TIMEOUT: seconds before the whole run is stopped (default 540).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --signal=TERM "${LLMFT_SUITE_TIMEOUT:-540}" "$PYTHON" benchmarks/gpu_suite.py "$@"
