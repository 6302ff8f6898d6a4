#!/bin/bash
# Builds .whl/: the packages the GPU check needs that the lent GPU machine lacks, as wheels for its
# interpreter (CPython 3.12, manylinux x86_64), then checks what would travel and prints the call.
#
#   make gpu-wheels          (or: bash launch/gpu_wheels.sh)
#
# That machine has torch, triton, timm, numpy, safetensors, scikit-learn/-image, msgpack, ninja,
# psutil, py-cpuinfo, einops, packaging and tqdm, but no deepspeed (published as a source archive:
# built here into a pure-Python wheel, its ops compile on demand there), none of deepspeed's hjson
# and pydantic (with pydantic-core, annotated-types, typing-inspection), and no Liger-Kernel (the
# kernel benchmark's fourth linear-CE contender). Versions: those installed here (a set that works
# together), Liger-Kernel as LIGER_VERSION. Needs the package index; nothing runs on the GPU here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LIGER_VERSION=${LIGER_VERSION:-0.8.5}
OUT_DIR=${WHEEL_DIR:-.whl}  # the device call carries .whl; another folder is for tests
tmp=$(mktemp -d "${TMPDIR:-/tmp}/peco-wheels.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

pins=$("$PY" -c 'from importlib.metadata import version as v
print(" ".join(f"{p}=={v(p)}" for p in ("deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types",
                                        "typing-inspection")))')
read -r -a pins <<< "$pins"
echo "building $OUT_DIR for CPython 3.12 manylinux x86_64: ${pins[*]} liger-kernel==$LIGER_VERSION"
"$PY" -m pip wheel -q --no-deps "${pins[0]}" -w "$tmp"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d "$tmp" "${pins[@]:1}" "liger-kernel==$LIGER_VERSION"
# the set must install there without an index: pip checks each wheel's tags against CPython 3.12
"$PY" -m pip install -q --dry-run --no-index --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${plat[@]}" --target "$tmp/check" "$tmp"/*.whl
rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR"
mv "$tmp"/*.whl "$OUT_DIR"/
"$PY" -m peco_scale.gpu_check plan --carry "$OUT_DIR"
