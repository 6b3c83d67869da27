#!/usr/bin/env bash
# The NEON backend, cross-built for aarch64 and run under qemu user-mode emulation:
#   1. test_native    every available backend (portable, neon) against portable, byte for byte
#   2. golden_check   docs/noise-golden.json, every case, on every available backend
#   3. bench_backends timings (emulated: qemu's speed, not a processor's), one JSON line a backend
#
#   bash scripts/test_aarch64.sh            (from anywhere; builds into build/aarch64)
#
# Needs aarch64-linux-gnu-gcc and qemu-aarch64 (Debian/Ubuntu: gcc-aarch64-linux-gnu qemu-user),
# installed here with apt-get when missing (through sudo when not root).  Exits non-zero on any
# failure.  Safe to run again: the build directory is reused, the test text regenerated.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUILD="${QES_AARCH64_BUILD:-build/aarch64}"
SYSROOT=/usr/aarch64-linux-gnu
PKGS=(gcc-aarch64-linux-gnu qemu-user)
start=$(date +%s)

say() { printf '== %s\n' "$*"; }
die() { printf 'test_aarch64: %s\n' "$*" >&2; exit 1; }

# -- the toolchain ----------------------------------------------------------------------------------
missing=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing+=("aarch64-linux-gnu-gcc (package gcc-aarch64-linux-gnu)")
command -v qemu-aarch64 >/dev/null 2>&1 || missing+=("qemu-aarch64 (package qemu-user)")
if ((${#missing[@]})); then
  say "missing: ${missing[*]}; installing ${PKGS[*]} with apt-get"
  if ! command -v apt-get >/dev/null 2>&1; then
    die "missing ${missing[*]} and there is no apt-get here: install a cross compiler for aarch64-linux-gnu and qemu-user by hand"
  fi
  if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
  elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    die "missing ${missing[*]}: not root and no sudo; run as root: apt-get install -y ${PKGS[*]}"
  fi
  ${SUDO[@]+"${SUDO[@]}"} apt-get update -qq || die "apt-get update failed (offline?); missing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive ${SUDO[@]+"${SUDO[@]}"} apt-get install -y -qq "${PKGS[@]}" >/dev/null \
    || die "apt-get install ${PKGS[*]} failed; missing ${missing[*]}"
  command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || die "still no aarch64-linux-gnu-gcc after installing"
  command -v qemu-aarch64 >/dev/null 2>&1 || die "still no qemu-aarch64 after installing"
fi
[ -d "$SYSROOT" ] || die "no $SYSROOT (the aarch64 C library that gcc-aarch64-linux-gnu installs)"
PY="$(command -v python3 || command -v python || true)"
[ -n "$PY" ] || die "no python3 (needed to turn docs/noise-golden.json into text)"
CMAKE="$(command -v cmake || true)"
[ -n "$CMAKE" ] || { [ -x .venv/bin/cmake ] && CMAKE=.venv/bin/cmake; } || die "no cmake"

# -- the cross build --------------------------------------------------------------------------------
mkdir -p "$BUILD"
say "configure $BUILD ($(aarch64-linux-gnu-gcc --version | head -1))"
gen=()
# no CUDA plugin in a cross build: the build machine's nvcc targets the build machine
command -v ninja >/dev/null 2>&1 && [ ! -f "$BUILD/CMakeCache.txt" ] && gen=(-G Ninja)
"$CMAKE" -S . -B "$BUILD" ${gen[@]+"${gen[@]}"} -DCMAKE_TOOLCHAIN_FILE="$ROOT/cmake/aarch64-linux-gnu.cmake" \
  -DCMAKE_BUILD_TYPE=Release -DQES_BUILD_TESTS=ON -DQES_SANITIZE=OFF -DQES_CUDA=OFF >"$BUILD/configure.log" 2>&1 \
  || { cat "$BUILD/configure.log" >&2; die "configure failed"; }
grep -q "native backends built: .*neon" "$BUILD/configure.log" \
  || { grep "native backends built" "$BUILD/configure.log" >&2 || true; die "the NEON kernels were not configured"; }
say "build"
"$CMAKE" --build "$BUILD" -j 2 >"$BUILD/build.log" 2>&1 || { cat "$BUILD/build.log" >&2; die "build failed"; }
file_out="$(file -b "$BUILD/test_native" 2>/dev/null || true)"
[ -z "$file_out" ] || case "$file_out" in *aarch64*) ;; *) die "$BUILD/test_native is not an aarch64 program: $file_out";; esac
GOLDEN="$BUILD/noise-golden.txt"
"$PY" tests/golden_text.py --out "$GOLDEN" >/dev/null   # also when CMake found no Python

QEMU=(qemu-aarch64 -L "$SYSROOT")
export LD_LIBRARY_PATH="$ROOT/$BUILD${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fail=0

say "1/3 test_native under qemu-aarch64"
if out="$("${QEMU[@]}" "$BUILD/test_native" 2>&1)"; then echo "$out"; else echo "$out"; fail=1; echo "test_native: FAILED"; fi
# test_native names only the backends it skips; every other one was compared with portable
compared=()
for b in portable avx2 neon cuda metal; do
  echo "$out" | grep -q "^backend $b: not available" || compared+=("$b")
done
echo "test_native: backends compared with portable: ${compared[*]}"
[[ " ${compared[*]} " == *" neon "* ]] || { fail=1; echo "test_native: the neon backend was not compared"; }

say "2/3 golden vectors under qemu-aarch64"
if out="$("${QEMU[@]}" "$BUILD/golden_check" "$GOLDEN")"; then echo "$out"; else echo "$out"; fail=1; echo "golden_check: FAILED"; fi
echo "$out" | grep -q "^backend neon: .*all match" || { fail=1; echo "golden_check: no \"backend neon: ... all match\" line"; }

say "3/3 bench_backends under qemu-aarch64 (emulated: not the speed of an aarch64 processor)"
if ! QES_EMULATED=1 "${QEMU[@]}" "$BUILD/bench_backends"; then fail=1; echo "bench_backends: FAILED"; fi

secs=$(( $(date +%s) - start ))
if [ "$fail" -ne 0 ]; then die "FAILED (${secs}s)"; fi
say "aarch64: all passed (${secs}s)"
