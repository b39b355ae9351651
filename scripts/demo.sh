#!/usr/bin/env bash
# Set up (first run only) and segment the bundled sample stack with the bundled model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh core
exec .venv/bin/bulbseg demo "$@"
