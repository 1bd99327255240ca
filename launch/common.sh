# shellcheck shell=bash
# Sourced by the launch scripts. Sets PYTHON (unless given: the checkout's .venv/bin/python if present, else
# python3) and defines default_nproc (the number of GPUs, or 2 on a CPU-only machine) and export_threads.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  [ -x "$here/.venv/bin/python" ] && PYTHON="$here/.venv/bin/python"
fi
default_nproc() {
  "$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)'
}
# One thread rule for every launcher (largebatch.dist.threads): OMP_NUM_THREADS if the caller set it, else the usable
# cores ÷ processes per node. Exported before the launcher starts, so torchrun's "1 thread if 2+ processes" and
# DeepSpeed's "all cores" defaults never decide a job's numbers. Call after NPROC is known.
export_threads() {
  if [ -z "${OMP_NUM_THREADS:-}" ]; then
    OMP_NUM_THREADS=$("$PYTHON" -c "from largebatch.dist import threads; print(threads(local_processes=$1))")
    export OMP_NUM_THREADS
  fi
}
