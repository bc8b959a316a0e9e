# Shared by the Cloud TPU scripts here: flags, defaults per TPU generation,
# and `run`, which prints the command instead of running it under --dry-run.
# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables set here are read by the scripts

DRY_RUN=${DRY_RUN:-0}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
REMOTE_DIR=${REMOTE_DIR:-dynamo_jax}   # on each worker, under $HOME
ARGS=()

# Splits "$@" into options this file knows (into globals) and the rest (ARGS).
parse_common() {
  while (($#)); do
    case $1 in
      --dry-run) DRY_RUN=1 ;;
      --zone) ZONE=$2; shift ;;
      --zone=*) ZONE=${1#*=} ;;
      --project) PROJECT=$2; shift ;;
      --project=*) PROJECT=${1#*=} ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
}

die() { echo "error: $*" >&2; exit 2; }

# The exact command, quoted so it can be pasted into a shell: words with
# shell syntax in single quotes.
show() {
  local word out=() q="'\\''"
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/$q}'")
    fi
  done
  echo "${out[*]}"
}

run() {
  if [[ $DRY_RUN == 1 ]]; then show "$@"; else "$@"; fi
}

# Default zone and software version of an accelerator type (check current
# availability: gcloud compute tpus accelerator-types list --zone=ZONE).
tpu_defaults() {
  local type=$1
  case $type in
    v4-*) DEFAULT_ZONE=us-central2-b; VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*) DEFAULT_ZONE=us-west4-a; VERSION=v2-alpha-tpuv5-lite ;;
    v6e-*) DEFAULT_ZONE=us-east5-b; VERSION=v2-alpha-tpuv6e ;;
    *) die "unknown accelerator type $type (v4-8, v4-32, v5litepod-8, v5litepod-32, v6e-8, ...)" ;;
  esac
  ZONE=${ZONE:-$DEFAULT_ZONE}
}

# gcloud's common flags: the zone (required) and the project (if given).
gflags() {
  [[ -n $ZONE ]] || die "give --zone (or ZONE=...)"
  GFLAGS=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then GFLAGS+=(--project="$PROJECT"); fi
}

# Runs a shell command on every worker of slice $1 at once.
on_all_workers() {
  local name=$1 command=$2
  gflags
  run gcloud compute tpus tpu-vm ssh "$name" "${GFLAGS[@]}" --worker=all \
    --command="$command"
}
