#!/usr/bin/env bash
# Installs this checkout on GPU hosts over ssh: copies a `git archive` of
# HEAD, makes a venv, installs jax[cuda12] and the package. A multi-host run
# also needs one workdir that all hosts see (NFS or similar, same path).
#   experiments/gpu/setup.sh HOST [HOST...] [--dry-run]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=experiments/tpu/common.sh
source "$here/../tpu/common.sh"  # flags, run / --dry-run
parse_common "$@"
((${#ARGS[@]} >= 1)) || die "usage: $0 HOST [HOST...] [--dry-run]"
repo=$(cd "$here/../.." && pwd)
archive=/tmp/dynamo_jax-src.tar.gz
run git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
for host in "${ARGS[@]}"; do
  run scp "$archive" "$host:dynamo_jax-src.tar.gz"
  run ssh "$host" "set -e; rm -rf ~/$REMOTE_DIR; mkdir -p ~/$REMOTE_DIR; \
tar -xzf ~/dynamo_jax-src.tar.gz -C ~/$REMOTE_DIR; cd ~/$REMOTE_DIR; \
python3 -m venv .venv; .venv/bin/pip install -q -U pip; \
.venv/bin/pip install -q 'jax[cuda12]' -e .; \
.venv/bin/python -c 'import jax; print(jax.devices())'"
done
