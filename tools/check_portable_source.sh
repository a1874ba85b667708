#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Checks that the core builds without GCC-only constructs, as the Windows (MSVC)
# wheel needs: (1) clang++ -std=c++17 -pedantic-errors -Werror over the core's
# sources at every x86-64 level; (2) clang in MSVC mode (clang-cl, target
# x86_64-pc-windows-msvc, /arch:AVX2 and /arch:AVX512, /W4 /WX) over the kernel
# and cpu_features.cpp, whose Windows branch uses <intrin.h> (__cpuidex,
# _xgetbv). A Linux host has no MSVC standard library, so (2) stands in
# <cstdint> and <cmath> with the few declarations those two files use; the
# sources that need more of the library (threads, dispatch, bindings) are
# checked by (1) only. Needs clang. Unknown pragmas (#pragma GCC ivdep) are
# allowed: every compiler ignores them. Exit 0: all compiled.
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

levels=("baseline:" "avx2:-mavx2 -mfma -mf16c"
        "avx512:-mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl")
for entry in "${levels[@]}"; do
  IFS=: read -r level flags <<< "$entry"
  # shellcheck disable=SC2086
  clang++ -std=c++17 -pedantic-errors -Wall -Wextra -Werror -Wno-unknown-pragmas -O2 $flags \
    -DCPUADAM_LEVEL="$level" -c cpp/kernel_isa.cpp -o "$out/kernel_$level.o"
  echo "clang++ -pedantic-errors: kernel_isa.cpp ($level) ok"
done
for src in cpu_features threads dispatch scalars; do
  clang++ -std=c++17 -pedantic-errors -Wall -Wextra -Werror -O2 -DCPUADAM_HAVE_BASELINE \
    -c "cpp/$src.cpp" -o "$out/$src.o"
  echo "clang++ -pedantic-errors: $src.cpp ok"
done

mkdir "$out/msvc_std"
printf '#pragma once\n#include <stdint.h>\nnamespace std { using ::int64_t; using ::uint64_t; using ::uint32_t; using ::uintptr_t; }\n' \
  > "$out/msvc_std/cstdint"
printf '#pragma once\nnamespace std { float fma(float, float, float); float sqrt(float); }\n' \
  > "$out/msvc_std/cmath"
clang_cl=(clang --driver-mode=cl --target=x86_64-pc-windows-msvc -fms-compatibility-version=19.30
          /std:c++17 /O2 /fp:precise /W4 /WX -Wno-unknown-pragmas /imsvc "$out/msvc_std"
          -Xclang -ffreestanding /c)
for entry in "baseline:" "avx2:/arch:AVX2" "avx512:/arch:AVX512"; do
  IFS=: read -r level arch <<< "$entry"
  "${clang_cl[@]}" ${arch:+"$arch"} /DCPUADAM_LEVEL="$level" cpp/kernel_isa.cpp /Fo"$out/k_$level.obj"
  echo "clang-cl ${arch:-(no /arch)}: kernel_isa.cpp ($level) ok"
done
"${clang_cl[@]}" cpp/cpu_features.cpp /Fo"$out/cpu_features.obj"
echo "clang-cl: cpu_features.cpp (the _MSC_VER branch: __cpuidex, _xgetbv) ok"
