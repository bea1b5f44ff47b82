#!/usr/bin/env bash
# Download, here, the wheels bench/run_gpu.sh installs on the device machine (which reaches no registry),
# into .whl/ (git-ignored; the device call carries it), and check that they and the working tree fit the
# device tool's 64 MiB limit. Versions are pinned to what this project is tested with; see bench/README.md.
#
#   bash bench/fetch_gpu_wheels.sh             # datasets (+ a fallback for an older pyarrow), evaluate, dill,
#                                              # multiprocess, bitsandbytes
#   bash bench/fetch_gpu_wheels.sh --no-bnb    # without bitsandbytes (the 4-bit row is then skipped)
#   bash bench/fetch_gpu_wheels.sh --pyarrow   # also pyarrow, for an image whose pyarrow is older than 21;
#                                              # bitsandbytes is dropped: both together exceed 64 MiB
#
# PYTHON=... picks the interpreter whose pip downloads (default python3); WHEEL_DIR=... the folder.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DEST=${WHEEL_DIR:-.whl}
LIMIT_MIB=64
with_bnb=1
with_pyarrow=0
for arg in "$@"; do
  case "$arg" in
    --no-bnb) with_bnb=0 ;;
    --pyarrow) with_pyarrow=1; with_bnb=0 ;;
    *) echo "unknown option $arg (expected --no-bnb or --pyarrow)" >&2; exit 2 ;;
  esac
done

# The device runs CPython 3.12 on x86-64 (KINDS.md); pip matches each manylinux tag exactly.
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "$1"
}

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # start empty: a stale version left here would travel too
# Missing from the device image (its package list in /work/.library/device/KINDS.md has pyarrow, pandas, xxhash,
# fsspec, aiohttp, requests, tqdm, pyyaml, huggingface-hub but none of these). One download each: pip refuses two
# versions of one package in a single call.
download datasets==5.2.0       # needs pyarrow >= 24
download datasets==4.8.5       # the fallback run_gpu.sh installs instead when the image's pyarrow is 21-23
download evaluate==0.4.6
download dill==0.4.1           # datasets 5.2.0 and 4.8.5 both accept it
download multiprocess==0.70.19
if [ "$with_bnb" = 1 ]; then
  download bitsandbytes==0.50.2  # one wheel for every CUDA, libbitsandbytes_cuda130.so included
fi
if [ "$with_pyarrow" = 1 ]; then
  download pyarrow==26.0.1
fi

mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
wheels=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
# What else travels: tracked files and untracked files git does not ignore.
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r du -cb 2>/dev/null \
        | awk '$2 == "total" { s += $1 } END { print s + 0 }')
total=$((wheels + tree))
echo
for w in "$DEST"/*.whl; do
  printf '  %8s MiB  %s\n' "$(mib "$(stat -c %s "$w")")" "${w##*/}"
done
echo "wheels $(mib "$wheels") MiB + working tree $(mib "$tree") MiB = $(mib "$total") MiB of the ${LIMIT_MIB} MiB limit"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "does not fit: drop a wheel (--no-bnb) or carry less" >&2
  exit 1
fi
