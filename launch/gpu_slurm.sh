#!/usr/bin/env bash
# Multi-node GPU runs of prompt_t5x under SLURM: one process per node, each driving all its GPUs.
#
#   launch/gpu_slurm.sh --nodes 4 --gpus_per_node 8 [--partition P] [--time 24:00:00] \
#       [--venv PATH] [--port 12345] [--dry-run] -- prompt-t5x train --gin_file=... --mesh=4x8
#
# Writes a batch script and submits it with sbatch. Inside the job, srun starts one task per node;
# each task exports JAX_COORDINATOR_ADDRESS (first node of the allocation), JAX_NUM_PROCESSES and
# JAX_PROCESS_ID, which prompt_t5x.parallel.distributed.initialize passes to jax.distributed.initialize.
# --dry-run prints the batch script and the sbatch command instead of submitting.
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }

NODES=1
GPUS_PER_NODE=8
PARTITION=""
TIME="24:00:00"
JOB_NAME=prompt-t5x
PORT=12345
VENV=""
WORKDIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT=""
DRY_RUN=0
USER_COMMAND=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --gpus_per_node) GPUS_PER_NODE="$2"; shift 2 ;;
    --partition) PARTITION="$2"; shift 2 ;;
    --time) TIME="$2"; shift 2 ;;
    --job_name) JOB_NAME="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --script) SCRIPT="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; USER_COMMAND=("$@"); break ;;
    *) echo "gpu_slurm.sh: unknown flag '$1' (see --help)" >&2; exit 2 ;;
  esac
done

for pair in "nodes:$NODES" "gpus_per_node:$GPUS_PER_NODE" "port:$PORT"; do
  if ! [[ "${pair#*:}" =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_slurm.sh: --${pair%%:*} must be a positive integer, got '${pair#*:}'." >&2
    exit 2
  fi
done
if [[ ${#USER_COMMAND[@]} -eq 0 ]]; then
  echo "gpu_slurm.sh: give the command after '--', e.g. -- prompt-t5x train --gin_file=..." >&2
  exit 2
fi

show() {
  local out="" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then out+="$arg "; else out+="${arg@Q} "; fi
  done
  echo "${out% }"
}

ACTIVATE=""
[[ -n "$VENV" ]] && ACTIVATE="source $(show "$VENV/bin/activate")"
PARTITION_LINE=""
[[ -n "$PARTITION" ]] && PARTITION_LINE="#SBATCH --partition=$PARTITION"

BATCH_SCRIPT="#!/usr/bin/env bash
#SBATCH --job-name=$JOB_NAME
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$GPUS_PER_NODE
#SBATCH --time=$TIME
#SBATCH --output=%x-%j.out
$PARTITION_LINE
set -euo pipefail
cd $(show "$WORKDIR")
$ACTIVATE
# Process 0 (the first node) hosts JAX's coordinator; every task learns its id from SLURM.
# (sed, not head: head exits early and, under pipefail, scontrol's SIGPIPE would fail the job.)
COORDINATOR=\"\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | sed -n 1p):$PORT\"
srun --nodes=$NODES --ntasks-per-node=1 --gpus-per-node=$GPUS_PER_NODE bash -c '
  export JAX_COORDINATOR_ADDRESS='\"\$COORDINATOR\"'
  export JAX_NUM_PROCESSES=\$SLURM_NTASKS
  export JAX_PROCESS_ID=\$SLURM_PROCID
  exec $(show "${USER_COMMAND[@]}" | sed "s/'/'\\\\''/g")'
"

if [[ -z "$SCRIPT" ]]; then
  SCRIPT="$WORKDIR/runs/slurm/$JOB_NAME.sbatch"
fi
if [[ $DRY_RUN -eq 1 ]]; then
  echo "# batch script ($SCRIPT):"
  echo "$BATCH_SCRIPT"
  echo "# submit:"
  show sbatch "$SCRIPT"
else
  mkdir -p "$(dirname "$SCRIPT")"
  printf '%s' "$BATCH_SCRIPT" > "$SCRIPT"
  sbatch "$SCRIPT"
fi
