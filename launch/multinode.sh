#!/usr/bin/env bash
# Multi-node launch, run once on every node: launch/multinode.sh CONFIG [section.key=value ...]
#   NNODES        nodes in the job (required)
#   MASTER_ADDR   host every node can reach: the c10d rendezvous store, or rank 0's node with RDZV=static (required)
#   MASTER_PORT   its port (default: torchrun's, 29400 for c10d and 29500 for static)
#   RDZV          c10d (default: node ranks are assigned at rendezvous, any node may start first)
#                 or static (NODE_RANK required, MASTER_ADDR must be node 0)
#   NODE_RANK     this node's rank, 0..NNODES-1 (RDZV=static only)
#   RDZV_ID       job id shared by all nodes of one job (c10d; default largebatch)
#   NPROC         processes per node (default: the number of GPUs, or 2 on a CPU-only machine)
#   MAX_RESTARTS  times torchrun restarts the whole job after a failure (default 0)
#   PYTHON        interpreter with largebatch installed (default: .venv/bin/python if present, else python3)
# The config is checked against the whole world size (NNODES × NPROC) first, so a mistake is one line before any
# process starts.
set -euo pipefail
die() {
  echo "launch/multinode.sh: error: $*" >&2
  exit 2
}
if [ $# -lt 1 ]; then
  echo "usage: NNODES=N MASTER_ADDR=HOST [NODE_RANK=R RDZV=static] launch/multinode.sh CONFIG [section.key=value ...]" >&2
  exit 2
fi
CONFIG=$1
shift
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
positive() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

RDZV=${RDZV:-c10d}
[ -n "${NNODES:-}" ] || die "NNODES is not set; export the number of nodes in the job, e.g. NNODES=2"
positive "$NNODES" || die "NNODES=$NNODES must be a positive integer"
[ -n "${MASTER_ADDR:-}" ] || die "MASTER_ADDR is not set; export a host every node can reach (node 0 or the rendezvous host)"
NPROC=${NPROC:-$(default_nproc)}
positive "$NPROC" || die "NPROC=$NPROC must be a positive integer (processes per node)"
export_threads "$NPROC"
MAX_RESTARTS=${MAX_RESTARTS:-0}
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "MAX_RESTARTS=$MAX_RESTARTS must be a non-negative integer"
case "$RDZV" in
  c10d)
    rendezvous=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29400}" --rdzv-id "${RDZV_ID:-largebatch}")
    ;;
  static)
    [ -n "${NODE_RANK:-}" ] || die "RDZV=static needs NODE_RANK (0..$((NNODES - 1))); or use RDZV=c10d, which assigns it"
    if ! [[ $NODE_RANK =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$NNODES" ]; then
      die "NODE_RANK=$NODE_RANK must be in 0..$((NNODES - 1))"
    fi
    rendezvous=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}")
    ;;
  *) die "RDZV=$RDZV is not a rendezvous; use c10d or static" ;;
esac

"$PYTHON" -m largebatch plan --config "$CONFIG" --world-size $((NNODES * NPROC)) "$@" >/dev/null
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC" "${rendezvous[@]}" \
  --max-restarts "$MAX_RESTARTS" -m largebatch train --config "$CONFIG" "$@"
