#!/usr/bin/env bash
# The benchmarks' GPU rows in one go, for a machine with a CUDA GPU (run from the repository root):
#   tools/gpu_bench.sh                 # or PYTHON=/path/to/python tools/gpu_bench.sh
# - bench optim --device cuda: LARS, LAMB and Muon against torch's fused SGD/AdamW on ResNet-50's and GPT-2
#   small's shapes;
# - bench loop --gpt --device cuda, eager and compiled: the trainer against nanoGPT's GPU step on GPT-2 small's
#   body in bf16, tokens/s and MFU of both.
# It needs torch with CUDA, numpy, pyyaml and rich (no install: the repository is put on PYTHONPATH). The GPU check
# list (tests) is `make test-gpu`.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
run() {  # run LIMIT_S ARGS...: one benchmark, stopped after LIMIT_S seconds so that the next still runs
    local limit=$1
    shift
    echo "\$ largebatch $*"
    local start=$SECONDS
    timeout "$limit" "$PY" -m largebatch "$@" || status=1
    echo "($((SECONDS - start)) s)"
}
nvidia-smi -L 2>/dev/null
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" ||
    exit 1
run 120 bench optim --device cuda --steps 20 --warmup 5
run 180 bench loop --gpt --device cuda --steps 20 --repeats 5
run 300 bench loop --gpt --device cuda --steps 20 --repeats 5 --compile
exit $status
