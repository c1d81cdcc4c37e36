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
# Each run writes runs/<dataset>-<mode>-s0.8-seed<k>/ (metrics.jsonl, summary.json, config.json, last.pt,
# best.pt, curves.png), the folder `python sparse_win.py` picks for the same options; a missing
# Tiny-ImageNet is reported before the first run;
# every run is started with --resume auto: the same command starts it, continues it after any interruption, or
# skips it when finished, so rerunning this script resumes the queue. With GPUS, each run's output goes to log.txt there.
# The last step prints every summary as one table.
#
# The Fashion-MNIST study on the CPU (results/fashion-mnist/README.md; results/fashion-mnist/SEARCH.md
# chose its options):
#
#   bash run_experiments.sh --study         # 4 methods x 3 seeds at sparsity 0.8, Flying Bird sweep
#   bash run_experiments.sh --study-smoke   # the same runs for a few steps each, in a temp dir
#   OUT=... SEEDS="0 1 2" JOBS=2 PYTHON=.venv/bin/python bash run_experiments.sh --study
#
# The study runs JOBS runs at a time with one thread each, into $OUT/<mode>-s<sparsity>/seed<k>
# (stdout in log.txt there), skips finished runs, resumes stopped ones, then writes table.md,
# curves.png, gap.png and sparsity.png into $REPORT (default: the folder above $OUT).
#
# The second Fashion-MNIST study, where dense AT fits its training set (no augmentation, 500 images, eps 0.1;
# results/fashion-mnist-overfit/):
#
#   bash run_experiments.sh --study-overfit        # 21 runs (variants below), each evaluated after training
#   bash run_experiments.sh --study-overfit-smoke  # the same queue for a few steps each, in a temp dir
#   bash run_experiments.sh --studies              # both studies, one after the other
#
# Its runs go to $OUT/<variant>/seed<k> (variants: dense, small-dense-w0.056, rb-s0.8, fb-s0.8,
# fbplus-s0.8, fixed-mask-s0.8, fb-s0.5, fb-s0.9, fb-s0.95, and rb-channel-s$CH: Robust Bird's channel
# ticket at the channel sparsity whose thin network keeps about 20% of the weights, seeds 0-2, last in
# the queue; then the regularizers, dense and Flying Bird+ each with TRADES, AWP or weight averaging,
# seeds 0-2: dense-trades, dense-awp, dense-ema, fbplus-s0.8-trades, fbplus-s0.8-awp, fbplus-s0.8-ema).
# ONLY="rb-channel-s0.79 ..." runs those variants alone. Right after its training each run's
# best.pt and last.pt are evaluated (PGD-20, one start) on the first 2,000 test images and on its
# 500 training images (the robust gap); AA=1 adds standard AutoAttack on 500 test images for
# best.pt of seed 0 of each variant at sparsity 0.8.
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-./data}
DATASETS=${DATASETS:-cifar10 cifar100 tiny-imagenet}
MODES=${MODES:-dense static dynamic dynamic+}
PYTHON=${PYTHON:-python3}   # the interpreter that has torch (e.g. a virtual environment's)
GPUS=${GPUS:-}              # GPU ids: run from a queue, NPROC GPUs per run
NPROC=${NPROC:-1}
EXTRA=()
case "${1:-}" in
  "") TASK=table1 ;;
  --smoke) TASK=table1; OUT=$(mktemp -d)/runs; EXTRA=(--preset smoke --device cpu); echo "smoke runs in $OUT" ;;
  --study) TASK=study ;;
  --study-smoke) TASK=study; OUT=$(mktemp -d)/runs; EXTRA=(--preset smoke --device cpu); echo "smoke runs in $OUT" ;;
  --study-overfit) TASK=overfit ;;
  --study-overfit-smoke) TASK=overfit; OUT=$(mktemp -d)/runs; SMOKE=1; echo "smoke runs in $OUT" ;;
  --studies) bash "$0" --study && exec bash "$0" --study-overfit ;;
  *) echo "usage: bash run_experiments.sh [--smoke | --study | --study-smoke | --study-overfit |" \
          "--study-overfit-smoke | --studies]" >&2; exit 2 ;;
esac

