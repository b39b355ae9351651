#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite (GUI tests on Xvfb via pytest-xvfb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
unset QT_QPA_PLATFORM
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "test.sh: pytest collected no tests — that is a failure here" >&2
  exit 1
fi
exit "$rc"
