#!/usr/bin/env bash
# Refreshes requirements-lock.txt: installs requirements-test.txt without the
# lock into a fresh virtual environment (so every transitive dependency takes
# its newest release), runs the test suite there, and rewrites the lock only
# if the suite passes. A failing suite leaves the lock as it was and exits
# non-zero: the log says which new release broke what.
#
#   bash experiments/refresh_lock.sh            # refresh and test
#   PYTEST_ARGS="-x -q" bash experiments/refresh_lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3.11}"
venv="$(mktemp -d "${TMPDIR:-/tmp}/dynamo_lock.XXXXXX")"
trap 'rm -rf "$venv"' EXIT
"$python" -m venv "$venv"
"$venv/bin/pip" install -q -r requirements-test.txt -e .
# shellcheck disable=SC2086
"$venv/bin/python" -m pytest ${PYTEST_ARGS:--q -n 2}
tmp="$(mktemp requirements-lock.txt.XXXXXX)"
{
  sed -n '1,/^[^#]/{/^#/p}' requirements-lock.txt
  # Local version labels (torch's +cpu) name a build, not a release; the plain
  # version matches them and also the build PyPI serves.
  "$venv/bin/pip" freeze --exclude-editable | grep -v '^dynamo' | sed 's/+[a-z0-9.]*$//'
} > "$tmp"
mv "$tmp" requirements-lock.txt
echo "requirements-lock.txt refreshed; commit it if git diff looks right." >&2