if [ "$TASK" = overfit ]; then
  OUT=${OUT:-results/fashion-mnist-overfit/runs}
  REPORT=${REPORT:-$(dirname "$OUT")}
  SEEDS=${SEEDS:-$([ "${SMOKE:-0}" = 1 ] && echo 0 || echo 0 1 2)}
  JOBS=${JOBS:-2}
  AA=${AA:-0}
  CH=0.79  # channel sparsity of rb-channel: weight density 0.199 (seed 0), the closest to the others' 0.2
  # Pilot P4: dense PGD-AT fits its 500 training images (results/fashion-mnist-overfit/README.md).
  STUDY=(--dataset fashion-mnist --device cpu --no-progress --data-dir "$DATA"
         --width 0.125 --train-subset 500 --no-augment --batch-size 32 --train-eps 25.5 --train-alpha 10
         --train-steps 3 --test-eps 25.5 --test-alpha 10 --test-steps 3 --epochs 120 --milestones 60 90
         --eval-subset 500 --gap-subset 500 --update-interval 40 --update-interval-late 40)
  TEST_N=2000
  if [ "${SMOKE:-0}" = 1 ]; then
    STUDY=(--preset smoke --device cpu --data-dir "$DATA" --no-augment --eval-every 1 --train-subset 64)
    TEST_N=64
  fi
  declare -A VARIANT=(  # the folder name of a variant -> its options
    [dense]="--mode dense"
    [small-dense-w0.056]="--mode dense --width 0.056"  # 35,544 conv+linear weights, the 80%-sparse models' 35,010
    [rb-s0.8]="--mode static --sparsity 0.8"
    [fb-s0.8]="--mode dynamic --sparsity 0.8"
    [fbplus-s0.8]="--mode dynamic+ --sparsity 0.8"
    [fixed-mask-s0.8]="--mode dynamic --sparsity 0.8 --death-rate 0 --death-rate-final 0"
    [fb-s0.5]="--mode dynamic --sparsity 0.5"
    [fb-s0.9]="--mode dynamic --sparsity 0.9"
    [fb-s0.95]="--mode dynamic --sparsity 0.95"
    [rb-channel-s$CH]="--mode static --ticket channel --sparsity $CH"  # thin network: ~0.2 of the weights
    # the regularizers (results/fashion-mnist-overfit/README.md): TRADES beta 6 and AWP gamma 0.005 as their papers; the EMA decay
    # 0.995 spans ~200 steps, 12 of the 120 epochs of 16 steps (CIFAR's 0.999 spans 3 of its 352-step epochs)
    [dense-trades]="--mode dense --loss trades --trades-beta 6"
    [dense-awp]="--mode dense --awp-gamma 0.005 --awp-warmup 10"
    [dense-ema]="--mode dense --ema-decay 0.995"
    [fbplus-s0.8-trades]="--mode dynamic+ --sparsity 0.8 --loss trades --trades-beta 6"
    [fbplus-s0.8-awp]="--mode dynamic+ --sparsity 0.8 --awp-gamma 0.005 --awp-warmup 10"
    [fbplus-s0.8-ema]="--mode dynamic+ --sparsity 0.8 --ema-decay 0.995"
    # the capacity study: dense networks narrowed to the active weights of 50/90/95% sparsity (nearest count:
    # 87,565 / 17,376 / 8,689 against 87,524 / 17,505 / 8,752), beside Flying Bird and a fixed mask there
    [small-dense-w0.088]="--mode dense --width 0.088"
    [small-dense-w0.04]="--mode dense --width 0.04"
    [small-dense-w0.028]="--mode dense --width 0.028"
    [fixed-mask-s0.95]="--mode dynamic --sparsity 0.95 --death-rate 0 --death-rate-final 0"
  )
  AT08="dense rb-s0.8 fb-s0.8 fbplus-s0.8 small-dense-w0.056 fixed-mask-s0.8"
  queue=()  # "variant seed": seed 0 of every variant first, so that a partial study already compares them
  read -r -a seeds <<< "$SEEDS"
  for v in $AT08; do queue+=("$v ${seeds[0]}"); done
  for seed in "${seeds[@]:1:1}"; do for v in $AT08; do queue+=("$v $seed"); done; done
  for v in fb-s0.5 fb-s0.9 fb-s0.95; do queue+=("$v ${seeds[0]}"); done
  for seed in "${seeds[@]:2}"; do for v in $AT08; do queue+=("$v $seed"); done; done
  for seed in "${seeds[@]}"; do queue+=("rb-channel-s$CH $seed"); done
  for seed in "${seeds[@]}"; do
    for v in dense-trades fbplus-s0.8-trades dense-awp fbplus-s0.8-awp dense-ema fbplus-s0.8-ema; do
      queue+=("$v $seed")
    done
  done
  for seed in "${seeds[@]}"; do  # the capacity study (Flying Bird's sweep has seed 0 above)
    for v in fb-s0.5 fb-s0.9 fb-s0.95; do [ "$seed" = "${seeds[0]}" ] || queue+=("$v $seed"); done
    for v in fixed-mask-s0.95 small-dense-w0.088 small-dense-w0.04 small-dense-w0.028; do queue+=("$v $seed"); done
  done
  if [ -n "${ONLY:-}" ]; then  # ONLY="variant ...": those variants' runs alone
    kept=(); for item in "${queue[@]}"; do [[ " $ONLY " == *" ${item% *} "* ]] && kept+=("$item"); done
    queue=("${kept[@]}")
  fi

  evaluate() {  # evaluate DIR: best.pt and last.pt on the test images and on the training images
    local dir=$1 ck split n
    for ck in best last; do
      for split in test train; do
        n=$([ "$split" = test ] && echo "$TEST_N" || echo 0)
        [ -f "$dir/eval-$ck-$split-$([ "$n" = 0 ] && echo all || echo "n$n")-pgd20x1.json" ] && continue
        OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PYTHON" sparse_win.py --eval "$dir/$ck.pt" --split "$split" \
          --eval-subset "$n" --eval-steps 20 --restarts 1 --attack pgd --check-subset 200 --device cpu \
          --data-dir "$DATA" >> "$dir/log.txt" 2>&1 || return 1
      done
    done
  }
  run_one() {  # run_one VARIANT SEED: train (--resume auto: start, continue or skip), then evaluate
    local v=$1 seed=$2 dir="$OUT/$1/seed$2"
    local args=("${STUDY[@]}" ${VARIANT[$v]} --seed "$seed" --out "$dir" --resume auto)
    mkdir -p "$dir"
    if [ ! -f "$dir/summary.json" ]; then
      echo "== $dir"
      OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PYTHON" sparse_win.py "${args[@]}" >> "$dir/log.txt" 2>&1 ||
        { echo "FAILED: $dir (see $dir/log.txt)" >&2; return 1; }
    fi
    evaluate "$dir" || { echo "FAILED evaluating: $dir (see $dir/log.txt)" >&2; return 1; }
    if [ "$AA" = 1 ] && [ "$seed" = "${seeds[0]}" ] && [[ " $AT08 " == *" $v "* ]] &&
        [ ! -f "$dir/eval-best-test-n500-aa-standard.json" ]; then
      OMP_NUM_THREADS=1 "$PYTHON" sparse_win.py --eval "$dir/best.pt" --split test --eval-subset 500 \
        --attack autoattack --device cpu --data-dir "$DATA" >> "$dir/log.txt" 2>&1 || return 1
    fi
    echo "-- done: $dir"
  }

  for item in "${queue[@]}"; do
    read -r v seed <<< "$item"
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    run_one "$v" "$seed" &
  done
  while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || true; done
  failed=0  # judged by the files, not by wait's statuses
  for item in "${queue[@]}"; do
    read -r v seed <<< "$item"
    [ -f "$OUT/$v/seed$seed/eval-last-train-all-pgd20x1.json" ] || { echo "not finished: $OUT/$v/seed$seed" >&2; failed=1; }
  done
  "$PYTHON" results/study_report.py --overfit "$OUT" "$REPORT" "$TEST_N" || failed=1
  echo "report in $REPORT/table.md"
  exit "$failed"
