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
python -m pytest -q "$@"
