#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Builds benchmarks/native/step.cpp (the avx2 level's Adam step, no Python) and
# prints ns per param. With a git revision, also builds that revision and runs
# the two interleaved, ROUNDS times each, printing the medians and the median
# ratio (this tree / the revision): the machine's speed drifts, so only
# interleaved ratios compare builds.
#   tools/bench_native_step.sh [REVISION] [-- n steps states threads]
# With --linear-codec instead of a revision, it builds this tree twice, the
# second time with the dynamic map's decode and search replaced by a linear
# codec (benchmarks/native/linear_codec.h, timing only), and runs three steps
# interleaved: 8-bit states, 8-bit states with the linear codec, float32 states.
# The middle one is the floor of any exact codec in this block loop.
#   tools/bench_native_step.sh --linear-codec [-- n steps threads]
# Environment: ROUNDS (default 15). Needs g++ and an x86-64 CPU with AVX2 and FMA.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "$(uname -m)" != x86_64 ]] || ! grep -qw avx2 /proc/cpuinfo || ! grep -qw fma /proc/cpuinfo; then
  echo "needs an x86-64 CPU with AVX2 and FMA" >&2
  exit 1
fi
rev=""
linear=0
if [[ $# -gt 0 && "$1" == "--linear-codec" ]]; then linear=1; shift
elif [[ $# -gt 0 && "$1" != "--" ]]; then rev=$1; shift; fi
[[ $# -gt 0 && "$1" == "--" ]] && shift
args=("$@")
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

build() {  # build SOURCE_ROOT OUTPUT
  local root=$1 output=$2
  g++ -std=c++17 -O3 -g -fno-math-errno -ffp-contract=off -pthread -I"$root/cpp" -mavx2 -mfma -mf16c \
    -DCPUADAM_LEVEL=avx2 -c "$root/cpp/kernel_isa.cpp" -o "$output.o"
  # The benchmark source of this tree, against the revision's headers and kernel.
  g++ -std=c++17 -O2 -g -pthread -I"$root/cpp" benchmarks/native/step.cpp \
    "$root/cpp/scalars.cpp" "$root/cpp/threads.cpp" "$output.o" -o "$output"
}

build . "$out/step_tree" &
tree_build=$!
if [[ $linear == 1 ]]; then
  mkdir "$out/linear"
  cp -r cpp "$out/linear/"
  cp benchmarks/native/linear_codec.h "$out/linear/cpp/"
  kernels="$out/linear/cpp/kernel_isa.cpp"
  sed -i -e 's/^#include "quant.h"$/&\n#include "linear_codec.h"/' \
    -e 's/\bdequantize_block(moments/dequantize_block_linear(moments/' \
    -e 's/\bquantize_block(moments/quantize_block_linear(moments/' "$kernels"
  if [[ $(grep -c 'linear_codec.h\|quantize_block_linear(moments' "$kernels") != 3 ]]; then
    echo "kernel_isa.cpp no longer calls (de)quantize_block(moments...) once each: update --linear-codec" >&2
    exit 1
  fi
  build "$out/linear" "$out/step_linear"
  wait "$tree_build"
  n=${args[0]:-16384} steps=${args[1]:-1500} threads=${args[2]:-1}
  for _ in $(seq "${ROUNDS:-15}"); do
    echo "$("$out/step_tree" "$n" "$steps" 8bit "$threads") $("$out/step_linear" "$n" "$steps" 8bit "$threads")" \
         "$("$out/step_tree" "$n" "$steps" fp32 "$threads")"
  done | python3 -c "
import statistics, sys
rows = [tuple(map(float, line.split())) for line in sys.stdin]
exact, linear, fp32 = (statistics.median(r[i] for r in rows) for i in range(3))
print(f'ns per param, medians of {len(rows)} interleaved runs (n=$n, $threads thread(s)): '
      f'8-bit {exact:.3f}, 8-bit with the linear codec {linear:.3f}, float32 {fp32:.3f}')
print('float32 / 8-bit, median ratios: '
      f'{statistics.median(r[2] / r[0] for r in rows):.3f}, '
      f'with the linear codec {statistics.median(r[2] / r[1] for r in rows):.3f}')"
  exit 0
fi
if [[ -n "$rev" ]]; then
  mkdir "$out/rev"
  git archive "$rev" cpp | tar -x -C "$out/rev"
  build "$out/rev" "$out/step_rev"
fi
wait "$tree_build"
if [[ -z "$rev" ]]; then
  echo "ns per param: $("$out/step_tree" "${args[@]}")"
  exit 0
fi
for _ in $(seq "${ROUNDS:-15}"); do
  echo "$("$out/step_rev" "${args[@]}") $("$out/step_tree" "${args[@]}")"
done | python3 -c "
import statistics, sys
pairs = [tuple(map(float, line.split())) for line in sys.stdin]
old = statistics.median(p[0] for p in pairs)
new = statistics.median(p[1] for p in pairs)
ratio = statistics.median(p[1] / p[0] for p in pairs)
print(f'ns per param, medians of {len(pairs)} interleaved runs: $rev {old:.3f}, this tree {new:.3f}; '
      f'median ratio (this tree / $rev) {ratio:.3f}')"
