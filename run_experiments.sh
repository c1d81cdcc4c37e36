#!/usr/bin/env bash
# Reproduce the paper's Table 1 rows: {CIFAR-10, CIFAR-100, Tiny-ImageNet} x {dense AT, Robust Bird,
# Flying Bird, Flying Bird+}, ResNet-18 at 80% sparsity, the paper's protocol (sparse_win.py defaults).
#
#   bash run_experiments.sh                 # all 12 runs, one after another, on the GPU
#   bash run_experiments.sh --smoke         # each of the 12 for a few steps on the CPU (Fashion-MNIST
#                                           # stands in for data that is not on disk)
#   DATA=/data OUT=runs SEEDS="0 1 2" bash run_experiments.sh
#
# Each run writes runs/<dataset>-<mode>/seed<k>/{metrics.jsonl,summary.json,last.pt,best.pt,curves.png};
# a run that stopped is continued with --resume. The last step prints every summary as one table.
#
# The Fashion-MNIST study on CPU (results/fashion-mnist/SEARCH.md chose its options):
#
#   bash run_experiments.sh --study         # 4 methods x seeds at sparsity 0.8, Flying Bird sweep
#   bash run_experiments.sh --study-smoke   # the same runs for a few steps each, in a temp dir
#   OUT=... SEEDS="0 1 2" JOBS=2 PYTHON=.venv/bin/python bash run_experiments.sh --study
#
# The study runs JOBS runs at a time with one thread each, into $OUT/<mode>-s<sparsity>/seed<k>
# (stdout in log.txt there), skips finished runs, resumes stopped ones, then writes table.md,
# curves.png, gap.png and sparsity.png into $REPORT (default: the folder above $OUT).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
DATA=${DATA:-./data}
EXTRA=()
case "${1:-}" in
  "") TASK=table1 ;;
  --smoke) TASK=table1; OUT=$(mktemp -d)/runs; EXTRA=(--preset smoke --device cpu); echo "smoke runs in $OUT" ;;
  --study) TASK=study ;;
  --study-smoke) TASK=study; OUT=$(mktemp -d)/runs; EXTRA=(--preset smoke --device cpu); echo "smoke runs in $OUT" ;;
  *) echo "usage: bash run_experiments.sh [--smoke | --study | --study-smoke]" >&2; exit 2 ;;
esac

if [ "$TASK" = study ]; then
  OUT=${OUT:-results/fashion-mnist/runs}
  REPORT=${REPORT:-$(dirname "$OUT")}
  SEEDS=${SEEDS:-0 1 2}
  JOBS=${JOBS:-2}
  # One shared option list for every study run (the configuration recommended in SEARCH.md).
  STUDY=(--dataset fashion-mnist --device cpu --no-progress --data-dir "$DATA"
         --width 0.125 --train-subset 250 --batch-size 32 --train-eps 38.25 --train-alpha 15 --train-steps 3
         --test-steps 3 --test-alpha 15 --eval-subset 500 --gap-subset 250 --epochs 80 --milestones 40 --lr 0.1
         --update-interval 15 --update-interval-late 20)
  [ ${#EXTRA[@]} -gt 0 ] && STUDY=("${EXTRA[@]}")

  run_one() {  # run_one DIR ARGS...: skip when finished, --resume when stopped, stdout to DIR/log.txt
    local dir=$1; shift
    [ -f "$dir/summary.json" ] && { echo "done already: $dir"; return 0; }
    local args=("${STUDY[@]}" "$@" --out "$dir")
    [ -f "$dir/last.pt" ] && args+=(--resume)
    mkdir -p "$dir"
    echo "== $dir"
    if ! OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PY" sparse_win.py "${args[@]}" >> "$dir/log.txt" 2>&1; then
      echo "FAILED: $dir (see $dir/log.txt)" >&2
      return 1
    fi
  }

  queue=()  # "mode sparsity seed"; the sweep reuses the sparsity-0.8 Flying Bird run of seed 0
  for seed in $SEEDS; do
    for mode in dense static dynamic dynamic+; do queue+=("$mode 0.8 $seed"); done
  done
  for s in 0 0.5 0.9 0.95; do queue+=("dynamic $s 0"); done
  [[ " $SEEDS " == *" 0 "* ]] || queue+=("dynamic 0.8 0")

  for item in "${queue[@]}"; do
    read -r mode s seed <<< "$item"
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    run_one "$OUT/$mode-s$s/seed$seed" --mode "$mode" --sparsity "$s" --seed "$seed" &
  done
  while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || true; done
  failed=0  # judged by the files, not by wait's statuses
  for item in "${queue[@]}"; do
    read -r mode s seed <<< "$item"
    [ -f "$OUT/$mode-s$s/seed$seed/summary.json" ] || { echo "not finished: $OUT/$mode-s$s/seed$seed" >&2; failed=1; }
  done
  "$PY" -c 'import sys, sparse_win as sw; sw.study_report(sys.argv[1], sys.argv[2])' "$OUT" "$REPORT"
  echo "report in $REPORT/table.md"
  exit "$failed"
fi

OUT=${OUT:-runs}
SEEDS=${SEEDS:-0}
for dataset in cifar10 cifar100 tiny-imagenet; do
  for mode in dense static dynamic dynamic+; do
    for seed in $SEEDS; do
      dir="$OUT/$dataset-$mode/seed$seed"
      args=(--dataset "$dataset" --mode "$mode" --sparsity 0.8 --seed "$seed" --data-dir "$DATA" --out "$dir")
      if [ ${#EXTRA[@]} -gt 0 ]; then
        args=("${EXTRA[@]}" --mode "$mode" --sparsity 0.8 --seed "$seed" --out "$dir")
      fi
      [ -f "$dir/summary.json" ] && { echo "done already: $dir"; continue; }
      [ -f "$dir/last.pt" ] && args+=(--resume)
      echo "== $dataset $mode seed $seed"
      "$PY" sparse_win.py "${args[@]}"
    done
  done
done

"$PY" - "$OUT" <<'PY'
import json, sys, pathlib, sparse_win as sw
paths = sorted(pathlib.Path(sys.argv[1]).glob("*/seed*/summary.json"))
rows = [json.loads(p.read_text()) for p in paths]
for p, r in zip(paths, rows):  # label by run directory: <dataset>-<mode>/seed<k>
    r["method"] = f"{p.parent.parent.name} {p.parent.name} ({r['method']}, data: {r['dataset']})"
print(sw.format_table(rows))
PY
