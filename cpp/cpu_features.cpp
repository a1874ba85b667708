// SPDX-License-Identifier: MIT
// CPU feature detection: CPUID plus XGETBV on x86-64 (the OS must have enabled
// the register state, not just the CPU have the instructions).
#include "cpu_features.h"

#if defined(_MSC_VER) && (defined(_M_X64) || defined(_M_AMD64))
#include <intrin.h>
#include <cstdint>
#elif defined(__x86_64__)
#include <cpuid.h>
#include <cstdint>
#endif

namespace cpuadam {

#if defined(__x86_64__) || defined(_M_X64)
namespace {

struct Cpuid {
  unsigned a = 0, b = 0, c = 0, d = 0;
};

#if defined(_MSC_VER)
// MSVC (and clang-cl) have no GCC inline asm; their intrinsics need no flags.
Cpuid cpuid(unsigned leaf, unsigned subleaf) {
  int r[4] = {0, 0, 0, 0};
  __cpuidex(r, static_cast<int>(leaf), static_cast<int>(subleaf));
  return {static_cast<unsigned>(r[0]), static_cast<unsigned>(r[1]), static_cast<unsigned>(r[2]),
          static_cast<unsigned>(r[3])};
}

unsigned max_leaf() { return cpuid(0, 0).a; }

uint64_t read_xcr0() { return _xgetbv(0); }
#else
Cpuid cpuid(unsigned leaf, unsigned subleaf) {
  Cpuid r;
  __cpuid_count(leaf, subleaf, r.a, r.b, r.c, r.d);
  return r;
}

unsigned max_leaf() { return __get_cpuid_max(0, nullptr); }

// XCR0 via inline asm, so this file needs no -mxsave and stays baseline.
uint64_t read_xcr0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}
#endif

}  // namespace

CpuFeatures detect_cpu_features() {
  CpuFeatures f;
  if (max_leaf() < 1) return f;
  const Cpuid l1 = cpuid(1, 0);
  const bool osxsave = l1.c & (1u << 27);
  const bool avx = l1.c & (1u << 28);
  const bool fma = l1.c & (1u << 12);
  const bool f16c = l1.c & (1u << 29);
  if (!osxsave || !avx) return f;
  const uint64_t xcr0 = read_xcr0();
  // XMM (bit 1) and YMM (bit 2) state; opmask, ZMM_Hi256, Hi16_ZMM (bits 5-7).
  const bool ymm_os = (xcr0 & 0x6) == 0x6;
  const bool zmm_os = ymm_os && (xcr0 & 0xe0) == 0xe0;
  if (!ymm_os) return f;
  if (max_leaf() < 7) return f;
  const Cpuid l7 = cpuid(7, 0);
  f.avx2 = l7.b & (1u << 5);
  f.fma = fma;
  f.f16c = f16c;
  if (zmm_os) {
    f.avx512f = l7.b & (1u << 16);
    f.avx512bw = l7.b & (1u << 30);
    f.avx512vl = l7.b & (1u << 31);
    f.avx512bf16 = cpuid(7, 1).a & (1u << 5);
  }
  return f;
}

#elif defined(__aarch64__) || defined(_M_ARM64)

CpuFeatures detect_cpu_features() {
  CpuFeatures f;
  f.neon = true;  // Advanced SIMD is mandatory on AArch64.
  return f;
}

#else

CpuFeatures detect_cpu_features() { return {}; }

#endif

}  // namespace cpuadam
