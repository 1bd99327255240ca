# shellcheck shell=bash
# Sourced by the launch scripts. Sets PYTHON (unless given: the checkout's .venv/bin/python if present, else
# python3) and defines default_nproc (the number of GPUs, or 2 on a CPU-only machine).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  [ -x "$here/.venv/bin/python" ] && PYTHON="$here/.venv/bin/python"
fi
default_nproc() {
  "$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)'
}
