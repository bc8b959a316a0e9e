#!/usr/bin/env bash
# Runs one `python -m dynamo_jax` job on every worker of a slice at once,
# each writing ~/dynamo_logs/JOB-HOST.log, then copies the logs back to
# ./logs/NAME/. `train` gets --distributed (JAX finds the other workers
# itself on a TPU VM); give it a --workdir that every worker sees (setup.sh
# --nfs mounts one at /mnt/shared). convert / cooc / eval / bench run the
# same command on each worker (e.g. each host converting to its local disk).
#   experiments/tpu/run.sh NAME [--zone Z] [--dry-run] -- train --config dynamo-7.3b-t3 --workdir /mnt/shared/t3
#   experiments/tpu/run.sh NAME -- bench ...
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=experiments/tpu/common.sh
source "$here/common.sh"
before=()
while (($#)) && [[ $1 != -- ]]; do before+=("$1"); shift; done
(($#)) || die "usage: $0 NAME [--zone Z] [--dry-run] -- COMMAND [ARGS...]"
shift
parse_common "${before[@]}"
((${#ARGS[@]} == 1)) || die "give one slice NAME before --"
name=${ARGS[0]}
(($#)) || die "give the dynamo_jax command after --, e.g. train --config ..."
job=$1
case $job in
  train) extra=(--distributed) ;;
  convert|cooc|eval|bench|generate) extra=() ;;
  *) die "unknown job $job (convert, train, cooc, eval, bench, generate)" ;;
esac
printf -v cmd '%q ' "$@" "${extra[@]}"
stamp=${STAMP:-$(date +%Y%m%d-%H%M%S)}
log="dynamo_logs/$job-$stamp-\$(hostname).log"
status=0
on_all_workers "$name" "mkdir -p ~/dynamo_logs; cd ~/$REMOTE_DIR && \
.venv/bin/python -m dynamo_jax $cmd> ~/$log 2>&1" || status=$?
run mkdir -p "logs/$name"
run gcloud compute tpus tpu-vm scp "$name:dynamo_logs/$job-$stamp-*.log" \
  "logs/$name/" "${GFLAGS[@]}" --worker=all
exit "$status"
