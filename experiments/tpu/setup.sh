#!/usr/bin/env bash
# Installs this checkout on every worker of a slice: copies a `git archive`
# of HEAD, makes a venv, installs jax[tpu] and the package. With --nfs
# ADDR:/SHARE it also mounts that share (e.g. a Filestore instance) at
# /mnt/shared on every worker: a multi-host run needs one workdir that all
# workers see.
#   experiments/tpu/setup.sh NAME [--nfs 10.0.0.2:/share] [--zone Z] [--dry-run]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=experiments/tpu/common.sh
source "$here/common.sh"
parse_common "$@"
set -- "${ARGS[@]}"
(($# >= 1)) || die "usage: $0 NAME [--nfs ADDR:/SHARE] [--zone Z] [--dry-run]"
name=$1
shift
nfs=
while (($#)); do
  case $1 in
    --nfs) nfs=$2; shift ;;
    *) die "unknown option $1" ;;
  esac
  shift
done
gflags
repo=$(cd "$here/../.." && pwd)
archive=/tmp/dynamo_jax-src.tar.gz
run git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
run gcloud compute tpus tpu-vm scp "$archive" "$name:dynamo_jax-src.tar.gz" \
  "${GFLAGS[@]}" --worker=all
on_all_workers "$name" "set -e; rm -rf ~/$REMOTE_DIR; mkdir -p ~/$REMOTE_DIR; \
tar -xzf ~/dynamo_jax-src.tar.gz -C ~/$REMOTE_DIR; cd ~/$REMOTE_DIR; \
python3 -m venv .venv; .venv/bin/pip install -q -U pip; \
.venv/bin/pip install -q 'jax[tpu]' -e .; \
.venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count())'"
if [[ -n $nfs ]]; then
  on_all_workers "$name" "set -e; sudo apt-get -qq install -y nfs-common; \
sudo mkdir -p /mnt/shared; sudo mount -t nfs -o hard,timeo=600 $nfs /mnt/shared; \
sudo chmod 1777 /mnt/shared"
fi
