#!/usr/bin/env bash
# Cloud TPU VM slices (v3, v4, v5e; one host or a pod slice) for prompt_t5x.
#
#   launch/tpu_vm.sh create  --name NAME --accelerator v4-32 [--zone Z] [--project P] [--spot]
#   launch/tpu_vm.sh install --name NAME --accelerator v4-32       # copy this checkout, pip install
#   launch/tpu_vm.sh run     --name NAME --accelerator v4-32 -- prompt-t5x train --gin_file=...
#   launch/tpu_vm.sh stop    --name NAME ...                       # stop (keeps the disk)
#   launch/tpu_vm.sh delete  --name NAME ...                       # delete the slice
#
# Every remote command goes to all workers at once (--worker=all): a pod slice only runs when the
# same program starts on every host, and JAX finds the other workers itself
# (prompt_t5x.parallel.distributed.initialize detects the pod from the TPU VM environment).
# --dry-run prints the exact commands instead of running them.
set -euo pipefail

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'

flags:
  --name NAME          TPU VM name (default: prompt-t5x)
  --accelerator TYPE   v3-8, v3-32, v4-8, v4-32, v5litepod-16 (v5e-16 is accepted), ...
  --zone ZONE          default per generation: v3 europe-west4-a, v4 us-central2-b, v5e us-west4-a
  --project PROJECT    default: gcloud's configured project
  --version VERSION    TPU software version (default: tpu-ubuntu2204-base for v3/v4,
                       v2-alpha-tpuv5-lite for v5e)
  --spot               create a Spot (preemptible) slice
  --source DIR         checkout to install (default: this repository)
  --dry-run            print the commands, run nothing
EOF
}

NAME=prompt-t5x
ACCELERATOR=v4-8
ZONE=""
PROJECT=""
VERSION=""
SPOT=0
DRY_RUN=0
SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMMAND=""
USER_COMMAND=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --accelerator) ACCELERATOR="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --source) SOURCE="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; USER_COMMAND=("$@"); break ;;
    -*) echo "tpu_vm.sh: unknown flag '$1' (see --help)" >&2; exit 2 ;;
    *)
      if [[ -n "$COMMAND" ]]; then
        echo "tpu_vm.sh: two commands given ('$COMMAND', '$1');" \
          "pass a program to run after '--'." >&2
        exit 2
      fi
      COMMAND="$1"; shift ;;
  esac
done

# v5e's accelerator types are called v5litepod-N; accept the marketing name too.
ACCELERATOR="${ACCELERATOR/#v5e-/v5litepod-}"
case "$ACCELERATOR" in
  v3-*) GENERATION=v3; DEFAULT_ZONE=europe-west4-a; DEFAULT_VERSION=tpu-ubuntu2204-base ;;
  v4-*) GENERATION=v4; DEFAULT_ZONE=us-central2-b; DEFAULT_VERSION=tpu-ubuntu2204-base ;;
  v5litepod-*) GENERATION=v5e; DEFAULT_ZONE=us-west4-a; DEFAULT_VERSION=v2-alpha-tpuv5-lite ;;
  *) echo "tpu_vm.sh: accelerator '$ACCELERATOR' is not a v3-N, v4-N or v5litepod-N slice." >&2
     exit 2 ;;
esac
if ! [[ "${ACCELERATOR##*-}" =~ ^[0-9]+$ ]]; then
  echo "tpu_vm.sh: accelerator '$ACCELERATOR' must end in a core/chip count," \
    "e.g. ${GENERATION}-8." >&2
  exit 2
fi
ZONE="${ZONE:-$DEFAULT_ZONE}"
VERSION="${VERSION:-$DEFAULT_VERSION}"

# Print one command so that it can be pasted back into a shell (quote only what needs it).
show() {
  local out="" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then out+="$arg "; else out+="${arg@Q} "; fi
  done
  echo "${out% }"
}
run() {
  if [[ $DRY_RUN -eq 1 ]]; then show "$@"; else "$@"; fi
}

TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")
REMOTE_DIR=prompt_t5x
ARCHIVE=/tmp/prompt_t5x-src.tgz

case "$COMMAND" in
  create)
    EXTRA=()
    [[ $SPOT -eq 1 ]] && EXTRA+=(--spot)
    run "${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" \
      --version="$VERSION" "${EXTRA[@]}"
    ;;
  install)
    # The checkout travels as one archive (no git remote needed); .venv and .git stay behind.
    run tar --exclude=.venv --exclude=.git --exclude=__pycache__ --exclude=runs \
      -czf "$ARCHIVE" -C "$SOURCE" .
    run "${TPU[@]}" scp "$ARCHIVE" "$NAME:$ARCHIVE" "${WHERE[@]}" --worker=all
    SETUP="mkdir -p ~/$REMOTE_DIR && tar -xzf $ARCHIVE -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR"
    SETUP+=" && python3 -m pip install -U pip"
    SETUP+=" && python3 -m pip install 'jax[tpu]>=0.10.2,<0.12'"
    SETUP+=" && python3 -m pip install -e '.[data]'"
    run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$SETUP"
    ;;
  run)
    if [[ ${#USER_COMMAND[@]} -eq 0 ]]; then
      echo "tpu_vm.sh run: give the command after '--', e.g. -- prompt-t5x train --gin_file=..." >&2
      exit 2
    fi
    REMOTE="cd ~/$REMOTE_DIR && export PATH=\$HOME/.local/bin:\$PATH"
    REMOTE+=" && $(show "${USER_COMMAND[@]}")"
    run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$REMOTE"
    ;;
  stop)
    run "${TPU[@]}" stop "$NAME" "${WHERE[@]}"
    ;;
  delete)
    run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet
    ;;
  ""|-h|--help|help)
    usage; [[ -n "$COMMAND" ]] && exit 0 || exit 2
    ;;
  *)
    echo "tpu_vm.sh: unknown command '$COMMAND' (create, install, run, stop, delete)" >&2
    exit 2
    ;;
esac
