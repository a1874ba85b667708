// SPDX-License-Identifier: MIT
// CPU feature detection: CPUID plus XGETBV on x86-64 (the OS must have enabled
// the register state, not just the CPU have the instructions).
#include "cpu_features.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <cstdint>
#endif

namespace cpuadam {

#if defined(__x86_64__) || defined(_M_X64)
namespace {

// XCR0 via inline asm, so this file needs no -mxsave and stays baseline.
uint64_t read_xcr0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

}  // namespace

CpuFeatures detect_cpu_features() {
  CpuFeatures f;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  const bool avx = c & (1u << 28);
  const bool fma = c & (1u << 12);
  const bool f16c = c & (1u << 29);
  if (!osxsave || !avx) return f;
  const uint64_t xcr0 = read_xcr0();
  // XMM (bit 1) and YMM (bit 2) state; opmask, ZMM_Hi256, Hi16_ZMM (bits 5-7).
  const bool ymm_os = (xcr0 & 0x6) == 0x6;
  const bool zmm_os = ymm_os && (xcr0 & 0xe0) == 0xe0;
  if (!ymm_os) return f;
  unsigned max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = b & (1u << 5);
  f.fma = fma;
  f.f16c = f16c;
  if (zmm_os) {
    f.avx512f = b & (1u << 16);
    f.avx512bw = b & (1u << 30);
    f.avx512vl = b & (1u << 31);
    unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
    __cpuid_count(7, 1, a1, b1, c1, d1);
    f.avx512bf16 = a1 & (1u << 5);
  }
  return f;
}

#elif defined(__aarch64__)

CpuFeatures detect_cpu_features() {
  CpuFeatures f;
  f.neon = true;  // Advanced SIMD is mandatory on AArch64.
  return f;
}

#else

CpuFeatures detect_cpu_features() { return {}; }

#endif

}  // namespace cpuadam
