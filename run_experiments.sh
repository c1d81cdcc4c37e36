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
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-./data}
OUT=${OUT:-runs}
SEEDS=${SEEDS:-0}
PYTHON=${PYTHON:-python3}   # the interpreter that has torch (e.g. a virtual environment's)
EXTRA=()
if [ "${1:-}" = "--smoke" ]; then
  OUT=$(mktemp -d)/runs
  EXTRA=(--preset smoke --device cpu)
  echo "smoke runs in $OUT"
fi

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
      "$PYTHON" sparse_win.py "${args[@]}"
    done
  done
done

"$PYTHON" - "$OUT" <<'PY'
import json, sys, pathlib, sparse_win as sw
paths = sorted(pathlib.Path(sys.argv[1]).glob("*/seed*/summary.json"))
rows = [json.loads(p.read_text()) for p in paths]
for p, r in zip(paths, rows):  # label by run directory: <dataset>-<mode>/seed<k>
    r["method"] = f"{p.parent.parent.name} {p.parent.name} ({r['method']}, data: {r['dataset']})"
print(sw.format_table(rows))
PY
