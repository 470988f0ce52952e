#!/usr/bin/env bash
# Sets up ninep and serves a demo export (created if missing) on tcp:127.0.0.1:5640.
# Extra arguments go to `ninep serve` (e.g. --listen unix:/tmp/ninep.sock -v).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export_dir=${NINEP_DEMO_EXPORT:-demo-export}
if [ ! -d "$export_dir" ]; then
  mkdir -p "$export_dir/docs"
  echo "Hello from ninep. This directory is served over 9P." > "$export_dir/README.txt"
  printf 'a 9P2000.L file server\n' > "$export_dir/docs/about.txt"
fi
echo "serving $export_dir on tcp:127.0.0.1:5640 (Ctrl-C to stop)" >&2
exec .venv/bin/python -m ninep serve "$export_dir" --listen tcp:127.0.0.1:5640 -v "$@"
