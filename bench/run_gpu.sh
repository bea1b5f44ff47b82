#!/usr/bin/env bash
# The one device command of the GPU benchmark (bench/README.md, "GPU run"):
#   run(command="bash bench/run_gpu.sh", carry=[".whl"], timeout_s=540)
# Installs the wheels carried in .whl/ (bench/fetch_gpu_wheels.sh) into a folder of their own, never over the
# image's packages, then runs bench/gpu.py once under a time budget. gpu.py rewrites $OUT/gpu.json after every
# phase and the log goes to $OUT/gpu.log, so a run cut short keeps what finished.
#
# Environment: OUT (set by the device tool; default bench/results), BUDGET_S (gpu.py's budget, default 440),
# HARD_LIMIT_S (SIGTERM to gpu.py after this, default 500: with the install and 15 s of grace the command ends
# inside the 540 s given to the call, under 9 minutes), PYTHON
# (default python3), WHEEL_DIR (default .whl), SITE (install folder, default /tmp/site), GPU_BENCH_ARGS (more
# arguments for gpu.py, e.g. --tiny for a CPU check), WHEELS_DRY_RUN=1 (print the wheels chosen and stop).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-bench/results}
PY=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}
SITE=${SITE:-/tmp/site}
note=""

# Choose the wheels: all but one of the two datasets versions, picked for the image's pyarrow (datasets 5.2.0
# needs pyarrow >= 24, 4.8.5 >= 21). A carried pyarrow wheel is installed, and then 5.2.0 fits it.
wheels=()
if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
  pyarrow_major=$("$PY" -c 'import pyarrow; print(pyarrow.__version__.split(".")[0])' 2>/dev/null || echo 0)
  if compgen -G "$WHEEL_DIR/pyarrow-*.whl" >/dev/null; then
    pyarrow_major=99
  fi
  for w in "$WHEEL_DIR"/*.whl; do
    case "${w##*/}" in
      datasets-5.*) if [ "$pyarrow_major" -ge 24 ]; then wheels+=("$w"); fi ;;
      datasets-4.*) if [ "$pyarrow_major" -ge 21 ] && [ "$pyarrow_major" -lt 24 ]; then wheels+=("$w"); fi ;;
      *) wheels+=("$w") ;;
    esac
  done
  if [ "$pyarrow_major" -lt 21 ]; then
    note="image pyarrow major ${pyarrow_major} < 21: no carried datasets fits it (bench/fetch_gpu_wheels.sh --pyarrow)"
  fi
else
  note="no wheels in $WHEEL_DIR: datasets, evaluate and bitsandbytes are the image's, if any"
fi
if [ "${WHEELS_DRY_RUN:-0}" = 1 ]; then
  printf '%s\n' "${wheels[@]##*/}"
  [ -n "$note" ] && echo "note: $note"
  exit 0
fi

mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${#wheels[@]}" -gt 0 ]; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    note="${note:+$note; }pip install of the carried wheels failed (see gpu.log)"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's lor2c_hf
export GPU_BENCH_WHEEL_NOTE="$note"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# shellcheck disable=SC2086  # GPU_BENCH_ARGS is a list of words
timeout -k 15 "${HARD_LIMIT_S:-500}" "$PY" bench/gpu.py --out "$OUT/gpu.json" --budget_s "${BUDGET_S:-440}" \
  ${GPU_BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu.log"
exit "${PIPESTATUS[0]}"
