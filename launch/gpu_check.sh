#!/usr/bin/env bash
# Every GPU figure the README lists as "not measured yet", on one GPU in at most 9 minutes:
# the GPU-only tests, the dense ~1B and MoE MFU benches, the 32K ma_offset/standard step
# time ratio, the MoE-layer bench and `bench infer` at 32K with the decode bandwidth.
#
#   launch/gpu_check.sh OUT_DIR [--budget SECONDS] [--only STEP,...] [--dry-run] [--smoke]
#
# Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (plus each step's folder).
# It first checks, in seconds, that CUDA, bf16, the kernels and every package the steps
# import are there, and stops with one message listing what is missing (exit 2) before
# anything long runs. Exit 1 when a step failed or timed out (the others still ran).
# Runs from a checkout without installing it (the project root goes on PYTHONPATH); if
# the folder .whl/ holds wheels for packages this machine lacks, .whl/setup.sh (when
# present) is sourced first to install them.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if (($# == 0)) || [[ "$1" == -h || "$1" == --help ]]; then sed -n '2,15p' "$0"; exit 0; fi
out="$1"; shift
[[ "$out" == /* ]] || out="$PWD/$out"
cd "$root"
if [[ -f .whl/setup.sh ]]; then
  # shellcheck disable=SC1091
  source .whl/setup.sh || { echo "gpu_check: .whl/setup.sh failed to install the wheels in .whl/" >&2; exit 2; }
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export WANDB_MODE="${WANDB_MODE:-offline}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || { echo "gpu_check: $PY not found (set PYTHON=...)" >&2; exit 2; }
"$PY" -c 'import torch' 2>/dev/null || { echo "gpu_check: torch does not import with $PY; install a CUDA build of torch" >&2; exit 2; }
exec "$PY" -m mixtrain.gpucheck --out "$out" "$@"
