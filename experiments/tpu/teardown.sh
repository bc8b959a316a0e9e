#!/usr/bin/env bash
# Deletes a slice (billing stops). Copy anything needed off it first; a
# workdir on /mnt/shared (Filestore) survives.
#   experiments/tpu/teardown.sh NAME [--zone Z] [--dry-run]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=experiments/tpu/common.sh
source "$here/common.sh"
parse_common "$@"
((${#ARGS[@]} == 1)) || die "usage: $0 NAME [--zone Z] [--dry-run]"
gflags
run gcloud compute tpus tpu-vm delete "${ARGS[0]}" "${GFLAGS[@]}" --quiet
