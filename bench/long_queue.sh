#!/bin/sh
# The long-running benchmarks behind the README's quality section, in priority order, one thread per process.
# Every step skips the runs its JSON already holds, so rerunning this script continues where an interrupted one
# stopped:  nohup nice -n 10 sh bench/long_queue.sh > /tmp/lor2c_long_queue.log 2>&1 &
set -e
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
# 1. What each event does to the function (160 steps, lr 5e-4, seed 0).
"$PYTHON" bench/event_probe.py --threads 1 \
    --variants "imlor2c:paper/paper,imlor2c:official/official,fixed:imlor2c:paper/paper,lor2c"
# 2. The long-budget table, seed 0 of every method first.
"$PYTHON" bench/quality.py --preset long --threads 1 --seeds 1
# 3. The M x N grid (the paper's Fig. 6).
"$PYTHON" bench/mn_grid.py --threads 1
# 4. Seeds 1 and 2 of the long-budget table, one process (one core) each, then seed 2's file folded into the table.
"$PYTHON" bench/quality.py --preset long --threads 1 --seeds 2 --no_png & first=$!
"$PYTHON" bench/quality.py --preset long --threads 1 --seed_list 2 --name quality_long_seed2 --no_png & second=$!
wait $first && wait $second
"$PYTHON" bench/quality.py --preset long --combine bench/results/quality_long_seed2.json && rm bench/results/quality_long_seed2.json
# 5. The README's tables from the JSON.
"$PYTHON" bench/report.py --write README.md bench/README.md
