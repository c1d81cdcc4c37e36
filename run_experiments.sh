#!/usr/bin/env bash
# Reproduce the paper's Table 1 rows: {CIFAR-10, CIFAR-100, Tiny-ImageNet} x {dense AT, Robust Bird,
# Flying Bird, Flying Bird+}, ResNet-18 at 80% sparsity, the paper's protocol (sparse_win.py defaults).
#
#   bash run_experiments.sh                 # all 12 runs, one after another, on the GPU
#   GPUS="0 1 2 3" bash run_experiments.sh  # from a queue: one run per GPU at a time
#   GPUS="0 1 2 3" NPROC=2 bash run_experiments.sh   # each run on 2 GPUs with torchrun (2 at a time)
#   bash run_experiments.sh --smoke         # each of the 12 for a few steps on the CPU (Fashion-MNIST
#                                           # stands in for data that is not on disk)
#   GPUS="a b" bash run_experiments.sh --smoke       # the queue on the CPU: 2 slots ("GPUs")
#   DATA=/data OUT=runs SEEDS="0 1 2" DATASETS=cifar10 MODES="dense dynamic" bash run_experiments.sh
#
# Each run writes runs/<dataset>-<mode>/seed<k>/{metrics.jsonl,summary.json,last.pt,best.pt,curves.png};
# a run that stopped is continued with --resume. With GPUS, each run's output goes to log.txt there.
# The last step prints every summary as one table.
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-./data}
OUT=${OUT:-runs}
SEEDS=${SEEDS:-0}
DATASETS=${DATASETS:-cifar10 cifar100 tiny-imagenet}
MODES=${MODES:-dense static dynamic dynamic+}
PYTHON=${PYTHON:-python3}   # the interpreter that has torch (e.g. a virtual environment's)
GPUS=${GPUS:-}              # GPU ids: run from a queue, NPROC GPUs per run
NPROC=${NPROC:-1}
EXTRA=()
if [ "${1:-}" = "--smoke" ]; then
  OUT=$(mktemp -d)/runs
  EXTRA=(--preset smoke --device cpu)
  echo "smoke runs in $OUT"
fi

runs=()  # "dataset mode seed"
for dataset in $DATASETS; do
  for mode in $MODES; do
    for seed in $SEEDS; do runs+=("$dataset $mode $seed"); done
  done
done

run_one() {  # run_one "dataset mode seed" [GPU ids]: skip a finished run, --resume a stopped one
  local dataset mode seed
  read -r dataset mode seed <<< "$1"
  local dir="$OUT/$dataset-$mode/seed$seed"
  local args=(--dataset "$dataset" --mode "$mode" --sparsity 0.8 --seed "$seed" --data-dir "$DATA" --out "$dir")
  if [ ${#EXTRA[@]} -gt 0 ]; then
    args=("${EXTRA[@]}" --mode "$mode" --sparsity 0.8 --seed "$seed" --out "$dir")
  fi
  [ -f "$dir/summary.json" ] && { echo "done already: $dir"; return 0; }
  [ -f "$dir/last.pt" ] && args+=(--resume)
  if [ -z "${2:-}" ]; then
    echo "== $dataset $mode seed $seed"
    "$PYTHON" sparse_win.py "${args[@]}"
    return
  fi
  local launch=("$PYTHON")
  [ "$NPROC" -gt 1 ] && launch=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC")
  echo "== [GPU $2] $dataset $mode seed $seed"
  mkdir -p "$dir"
  if CUDA_VISIBLE_DEVICES=${2// /,} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} \
      "${launch[@]}" sparse_win.py "${args[@]}" >> "$dir/log.txt" 2>&1; then
    echo "-- [GPU $2] done: $dir"
  else
    echo "-- [GPU $2] FAILED: $dir (see $dir/log.txt; rerun to resume it)" >&2
    return 1
  fi
}

if [ -z "$GPUS" ]; then
  for r in "${runs[@]}"; do run_one "$r"; done
else
  # a queue: one worker per group of NPROC GPUs takes the next run as soon as its last one ends
  read -r -a ids <<< "$GPUS"
  [ $((${#ids[@]} % NPROC)) -eq 0 ] || { echo "GPUS (${#ids[@]}) must be a multiple of NPROC ($NPROC)" >&2; exit 2; }
  mkdir -p "$OUT"
  queue="$OUT/.queue"
  echo 0 > "$queue"
  take() {  # the index of the next run, under a lock
    local i
    { flock 9; i=$(cat "$queue"); echo $((i + 1)) > "$queue"; } 9> "$queue.lock"
    echo "$i"
  }
  worker() {
    local status=0 i
    while i=$(take) && [ "$i" -lt ${#runs[@]} ]; do run_one "${runs[$i]}" "$1" || status=1; done
    return $status
  }
  pids=()
  for ((k = 0; k < ${#ids[@]}; k += NPROC)); do
    worker "${ids[*]:k:NPROC}" &
    pids+=($!)
  done
  failed=0
  for p in "${pids[@]}"; do wait "$p" || failed=1; done
  rm -f "$queue" "$queue.lock"
  [ $failed -eq 0 ] || { echo "some runs failed; run the same command again to resume them" >&2; exit 1; }
fi

"$PYTHON" - "$OUT" <<'PY'
import json, sys, pathlib, sparse_win as sw
paths = sorted(pathlib.Path(sys.argv[1]).glob("*/seed*/summary.json"))
rows = [json.loads(p.read_text()) for p in paths]
for p, r in zip(paths, rows):  # label by run directory: <dataset>-<mode>/seed<k>
    r["method"] = f"{p.parent.parent.name} {p.parent.name} ({r['method']}, data: {r['dataset']})"
print(sw.format_table(rows))
PY
