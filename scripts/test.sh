#!/usr/bin/env bash
# Run every test: the C tests under AddressSanitizer + UBSan; the Python tests whose input
# reaches libqes from outside (fuzzed frames, steps received from a peer and replayed by follow,
# hostile GGUF blocks, golden vectors) again with that sanitized libqes loaded into Python; then
# the whole Python suite (slow tests included: they need the real model and llama.cpp, both
# installed by install.sh).
#
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
cmake -S . -B build/sanitize "${gen[@]}" -DCMAKE_BUILD_TYPE=Debug -DQES_BUILD_TESTS=ON -DQES_SANITIZE=ON >/dev/null
cmake --build build/sanitize >/dev/null
ctest --test-dir build/sanitize --output-on-failure
asan=(env LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
      ASAN_OPTIONS=detect_leaks=0 QES_EDGE_LIB="$PWD/build/sanitize/libqes.so" OMP_WAIT_POLICY=PASSIVE)
"${asan[@]}" .venv/bin/python -c 'import qes_edge.native.binding as n, sys; sys.exit(0 if "build/sanitize" in n.library_path
    else "the sanitized libqes was not loaded: " + n.library_path)'
"${asan[@]}" .venv/bin/pytest -q -p no:cacheprovider tests/test_sync_fuzz.py tests/test_sync_frames.py \
    tests/test_follow.py tests/test_bad_input.py tests/test_update.py tests/test_perturb_restore.py tests/test_golden.py
.venv/bin/pytest "$@"
