#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with the wheels the GPU check list needs beyond a lent GPU machine's image, which has
# torch, numpy, pyyaml, rich, pytest and transformers but neither DeepSpeed nor its pydantic and hjson, and no network:
#   tools/gpu_wheels.sh            # here, with the registry reachable; then carry .whl to the GPU machine
# Wheels for CPython 3.12 on x86-64 Linux (the image's python3), DeepSpeed at the version this checkout pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEEPSPEED=$("$PY" -c "from importlib.metadata import version; print(version('deepspeed'))")
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl hjson pydantic pydantic-core annotated-types typing-inspection
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$DEEPSPEED" -w .whl
ls -1 .whl
