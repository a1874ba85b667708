#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Builds and runs tests/native/encoder.cpp: the AVX2 arithmetic code search of
# the 8-bit states checked against the exact search on every float32 in [-1, 1]
# (about 20 s). Needs a C++ compiler and an x86-64 CPU with AVX2 and FMA; skips
# otherwise. Exit 0: every code the search keeps is the nearest code.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "$(uname -m)" != x86_64 ]] || ! grep -qw avx2 /proc/cpuinfo || ! grep -qw fma /proc/cpuinfo; then
  echo "skipped: needs an x86-64 CPU with AVX2 and FMA"
  exit 0
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"${CXX:-g++}" -std=c++17 -O2 -mavx2 -mfma -mf16c -fno-math-errno -ffp-contract=off -Icpp \
  tests/native/encoder.cpp -o "$out/encoder"
"$out/encoder"
