#!/usr/bin/env bash
# Sets up everything ninep needs on a fresh Debian machine, idempotently:
# system packages (apt), a virtualenv in .venv with the project installed editable (this also
# builds the compiled ring extension), and the test tools. Safe to run again; fast when done.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  gcc libc6-dev pkg-config          # the ring extension; static guest helpers
  libfuse3-dev fuse3                # pyfuse3 (FUSE mount)
  attr                              # setfattr/getfattr in tests
  tmux                              # drives `ninep top` in a terminal in tests
  diod                              # interop peer and benchmark anchor
  qemu-system-x86 busybox-static cpio xz-utils kmod   # the Linux guest that judges us
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.ninep-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
   || [ -n "$(find transports/ring -name '*.[ch]' -newer "$stamp" 2>/dev/null)" ]; then
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel >/dev/null
  .venv/bin/python -m pip install -q -e '.[test,fuse,bench]'
  touch "$stamp"
fi
# The editable install builds the extension into the source tree; rebuild if sources changed.
.venv/bin/python setup.py -q build_ext --inplace >/dev/null 2>&1 || .venv/bin/python setup.py build_ext --inplace
