#!/usr/bin/env bash
# make test-cluster: the 2-node compose job (docker/compose.yaml: 2 node containers × 2 processes, c10d rendezvous on
# the host network) trains exactly like the same job run natively (2 torchrun agents on 127.0.0.1 through
# launch/multinode.sh): the two summary.json files must have the same params_sha256 (bit-identical training).
#
# What it needs, and does when missing (as root, with Debian apt):
#   a Docker daemon    uses the one `docker info` reaches; else installs docker.io and starts dockerd for this run
#                      (bridge and iptables off, images kept in $CACHE/docker) and stops it again, also on failure
#   docker compose     v2 plugin, or docker-compose v1 (installed with apt if neither is there)
#   a base image       BASE_IMAGE if set (e.g. python:3.11-slim where a registry is reachable); else a Debian bookworm
#                      minbase built with debootstrap and imported as largebatch-base:bookworm (tarball cached)
#   wheels             torch==$TORCH and the project's dependencies are collected once with the host's pip into
#                      $CACHE/wheels/... and served on 127.0.0.1 to the image build, which installs from them alone
#                      (set TORCH_INDEX=https://download.pytorch.org/whl/cpu where PyPI's torch would be a CUDA build);
#                      the image's Python must be PYTHON's version (3.11 for the bookworm base and python:3.11-slim)
# Environment: PYTHON (host interpreter with largebatch; default .venv/bin/python), CACHE (default ~/.cache/largebatch),
#   IMAGE (default largebatch:test-cluster), TORCH (default: the host interpreter's torch version, so both jobs
#   train alike), EPOCHS (default 20), DEBIAN_MIRROR,
#   WHEEL_PORT (loopback port the wheels are served on during the build; default 38641).
# Logs and both run directories are left in runs/test-cluster/.
set -euo pipefail
started=$(date +%s)
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
CACHE=${CACHE:-$HOME/.cache/largebatch}
IMAGE=${IMAGE:-largebatch:test-cluster}
EPOCHS=${EPOCHS:-20}
NPROC=2
# Both jobs take their threads by the same rule on this machine (compose does not pass the caller's OMP_NUM_THREADS).
unset OMP_NUM_THREADS
PROJECT=largebatch-test-cluster
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  [ -x "$here/.venv/bin/python" ] && PYTHON="$here/.venv/bin/python"
fi
TORCH=${TORCH:-$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')}
out=$here/runs/test-cluster
work=$(mktemp -d /tmp/largebatch-cluster.XXXXXX)
daemon_pid="" server_pid="" compose_started="" agent_pids=()  # agent_pids: background jobs to stop on exit
compose=()

say() { echo "test-cluster: $*"; }
die() {
  echo "test-cluster: error: $*" >&2
  exit 1
}
phase() { say "$1 ($(($(date +%s) - started)) s)"; }

cleanup() {
  local rc=$?
  set +e
  for pid in "${agent_pids[@]}"; do kill "$pid" 2>/dev/null; done
  if [ -n "$compose_started" ]; then
    "${compose[@]}" down --remove-orphans --timeout 5 >/dev/null 2>&1
    docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" | xargs -r docker rm -f >/dev/null 2>&1
  fi
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  if [ -n "$daemon_pid" ]; then
    kill "$daemon_pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$daemon_pid" 2>/dev/null && kill -9 "$daemon_pid"
    wait "$daemon_pid" 2>/dev/null
    for ns in "$work"/exec/netns/*; do mountpoint -q "$ns" && umount "$ns"; done
    say "stopped the Docker daemon it started (pid $daemon_pid)"
  fi
  rm -rf "$work"
  if [ "$rc" = 0 ]; then say "PASSED"; else say "FAILED (exit $rc; logs in runs/test-cluster/)"; fi
  say "wall time $(($(date +%s) - started)) s"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free port below the ephemeral range, which no other process's outgoing or port-0 socket takes in the meantime.
free_port() {
  "$PYTHON" -c '
import random, socket
while True:
    port = random.randrange(20000, 29000)
    try:
        socket.create_server(("127.0.0.1", port)).close()
        print(port)
        break
    except OSError:
        pass'
}

apt_install() {
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    die "$* missing; install it (Debian: apt-get install $*) or run this as root"
  fi
  say "installing $* with apt"
  apt-get update -qq >"$out/apt.log" 2>&1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >>"$out/apt.log" 2>&1 || die "apt-get install $* failed; see runs/test-cluster/apt.log"
}

start_daemon() {
  [ "$(id -u)" = 0 ] || die "no Docker daemon is reachable and starting one needs root; start Docker first"
  command -v dockerd >/dev/null || apt_install docker.io
  mkdir -p "$CACHE/docker"
  export DOCKER_HOST="unix://$work/docker.sock"
  dockerd --bridge=none --iptables=false --ip6tables=false --data-root "$CACHE/docker" --exec-root "$work/exec" \
    --pidfile "$work/docker.pid" --host "$DOCKER_HOST" >"$out/dockerd.log" 2>&1 9>&- &
  daemon_pid=$!
  for _ in $(seq 120); do
    docker info >/dev/null 2>&1 && return
    kill -0 "$daemon_pid" 2>/dev/null || die "dockerd exited; see runs/test-cluster/dockerd.log"
    sleep 0.5
  done
  die "dockerd did not answer within 60 s; see runs/test-cluster/dockerd.log"
}

base_image() {
  BASE_IMAGE=largebatch-base:bookworm
  docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return
  local tarball=$CACHE/base/bookworm-minbase.tar
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || apt_install debootstrap
    say "building a Debian bookworm minbase with debootstrap (once; cached in $tarball)"
    debootstrap --variant=minbase bookworm "$work/rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
      >"$out/debootstrap.log" 2>&1 || die "debootstrap failed; see runs/test-cluster/debootstrap.log"
    mkdir -p "$CACHE/base"
    tar -C "$work/rootfs" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
    rm -rf "$work/rootfs"
  fi
  docker import "$tarball" "$BASE_IMAGE" >/dev/null
}

wheelhouse() {
  local deps key
  deps=$("$PYTHON" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
  key=$(printf '%s\n' "$TORCH" "${TORCH_INDEX:-}" "$deps" | sha256sum | cut -c1-12)
  WHEELS=$CACHE/wheels/torch-$TORCH-$key
  [ -f "$WHEELS/.complete" ] && return
  say "collecting torch==$TORCH and the project's dependencies as wheels (once; cached in $WHEELS)"
  # shellcheck disable=SC2086
  "$PYTHON" -m pip wheel -q -w "$WHEELS" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} \
    "torch==$TORCH" "setuptools>=68" $deps >"$out/wheels.log" 2>&1 || die "pip wheel failed; see runs/test-cluster/wheels.log"
  touch "$WHEELS/.complete"
}

build_image() {
  # A fixed port: the URL is a build argument, and a new value would invalidate the image's cached layers.
  local port=${WHEEL_PORT:-38641}
  "$PYTHON" -c "import socket; socket.create_server(('127.0.0.1', $port))" 2>/dev/null ||
    die "port $port on 127.0.0.1 is busy; set WHEEL_PORT to a free port"
  "$PYTHON" -m http.server --bind 127.0.0.1 --directory "$WHEELS" "$port" >"$out/wheel-server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 50); do
    "$PYTHON" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" 2>/dev/null && break
    sleep 0.2
  done
  # The build context is what docker/Dockerfile copies, not the whole checkout (.venv, runs/ ...).
  tar -c --exclude=__pycache__ --exclude='*.egg-info' pyproject.toml README.md largebatch configs launch docker |
    docker build --network host -f docker/Dockerfile -t "$IMAGE" \
      --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH=$TORCH" \
      --build-arg "PIP_ARGS=--find-links http://127.0.0.1:$port/ --no-index" - >"$out/build.log" 2>&1 ||
    die "docker build failed; see runs/test-cluster/build.log"
  kill "$server_pid"
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
  # Only in a daemon of our own: drop the previous build's untagged layers.
  [ -z "$daemon_pid" ] || docker image prune -f >/dev/null
}

run_compose() {
  MASTER_PORT=$(free_port)
  export IMAGE NPROC EPOCHS MASTER_PORT MASTER_ADDR=127.0.0.1 RUN_ROOT=$out RUN_NAME=compose RDZV_ID=$PROJECT-$$
  compose_started=1
  # In the background and waited for, so that Ctrl-C reaches the trap at once.
  timeout 900 "${compose[@]}" up --no-color >"$out/compose.log" 2>&1 &
  agent_pids=($!)
  wait "${agent_pids[0]}" || die "compose up failed; see runs/test-cluster/compose.log"
  agent_pids=()
  local ids codes
  ids=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
  # shellcheck disable=SC2086
  codes=$(docker inspect -f '{{.State.ExitCode}}' $ids | sort | tr '\n' ' ') || true
  [ "$codes" = "0 0 " ] || die "node containers exited with codes: $codes; see runs/test-cluster/compose.log"
  "${compose[@]}" down --timeout 5 >/dev/null 2>&1
  compose_started=""
}

run_native() {
  local port rank rc=0
  port=$(free_port)
  for rank in 0 1; do
    NNODES=2 NPROC=$NPROC MASTER_ADDR=127.0.0.1 MASTER_PORT=$port RDZV=c10d RDZV_ID=native-$$ PYTHON=$PYTHON \
      timeout 900 launch/multinode.sh configs/quickstart.yaml "run.dir=$out/native" "train.epochs=$EPOCHS" \
      >"$out/native-node$rank.log" 2>&1 &
    agent_pids+=($!)
  done
  for pid in "${agent_pids[@]}"; do wait "$pid" || rc=$?; done
  agent_pids=()
  [ "$rc" = 0 ] || die "native run failed (exit $rc); see runs/test-cluster/native-node*.log"
}

compare() {
  "$PYTHON" - "$out/compose" "$out/native" <<'EOF'
import json, sys
from pathlib import Path

runs = [Path(p) for p in sys.argv[1:]]
summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
losses = [[json.loads(line)["loss"] for line in (r / "metrics.jsonl").read_text().splitlines()] for r in runs]
for s in summaries:
    assert s["world_size"] == 4, f"world_size {s['world_size']}, expected 2 nodes x 2 processes"
print(f"test-cluster: compose final loss {summaries[0]['final_loss']:.6f}, native {summaries[1]['final_loss']:.6f}; "
      f"{len(losses[0])} logged steps")
if summaries[0]["params_sha256"] != summaries[1]["params_sha256"] or losses[0] != losses[1]:
    worst = max((abs(a - b) for a, b in zip(*losses)), default=float("nan"))
    sys.exit(f"test-cluster: error: compose and native runs are not bit-identical: params_sha256 "
             f"{summaries[0]['params_sha256'][:12]} vs {summaries[1]['params_sha256'][:12]}, "
             f"largest per-step loss difference {worst:.3g}")
print(f"test-cluster: bit-identical: params_sha256 {summaries[0]['params_sha256'][:16]}... and every logged loss match")
EOF
}

exec 9>"/tmp/largebatch-test-cluster.lock"
flock -n 9 || die "another test-cluster run holds /tmp/largebatch-test-cluster.lock"
rm -rf "$out"
mkdir -p "$out" "$CACHE"
"$PYTHON" -c 'import largebatch' 2>/dev/null || die "$PYTHON cannot import largebatch; run make setup first"

command -v docker >/dev/null || apt_install docker.io
if docker info >/dev/null 2>&1; then
  say "using the Docker daemon at ${DOCKER_HOST:-the default socket}"
else
  start_daemon
  phase "started dockerd (pid $daemon_pid)"
fi
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  command -v docker-compose >/dev/null || apt_install docker-compose
  compose=(docker-compose)
fi
compose+=(-f docker/compose.yaml -p "$PROJECT")
"${compose[@]}" down --remove-orphans >/dev/null 2>&1 || true

if [ -z "${BASE_IMAGE:-}" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
    die "the wheels are built with $PYTHON for the image's Python 3.11 (bookworm); set PYTHON to a Python 3.11 with largebatch, or BASE_IMAGE to an image with $PYTHON's version"
  base_image
  phase "base image $BASE_IMAGE ready"
fi
wheelhouse
phase "wheels ready"
build_image
phase "built $IMAGE from docker/Dockerfile on $BASE_IMAGE"
run_compose
phase "compose job finished (2 node containers x $NPROC processes)"
run_native
phase "native job finished (2 torchrun agents x $NPROC processes on 127.0.0.1)"
compare
