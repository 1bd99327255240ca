#!/usr/bin/env bash
# On a lent GPU machine (no network, torch in its image; run from the repository root): install the wheels carried in
# .whl/ (tools/gpu_wheels.sh makes them) into a temporary folder, then run what is asked, in this order:
#   tools/gpu_check.sh tests   # the GPU check list (tests_gpu/, what `make test-gpu` runs): ~6 min on one H100
#   tools/gpu_check.sh bench   # the benchmarks' GPU rows (tools/gpu_bench.sh)
#   tools/gpu_check.sh         # both
# The repository is put on PYTHONPATH instead of installed. Exit status: 1 if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ $# -eq 0 ] && set -- tests bench
for part in "$@"; do
    case $part in
    tests | bench) ;;
    *)
        echo "gpu_check: unknown part '$part'; give tests, bench or nothing (both)" >&2
        exit 2
        ;;
    esac
done
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/largebatch/torch_extensions}
"$PY" -c "import deepspeed" 2>/dev/null || echo "gpu_check: DeepSpeed is not importable: its tests will fail (carry .whl)"
status=0
for part in "$@"; do
    if [ "$part" = tests ]; then
        "$PY" -m pytest -q -ra -n0 -p no:cacheprovider tests_gpu || status=1
    else
        PYTHON=$PY tools/gpu_bench.sh || status=1
    fi
done
exit $status
