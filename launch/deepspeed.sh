#!/usr/bin/env bash
# Launch with DeepSpeed's launcher: launch/deepspeed.sh CONFIG [section.key=value ...]
#   NPROC        processes per node (default: the number of GPUs, or 2 on a CPU-only machine)
#   HOSTFILE     DeepSpeed hostfile for several nodes ("host slots=N" per line); without it, this node only
#   MASTER_ADDR  rank 0's host (default 127.0.0.1)
#   MASTER_PORT  its port (default 29500)
#   PYTHON       interpreter with largebatch and deepspeed installed (default: .venv/bin/python if present, else python3)
# `largebatch train` reads the RANK / LOCAL_RANK / WORLD_SIZE that the launcher sets, exactly as under torchrun.
# The config is checked against the world size first, so a mistake is one line before any process starts.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: [NPROC=N] [HOSTFILE=FILE] launch/deepspeed.sh CONFIG [section.key=value ...]" >&2
  exit 2
fi
CONFIG=$1
shift
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
NPROC=${NPROC:-$(default_nproc)}
export_threads "$NPROC"
hosts=()
world=$NPROC
if [ -n "${HOSTFILE:-}" ]; then
  if [ ! -f "$HOSTFILE" ]; then
    echo "launch/deepspeed.sh: error: HOSTFILE=$HOSTFILE not found" >&2
    exit 2
  fi
  hosts=(--hostfile "$HOSTFILE")
  world=$(awk '/slots=/{split($2, a, "="); n += a[2]} END {print n}' "$HOSTFILE")
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/largebatch/torch_extensions}
"$PYTHON" -m largebatch plan --config "$CONFIG" --world-size "$world" "$@" >/dev/null
exec "$PYTHON" -m deepspeed.launcher.runner "${hosts[@]}" --num_gpus "$NPROC" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  --no_local_rank --module largebatch train --config "$CONFIG" "$@"
