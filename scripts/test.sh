#!/usr/bin/env bash
# Set up and run the test suite. Browser tests need Debian's chromium and chromium-driver
# (installed here when running as root with apt; otherwise they are skipped with a reason).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromedriver >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
. .venv/bin/activate
# Two workers of one torch thread each use both cores of a small machine better than one process with two
# threads (2:39 against 3:50 for the suite here); pass -n 0 to run in one process.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python -m pytest -q -n 2 "$@"
