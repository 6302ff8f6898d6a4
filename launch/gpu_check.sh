#!/bin/bash
# The GPU check in one command, for a GPU machine that has torch and triton but not this project's
# other packages (deepspeed and its needs, Liger-Kernel): they come as wheels in .whl/, built on a
# machine with a package index by `make gpu-wheels`, which also prints the exact call to make.
#
#   bash launch/gpu_check.sh [--only SECTIONS] [--budget_s S]      # results under $OUT (or --out)
#   bash launch/gpu_check.sh --dry_run                               # CPU, tiny shapes (make test)
#
# Installs .whl/*.whl into a private folder (not in a dry run, whose interpreter may not match the
# wheels), makes the project importable from this tree, and runs python -m peco_scale.gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${PECO_SITE:-/tmp/peco-site}
mkdir -p "$SITE"
case " $* " in *" --dry_run "*) dry=1 ;; *) dry=0 ;; esac
if [ "$dry" = 0 ] && compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "error: could not install the wheels in .whl/ with $PY; rebuild them with make gpu-wheels"; exit 3; }
    export PATH="$SITE/bin:$PATH"
fi
# kernels/ installs as peco_kernels: without an install of the project, a link names it so
if ! "$PY" -c "import peco_kernels" 2> /dev/null; then
    ln -sfn "$PWD/kernels" "$SITE/peco_kernels"
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m peco_scale.gpu_check "$@"