fi

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

  run_one() {  # run_one DIR ARGS...: --resume auto (start, continue or skip), stdout to DIR/log.txt
    local dir=$1; shift
    [ -f "$dir/summary.json" ] && { echo "done already: $dir"; return 0; }
    local args=("${STUDY[@]}" "$@" --out "$dir" --resume auto)
    mkdir -p "$dir"
    echo "== $dir"
    if ! OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PYTHON" sparse_win.py "${args[@]}" >> "$dir/log.txt" 2>&1; then
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
  "$PYTHON" results/study_report.py --study "$OUT" "$REPORT" || failed=1
  echo "report in $REPORT/table.md"
  exit "$failed"
fi

OUT=${OUT:-runs}
SEEDS=${SEEDS:-0}

if [ ${#EXTRA[@]} -eq 0 ] && [[ " $DATASETS " == *" tiny-imagenet "* ]]; then  # checked before hours of CIFAR
  [ -f "$DATA/tiny-imagenet-200/val/val_annotations.txt" ] || [ -f "$DATA/val/val_annotations.txt" ] || {
    echo "tiny-imagenet not found in $DATA/tiny-imagenet-200 (train/<wnid>/images/*.JPEG, val/images/," \
         "val/val_annotations.txt): put it there, or leave it out (DATASETS=\"cifar10 cifar100\")" >&2; exit 2; }
fi
runs=()  # "dataset mode seed"
for dataset in $DATASETS; do
  for mode in $MODES; do
    for seed in $SEEDS; do runs+=("$dataset $mode $seed"); done
  done
done

run_one() {  # run_one "dataset mode seed" [GPU ids]: --resume auto starts, continues or skips (finished) the run
  local dataset mode seed
  read -r dataset mode seed <<< "$1"
  local dir="$OUT/$dataset-$mode-s0.8-seed$seed"  # the folder sparse_win.py picks for the same run
  local args=(--dataset "$dataset" --mode "$mode" --sparsity 0.8 --seed "$seed" --data-dir "$DATA" --out "$dir")
  if [ ${#EXTRA[@]} -gt 0 ]; then
    args=("${EXTRA[@]}" --mode "$mode" --sparsity 0.8 --seed "$seed" --out "$dir")
  fi
  args+=(--resume auto)
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
paths = sorted(pathlib.Path(sys.argv[1]).glob("*-seed*/summary.json"))
rows = [json.loads(p.read_text()) for p in paths]
for p, r in zip(paths, rows):  # label by run directory: <dataset>-<mode>-s0.8-seed<k>
    r["method"] = f"{p.parent.name} ({r['method']}, data: {r['dataset']})"
print(sw.format_table(rows))
PY
