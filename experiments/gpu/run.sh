#!/usr/bin/env bash
# Runs one `python -m dynamo_jax` job on GPU hosts, one process per host
# (it drives all of that host's GPUs). Without --hosts: here, one process.
# With --hosts A,B,...: over ssh on each at once, `train` with --coordinator
# A:PORT --num-processes N --process-id I (the workdir must be one directory
# all hosts see); each host's output goes to logs/gpu/JOB-STAMP-HOST.log here.
#   experiments/gpu/run.sh [--dry-run] -- train --config dynamo-7.3b-t3 --workdir runs/t3
#   experiments/gpu/run.sh --hosts gpu0,gpu1 [--port 8476] [--dry-run] -- train ...
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=experiments/tpu/common.sh
source "$here/../tpu/common.sh"  # flags, run / --dry-run
before=()
while (($#)) && [[ $1 != -- ]]; do before+=("$1"); shift; done
(($#)) || die "usage: $0 [--hosts A,B] [--port P] [--dry-run] -- COMMAND [ARGS...]"
shift
parse_common "${before[@]}"
hosts=() port=8476
set -- "${ARGS[@]}" -- "$@"
while [[ $1 != -- ]]; do
  case $1 in
    --hosts) IFS=, read -r -a hosts <<< "$2"; shift ;;
    --port) port=$2; shift ;;
    *) die "unknown option $1" ;;
  esac
  shift
done
shift
(($#)) || die "give the dynamo_jax command after --, e.g. train --config ..."
job=$1
case $job in
  convert|train|cooc|eval|bench|generate) ;;
  *) die "unknown job $job (convert, train, cooc, eval, bench, generate)" ;;
esac
if ((${#hosts[@]} == 0)); then
  run python -m dynamo_jax "$@"
  exit
fi
stamp=${STAMP:-$(date +%Y%m%d-%H%M%S)}
run mkdir -p logs/gpu
pids=()
for i in "${!hosts[@]}"; do
  host=${hosts[$i]}
  extra=()
  if [[ $job == train ]]; then
    extra=(--coordinator "${hosts[0]}:$port" --num-processes "${#hosts[@]}"
           --process-id "$i")
  fi
  printf -v cmd '%q ' "$@" "${extra[@]}"
  remote="cd ~/$REMOTE_DIR && .venv/bin/python -m dynamo_jax ${cmd% }"
  log="logs/gpu/$job-$stamp-$host.log"
  if [[ $DRY_RUN == 1 ]]; then
    echo "$(show ssh "$host" "$remote") > $log 2>&1 &"
  else
    # shellcheck disable=SC2029  # $remote is built here, its words %q-quoted
    ssh "$host" "$remote" > "$log" 2>&1 &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
