#!/usr/bin/env bash
# The performance issue's measurements on one NVIDIA GPU, ours and HF PEFT side by side.
#
#   launch/gpu_bench.sh STAGE [--out DIR] [--python PY] [--dry-run]
#
# STAGE, in the order that decides the targets first (each fits one 10-minute device call):
#   env     versions, nvidia-smi and a tiny smoke run of ours and the peer (seconds)
#   xl      xl target: ours (dots_no_batch, cuDNN) then PEFT + torch.compile, same process tree
#   xxl     xxl target: ours with dots_no_batch and with full remat
#   xxlpeer PEFT at xxl with gradient checkpointing + torch.compile
#   base    base target and the eval phases: ours vs PEFT + torch.compile
#   peer    the rest of the issue's PEFT table: eager base/xl, xl with gradient checkpointing
#   ablate  the levers at xl, each one flag away from the xl run
# The xl and xxl runs of ours also trace 10 more steps after timing them (bench --profile): the
# JSON then splits the step's device time into matmul / attention / collective / other.
# Every run writes DIR/STAGE_NAME.json (bench --json) and appends its output to DIR/STAGE.log;
# a run that fails or passes its time limit is logged and the stage goes on. The checkout runs in
# place (PYTHONPATH = repo root): bench and the peer import no TensorFlow, gin or SeqIO.
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/bench_out}"
PY=python3
DRY_RUN=0
STAGE=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_bench.sh: unknown flag $1 (see --help)" >&2; exit 2 ;;
    *) [[ -z "$STAGE" ]] || { echo "gpu_bench.sh: one STAGE only, got '$STAGE' and '$1'" >&2; exit 2; }
       STAGE="$1"; shift ;;
  esac
done
STAGES="env xl xxl xxlpeer base peer ablate"
if [[ -z "$STAGE" || " $STAGES " != *" $STAGE "* ]]; then
  echo "gpu_bench.sh: STAGE must be one of: $STAGES (got '${STAGE}')" >&2
  exit 2
fi

# The issue's configuration: batch 32, encoder 512 = 100 prompt + 412 tokens, decoder 16, bf16.
B="--batch 32 --encoder_len 512 --prompt_len 100 --decoder_len 16 --steps 10 --warmup 2"
OURS="-m prompt_t5x bench"
# Traces stay on the machine (folders too deep to come back); their split is in the JSON.
PROFILES=/tmp/prompt_t5x_profiles
PEER="-m prompt_t5x.bench.peft_peer"

# run NAME LIMIT_S ARGS...: one timed run, its JSON in $OUT/$STAGE_$NAME.json. A stage's
# LIMIT_S + 20 s of grace add up to at most 570 s: one device call is capped at 600 s.
run() {
  local name="$1" limit="$2"; shift 2
  local json="$OUT/${STAGE}_${name}.json"
  local cmd=(timeout --kill-after=20 "$limit" "$PY" "$@" --json "$json")
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "${cmd[*]}"
    return 0
  fi
  echo "=== $name: ${cmd[*]}" | tee -a "$OUT/$STAGE.log"
  local rc=0
  "${cmd[@]}" 2>&1 | tee -a "$OUT/$STAGE.log" || rc=$?
  echo "=== $name: exit $rc" | tee -a "$OUT/$STAGE.log"
}

if [[ "$DRY_RUN" == 0 ]]; then
  mkdir -p "$OUT"
  cd "$REPO"
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  # xxl needs more than JAX's default 75% of the card; the peer runs in its own process.
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
fi

if [[ "$DRY_RUN" == 0 ]]; then   # every stage's log starts with what it ran on
  { date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    "$PY" -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" || true
    "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.version.cuda)" || true
  } 2>&1 | tee -a "$OUT/$STAGE.log"
fi

case "$STAGE" in
  env)
    run smoke_ours 120 $OURS --size small --batch 8 --encoder_len 128 --prompt_len 20 --decoder_len 8 --steps 1 --warmup 0 --phases train,decode --attention cudnn
    run smoke_peer 120 $PEER --size small --batch 8 --encoder_len 128 --prompt_len 20 --decoder_len 8 --steps 1 --warmup 0 --phases train,decode
    ;;
  xl)
    run ours_peer_compiled 550 $OURS --size xl $B --remat dots_no_batch --attention cudnn --phases train --peer peft --peer_compile --profile "$PROFILES/xl"
    ;;
  xxl)
    run ours_dots_no_batch 265 $OURS --size xxl $B --remat dots_no_batch --attention cudnn --phases train --profile "$PROFILES/xxl"
    run ours_full 265 $OURS --size xxl $B --remat full --attention cudnn --phases train
    ;;
  xxlpeer)
    run peer_ckpt_compiled 550 $PEER --size xxl $B --phases train --grad_ckpt --compile
    ;;
  base)
    run ours_peer_compiled 550 $OURS --size base $B --remat none --attention cudnn --peer peft --peer_compile
    ;;
  peer)
    run base_eager 130 $PEER --size base $B --phases train
    run xl_eager 180 $PEER --size xl $B --phases train
    run xl_ckpt 180 $PEER --size xl $B --phases train --grad_ckpt
    ;;
  ablate)
    run xl_einsum 120 $OURS --size xl $B --remat dots_no_batch --attention einsum --phases train
    run xl_xla 120 $OURS --size xl $B --remat dots_no_batch --attention xla --phases train
    run xl_full 120 $OURS --size xl $B --remat full --attention cudnn --phases train
    run xl_f32_weights 120 $OURS --size xl $B --remat dots_no_batch --attention cudnn --param_dtype float32 --phases train
    ;;
esac
