#!/usr/bin/env bash
# Fetches the wheels bench/gpu_check.sh installs on a GPU machine that cannot download anything:
# kvikio for CUDA 13 and DeepSpeed, with the requirements a stock CUDA + PyTorch image lacks.
# Run it where pip reaches an index (a development machine), from the repository root:
#
#   bash bench/gpu_wheels.sh [DEST]        # default DEST: .whl (ignored by git)
#
#   PYVER   the GPU machine's Python (default 3.12)
#   EXTRA   more requirement specifiers to fetch as binary wheels (space separated)
# DeepSpeed ships as a source package: it is built here into a pure-Python wheel (its ops are
# compiled on the GPU machine when first used, as everywhere).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PYVER=${PYVER:-3.12}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
download() {
  "$PY" -m pip download -q --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${platforms[@]}" -d "$DEST" "$@"
}
# kvikio (GPUDirect Storage I/O) and what it needs beyond the image (cupy, cuda-toolkit and
# cuda-pathfinder are there: not fetched)
download --no-deps kvikio-cu13 libkvikio-cu13 "rapids-logger==0.3.*"
# DeepSpeed's requirements beyond the image, with theirs (pydantic pins its core)
# shellcheck disable=SC2086
download hjson pydantic ${EXTRA:-}
version=$("$PY" -c "from importlib.metadata import version; print(version('deepspeed'))" 2>/dev/null || echo "")
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed${version:+==$version}"
ls -1 "$DEST"
echo "wheels in $DEST: carry that folder to the GPU machine and run: bash bench/gpu_check.sh $DEST"
