#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Builds tests/native/driver.cpp with the kernel for x86-64's avx2 level and,
# cross-compiled, for aarch64's neon level, runs the second under qemu, and
# checks the two print the same hashes (Adam, SGD, Adam with 8-bit states in
# both roundings and with stochastically rounded bfloat16 states): both fuse every multiply-add, so the results must agree to
# the bit. Needs g++, aarch64-linux-gnu-g++ and
# qemu-aarch64 (Debian: g++-aarch64-linux-gnu qemu-user). Exit 0: equal.
set -euo pipefail
cd "$(dirname "$0")/.."

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
common=(-std=c++17 -O2 -pthread -Icpp)
kernel=(-O3 -fno-math-errno -ffp-contract=off)
sources=(tests/native/driver.cpp cpp/scalars.cpp cpp/threads.cpp)

build() {  # build CXX LEVEL OUTPUT [LEVEL FLAGS...]
  local cxx=$1 level=$2 output=$3
  shift 3
  "$cxx" "${common[@]}" "${kernel[@]}" "$@" -DCPUADAM_LEVEL="$level" -c cpp/kernel_isa.cpp \
    -o "$out/kernel_$level.o"
  "$cxx" "${common[@]}" -DCPUADAM_DRIVER_LEVEL="$level" "${sources[@]}" "$out/kernel_$level.o" \
    -static -o "$output"
}

# The two builds at once: each is one compiler process.
build "${CXX:-g++}" avx2 "$out/driver_x86" -mavx2 -mfma -mf16c &
x86_build=$!
build aarch64-linux-gnu-g++ neon "$out/driver_aarch64"
wait "$x86_build"

x86="$("$out/driver_x86")"
arm="$(qemu-aarch64 "$out/driver_aarch64")"
echo "x86-64:  $x86"
echo "aarch64: $arm"
if [[ "${x86#level avx2 }" != "${arm#level neon }" ]]; then
  echo "aarch64 neon and x86-64 avx2 results differ" >&2
  exit 1
fi
echo "aarch64 neon == x86-64 avx2, bit for bit"
