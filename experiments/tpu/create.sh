#!/usr/bin/env bash
# Creates a Cloud TPU VM slice: single host (v4-8, v5litepod-8, v6e-8) or a
# multi-host pod slice (v4-32: 4 hosts, v5litepod-32: 8 hosts).
#   experiments/tpu/create.sh NAME TYPE [--zone Z] [--project P] [--spot] [--dry-run]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=experiments/tpu/common.sh
source "$here/common.sh"
parse_common "$@"
set -- "${ARGS[@]}"
(($# >= 2)) || die "usage: $0 NAME TYPE [--zone Z] [--project P] [--spot] [--dry-run]"
name=$1 type=$2
shift 2
tpu_defaults "$type"
gflags
extra=()
for arg in "$@"; do
  case $arg in
    --spot) extra+=(--spot) ;;
    *) die "unknown option $arg" ;;
  esac
done
run gcloud compute tpus tpu-vm create "$name" "${GFLAGS[@]}" \
  --accelerator-type="$type" --version="$VERSION" "${extra[@]}"
