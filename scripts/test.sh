#!/usr/bin/env bash
# Run every test: the C tests under AddressSanitizer + UBSan, then the Python suite
# (slow tests included: they need the real model and llama.cpp, both installed by install.sh).
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
.venv/bin/pytest "$@"
