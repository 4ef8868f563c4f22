#!/usr/bin/env bash
# The recall probe on a CPU: the six-layout sweep of experiment=recall run as parallel
# one-thread sweeps, then every point scored with `mixtrain eval --tasks recall`, then
# one `mixtrain compare` over all of them (table, compare.csv, recall.png).
#
#   launch/recall_sweep.sh [--out DIR] [--jobs N] [--layouts a,b,...] [--compile auto|on|off]
#                          [--dry-run] [overrides...]
#   launch/recall_sweep.sh --out runs/recall                  # ~55 min on a 2-core CPU
#   launch/recall_sweep.sh --layouts ma,ma_offset train.max_tokens=4e6
#
# - Layouts (default standard,swa,ma,ma_endslide,ma_offset,ma_pairs_6) are dealt round
#   robin into N sweeps (--jobs; default: the CPU count, at most the number of layouts),
#   each `mixtrain train -m experiment=recall layout=...` with OMP_NUM_THREADS=1: on a
#   small CPU one thread per run gets more steps per second out of the cores than one
#   run with all of them. Overrides go to every run.
# - --compile (default auto): trainer.compile=true (torch.compile per block, ~1.5x the
#   steps per second of eager on a CPU) when a C++ compiler is found (inductor builds its
#   CPU kernels with it; $CXX, else c++ or g++); off otherwise, with a note.
# - DIR (default runs/recall-<stamp>) holds sweep-<i>/ (the runs), eval logs beside each
#   run (<run>/eval/recall.json) and compare/ (the table and recall.png).
# - Exits 1 when a sweep or an evaluation failed (the other sweeps still finish).
# - --dry-run (or MIXTRAIN_DRY_RUN=1) prints the commands instead of running them.
set -euo pipefail

out="" jobs="" layouts="standard,swa,ma,ma_endslide,ma_offset,ma_pairs_6" compile=auto
dry="${MIXTRAIN_DRY_RUN:-0}"
args=()
while (($#)); do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --layouts) layouts="$2"; shift 2 ;;
    --compile) compile="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1"); shift ;;
  esac
done

IFS=, read -r -a all <<< "$layouts"
if ((${#all[@]} == 0)); then
  echo "recall_sweep.sh: --layouts is empty; give a comma-separated list (e.g. --layouts ma,ma_offset)" >&2
  exit 2
fi
if [[ -z "$jobs" ]]; then
  jobs="$(nproc 2>/dev/null || echo 1)"
fi
if ! [[ "$jobs" =~ ^[1-9][0-9]*$ ]]; then
  echo "recall_sweep.sh: --jobs $jobs is not a positive whole number" >&2
  exit 2
fi
((jobs > ${#all[@]})) && jobs=${#all[@]}
case "$compile" in
  on) ;;
  off) ;;
  auto)
    compile=off
    for cxx in ${CXX:-} c++ g++; do
      if command -v "$cxx" > /dev/null 2>&1; then compile=on; break; fi
    done
    if [[ "$compile" == off ]]; then
      echo "recall_sweep.sh: no C++ compiler found (\$CXX, c++, g++): training eager, ~1.5x slower than with torch.compile" >&2
    fi ;;
  *) echo "recall_sweep.sh: --compile $compile is not one of auto, on, off" >&2; exit 2 ;;
esac
if [[ "$compile" == on ]]; then
  args=("trainer.compile=true" ${args[@]+"${args[@]}"})
fi
out="${out:-runs/recall-$(date +%Y%m%d-%H%M%S)}"
mixtrain="${MIXTRAIN:-mixtrain}"

groups=()
for ((i = 0; i < ${#all[@]}; i++)); do
  g=$((i % jobs))
  groups[g]="${groups[g]:+${groups[g]},}${all[i]}"
done

if ((dry)); then
  for ((g = 0; g < jobs; g++)); do
    echo "OMP_NUM_THREADS=1 $mixtrain train -m experiment=recall layout=${groups[g]} run.root=$out/sweep-$g ${args[*]:-}"
  done
  echo "$mixtrain eval --model <each run> --tasks recall --samples 256 --lengths 64,128"
  echo "$mixtrain compare $out/sweep-*/sweeps/* --out $out/compare"
  exit 0
fi

mkdir -p "$out"
start=$(date +%s)
pids=()
for ((g = 0; g < jobs; g++)); do
  echo "sweep $g: layout=${groups[g]} -> $out/sweep-$g (log: $out/sweep-$g.log)"
  OMP_NUM_THREADS=1 "$mixtrain" train -m experiment=recall "layout=${groups[g]}" "run.root=$out/sweep-$g" \
    ${args[@]+"${args[@]}"} > "$out/sweep-$g.log" 2>&1 &
  pids+=($!)
done
failed=0
for ((g = 0; g < jobs; g++)); do
  if ! wait "${pids[g]}"; then
    echo "sweep $g (layout=${groups[g]}) failed: see $out/sweep-$g.log" >&2
    failed=1
  fi
done
echo "training: $(( ($(date +%s) - start) / 60 )) min"

sweeps=("$out"/sweep-*/sweeps/*)
for run in "$out"/sweep-*/sweeps/*/*/; do
  [[ -f "$run/result.json" && -d "$run/checkpoints" ]] || continue
  echo "eval: $run"
  if ! "$mixtrain" eval --model "$run" --tasks recall --samples 256 --lengths 64,128 > "$run/eval.log" 2>&1; then
    echo "eval of $run failed: see $run/eval.log" >&2
    failed=1
  fi
done
if [[ -d "${sweeps[0]}" ]]; then
  "$mixtrain" compare "${sweeps[@]}" --out "$out/compare" || failed=1
fi
echo "total: $(( ($(date +%s) - start) / 60 )) min; table and recall.png in $out/compare"
exit "$failed"
