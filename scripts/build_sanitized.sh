#!/usr/bin/env bash
# Builds the ring extension (transports._ring) with AddressSanitizer and UndefinedBehaviorSanitizer
# into OUT (default build/sanitized), laid out so that PYTHONPATH=OUT:REPO imports the sanitized
# extension: OUT/transports holds the sanitized .so and symlinks to every other entry of the
# repository's transports/ package. Run Python with it as tests/fuzz/test_sanitized.py does:
#
#   LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
#     PYTHONPATH=build/sanitized:. .venv/bin/python -m pytest tests/fuzz/test_virtq_fuzz.py
#
# (detect_leaks=0: CPython keeps objects alive at exit by design.) The sources and their list
# come from setup.py; only the flags differ. Usage: scripts/build_sanitized.sh [OUT] [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
out=$(realpath -m "${1:-build/sanitized}")
python=${2:-.venv/bin/python}
san="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g"
rm -rf "$out"
mkdir -p "$out/transports"
# -O1 after setup.py's -O2 would not win (extra_compile_args come last); ASan works at -O2.
CFLAGS="$san" LDFLAGS="$san" "$python" setup.py -q build_ext \
    --build-lib "$out/lib" --build-temp "$out/tmp" --force >/dev/null
mv "$out"/lib/transports/_ring*.so "$out/transports/"
rm -rf "$out/lib" "$out/tmp"
for entry in "$repo"/transports/*; do
    name=$(basename "$entry")
    case "$name" in _ring*.so | __pycache__) continue ;; esac
    ln -s "$entry" "$out/transports/$name"
done
echo "$out"
