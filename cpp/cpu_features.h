// SPDX-License-Identifier: MIT
// What this CPU and OS can run.
#pragma once

namespace cpuadam {

struct CpuFeatures {
  bool avx2 = false;      // AVX2 with the OS saving YMM state
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;   // AVX-512 with the OS saving ZMM and opmask state
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512bf16 = false;
  bool neon = false;
};

CpuFeatures detect_cpu_features();

}  // namespace cpuadam
