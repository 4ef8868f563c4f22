#!/usr/bin/env bash
# One node, N processes (GPUs), through torchrun; or several nodes without SLURM (c10d).
#
#   launch/torchrun.sh [--nproc N] [--cpu] [--name RUN_NAME] [--dry-run] [overrides...]
#   launch/torchrun.sh --nproc 8 model=dense_125m layout=ma_offset
#   launch/torchrun.sh --nproc 8 --nnodes 2 --node-rank 0 --master node01:29500 model=...  # on each node
#
# - N: --nproc, else $NGPUS, else the number of visible GPUs (nvidia-smi -L), else 1.
# - --cpu: CPU processes with gloo (trainer=cpu_fsdp): what the tests run.
# - Every rank agrees on the run directory: MIXTRAIN_RUN_STAMP is pinned here (the
#   value printed; default: the clock) and exported to all ranks; --name pins run.name.
# - run.resume=auto is always passed: run the same command again with the same
#   --name (or MIXTRAIN_RUN_STAMP) after a crash and it continues from the newest
#   complete checkpoint, in the same run directory and the same W&B run.
# - --dry-run (or MIXTRAIN_DRY_RUN=1) prints the command instead of running it.
# - Extra torchrun arguments: $TORCHRUN_ARGS. Trainer recipe: --trainer NAME (default
#   fsdp; cpu_fsdp with --cpu; ddp also works).
set -euo pipefail

nproc="${NGPUS:-}" nnodes=1 node_rank=0 master="" cpu=0 name="${RUN_NAME:-}" trainer=""
dry="${MIXTRAIN_DRY_RUN:-0}"
args=()
while (($#)); do
  case "$1" in
    --nproc|--nproc-per-node|--nproc_per_node) nproc="$2"; shift 2 ;;
    --nnodes) nnodes="$2"; shift 2 ;;
    --node-rank|--node_rank) node_rank="$2"; shift 2 ;;
    --master|--rdzv-endpoint) master="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --trainer) trainer="$2"; shift 2 ;;
    --cpu) cpu=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1"); shift ;;
  esac
done

if [[ -z "$nproc" ]]; then
  if ((cpu == 0)) && command -v nvidia-smi >/dev/null 2>&1; then
    nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  [[ -n "$nproc" && "$nproc" -gt 0 ]] || nproc=1
fi
if [[ -z "$trainer" ]]; then
  if ((cpu)); then trainer=cpu_fsdp; else trainer=fsdp; fi
fi

# One stamp for every rank and every restart that reuses it. Several nodes each start
# this script: they must be given the same one.
if ((nnodes > 1)) && [[ -z "${MIXTRAIN_RUN_STAMP:-}" ]]; then
  echo "torchrun.sh: with --nnodes $nnodes, set the same MIXTRAIN_RUN_STAMP=<id> on every node (it names the run directory and the rendezvous)" >&2
  exit 2
fi
export MIXTRAIN_RUN_STAMP="${MIXTRAIN_RUN_STAMP:-$(date +%Y%m%d-%H%M%S)}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if command -v torchrun >/dev/null 2>&1 && [[ -z "${PYTHON:-}" ]]; then
  launcher=(torchrun)
else
  launcher=("${PYTHON:-python}" -m torch.distributed.run)
fi
if ((nnodes > 1)); then
  [[ -n "$master" ]] || { echo "torchrun.sh: --nnodes $nnodes needs --master HOST:PORT (the first node)" >&2; exit 2; }
  rdzv=(--nnodes="$nnodes" --node-rank="$node_rank" --rdzv-backend=c10d --rdzv-endpoint="$master" --rdzv-id="$MIXTRAIN_RUN_STAMP")
else
  rdzv=(--standalone --nnodes=1)
fi

overrides=("trainer=$trainer" "trainer.devices=$nproc" "trainer.num_nodes=$nnodes")
[[ -n "$name" ]] && overrides+=("run.name=$name")
resume="run.resume=auto"
for a in "${args[@]+"${args[@]}"}"; do [[ "$a" == run.resume=* ]] && resume=""; done
[[ -n "$resume" ]] && overrides+=("$resume")

cmd=("${launcher[@]}" "${rdzv[@]}" --nproc-per-node="$nproc" ${TORCHRUN_ARGS:-} -m mixtrain train "${overrides[@]}" "${args[@]+"${args[@]}"}")

if [[ "$dry" != 0 ]]; then
  printf 'MIXTRAIN_RUN_STAMP=%q' "$MIXTRAIN_RUN_STAMP"
  printf ' %q' "${cmd[@]}"
  printf '\n'
  exit 0
fi
echo "torchrun.sh: MIXTRAIN_RUN_STAMP=$MIXTRAIN_RUN_STAMP (reuse it, or --name, to continue this run)" >&2
exec "${cmd[@]}"
