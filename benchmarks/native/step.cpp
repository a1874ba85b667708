// SPDX-License-Identifier: MIT
// The AVX2 level's Adam step alone, without Python: AdamW over one float32 param
// of n elements with float32 or 8-bit states, one thread by default, timed in a loop (best
// of 5 repeats, ns per param). Small n keeps every buffer in cache, so the
// arithmetic is measured rather than the memory. Built with symbols by
// tools/bench_native_step.sh, which also compares two commits interleaved; a
// profiler (perf record) can run the binary directly. Large n with threads > 1
// times the step out of cache as the Python benchmarks do.
//   step [n = 16384] [steps = 1500] [states: 8bit | fp32] [threads = 1]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "scalars.h"  // from -I: the tree's or the revision's cpp/
#include "types.h"

namespace cpuadam {
namespace avx2 {
KernelTable kernel_table();
}
}  // namespace cpuadam

using namespace cpuadam;

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : 16384;
  const int steps = argc > 2 ? std::atoi(argv[2]) : 1500;
  const bool codes = argc > 3 ? std::strcmp(argv[3], "fp32") != 0 : true;
  const int threads = argc > 4 ? std::atoi(argv[4]) : 1;
  const KernelTable table = avx2::kernel_table();
  std::vector<float> param(n), grad(n), exp_avg(n), exp_avg_sq(n);
  std::vector<float> absmax_m((n + 255) / 256), absmax_v((n + 255) / 256);
  std::vector<uint8_t> codes_m(n), codes_v(n);
  uint64_t state = 1;
  const auto uniform = [&] {  // in [-1, 1)
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<float>(static_cast<int32_t>(state >> 40) - (1 << 23)) / 8388608.f;
  };
  for (int64_t i = 0; i < n; ++i) {
    param[i] = uniform();
    grad[i] = uniform();
  }
  TensorSpan s;
  s.param = param.data();
  s.grad = grad.data();
  s.numel = n;
  if (codes) {
    s.exp_avg = codes_m.data();
    s.exp_avg_sq = codes_v.data();
    s.exp_avg_absmax = absmax_m.data();
    s.exp_avg_sq_absmax = absmax_v.data();
  } else {
    s.exp_avg = exp_avg.data();
    s.exp_avg_sq = exp_avg_sq.data();
  }
  const int64_t offsets[2] = {0, n};
  double best = INFINITY;
  int64_t step = 0;
  for (int repeat = 0; repeat < 5; ++repeat) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int k = 0; k < steps; ++k) {
      AdamHyper h;
      h.lr = 1e-3;
      h.weight_decay = 0.01;
      h.step = ++step;
      h.decoupled = true;
      h.eps = 1e-8;
      StepArgs a;
      a.tensors = &s;
      a.num_tensors = 1;
      a.offsets = offsets;
      a.num_threads = threads;
      a.scalars.clip_value = INFINITY;
      adam_scalars(h, a.scalars);
      a.decay = adam_decay_mode(h);
      a.state_dtype = codes ? DType::Blockwise8 : DType::Float32;
      if (!table.adam_step(a)) {
        std::fprintf(stderr, "the step was refused\n");
        return 1;
      }
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, seconds / steps / static_cast<double>(n) * 1e9);
  }
  std::printf("%.4f\n", best);
  return 0;
}
