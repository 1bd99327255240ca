#!/usr/bin/env bash
# Single-node launch: launch/torchrun.sh CONFIG [section.key=value ...]
#   NPROC   processes (default: the number of GPUs, or 2 on a CPU-only machine)
#   PYTHON  interpreter with largebatch installed (default: .venv/bin/python if present, else python3)
# The config is checked against the world size first, so a mistake is one line before any process starts.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: launch/torchrun.sh CONFIG [section.key=value ...]" >&2
  exit 2
fi
CONFIG=$1
shift
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
NPROC=${NPROC:-$(default_nproc)}
export_threads "$NPROC"
"$PYTHON" -m largebatch plan --config "$CONFIG" --world-size "$NPROC" "$@" >/dev/null
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
  -m largebatch train --config "$CONFIG" "$@"
