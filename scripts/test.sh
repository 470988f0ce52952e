#!/usr/bin/env bash
# Sets up ninep and runs the whole test suite (lint, types, unit, end-to-end, FUSE, Linux guest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check ninep fs_backends transports tests bench
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
