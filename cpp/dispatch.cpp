// SPDX-License-Identifier: MIT
// Picks the ISA level once at import (CPUADAM_ISA may force one) and holds the
// thread count. Compiled with baseline flags.
#include "dispatch.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#include "threads.h"

namespace cpuadam {

// Each level's kernel_isa.cpp exports one of these.
#ifdef CPUADAM_HAVE_BASELINE
namespace baseline { KernelTable kernel_table(); }
#endif
#ifdef CPUADAM_HAVE_NEON
namespace neon { KernelTable kernel_table(); }
#endif
#ifdef CPUADAM_HAVE_AVX2
namespace avx2 { KernelTable kernel_table(); }
#endif
#ifdef CPUADAM_HAVE_AVX512
namespace avx512 { KernelTable kernel_table(); }
#endif

namespace {

struct Level {
  KernelTable table;
  bool supported;
};

DispatchInfo g_info;
std::vector<Level> g_levels;
KernelTable g_active{};
// Read by every step, written by set_num_threads (threadpoolctl may call it
// from any thread).
std::atomic<int> g_num_threads{1};

// Below this many elements per thread, starting another thread costs more
// than it saves (about 64 KiB of each buffer; a team wake-up is a few us).
constexpr long long kMinElementsPerThread = 16384;

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

}  // namespace

void init_dispatch() {
  g_info = DispatchInfo{};
  g_levels.clear();
  const CpuFeatures f = detect_cpu_features();
  g_info.features = f;
  // The lowest level of each architecture runs on every CPU of it.
#ifdef CPUADAM_HAVE_BASELINE
  g_levels.push_back({baseline::kernel_table(), true});
#endif
#ifdef CPUADAM_HAVE_NEON
  g_levels.push_back({neon::kernel_table(), true});
#endif
#ifdef CPUADAM_HAVE_AVX2
  g_levels.push_back({avx2::kernel_table(), f.avx2 && f.fma && f.f16c});
#endif
#ifdef CPUADAM_HAVE_AVX512
  g_levels.push_back({avx512::kernel_table(),
                      f.avx2 && f.fma && f.f16c && f.avx512f && f.avx512bw && f.avx512vl});
#endif
  for (const auto& l : g_levels) {
    g_info.compiled.push_back(l.table.level);
    if (l.supported) g_info.supported.push_back(l.table.level);
  }
  const Level* chosen = nullptr;
  for (const auto& l : g_levels)
    if (l.supported) chosen = &l;  // levels are listed lowest first
  const char* forced = std::getenv("CPUADAM_ISA");
  if (forced != nullptr && *forced != '\0') {
    const std::string want = forced;
    const Level* match = nullptr;
    for (const auto& l : g_levels)
      if (want == l.table.level) match = &l;
    if (match == nullptr)
      throw std::runtime_error("CPUADAM_ISA=" + want + " is not a level of this build; choose one of: " +
                               join(g_info.compiled));
    if (!match->supported)
      throw std::runtime_error("CPUADAM_ISA=" + want +
                               " is not supported by this CPU; choose one of: " +
                               join(g_info.supported));
    chosen = match;
    g_info.forced = true;
  }
  g_active = chosen->table;
  g_info.selected = chosen->table.level;
  g_num_threads = default_num_threads();
}

const DispatchInfo& dispatch_info() { return g_info; }
const KernelTable& active_table() { return g_active; }

const KernelTable* table_for(const std::string& level) {
  for (const auto& l : g_levels)
    if (l.supported && level == l.table.level) return &l.table;
  return nullptr;
}

int num_threads() { return g_num_threads.load(std::memory_order_relaxed); }

int set_num_threads(int n) {
  const int bound = max_threads();
  g_num_threads.store(n < bound ? n : bound, std::memory_order_relaxed);
  return num_threads();
}

int threads_for(long long elements, int requested) {
  long long useful = elements / kMinElementsPerThread;
  if (useful < 1) useful = 1;
  return requested < useful ? requested : static_cast<int>(useful);
}

}  // namespace cpuadam

// For threadpoolctl, which finds _core among the loaded libraries and calls
// these through ctypes (see cpuadam/_threadpoolctl.py). They do not throw.
CPUADAM_EXPORT int cpuadam_get_num_threads() { return cpuadam::num_threads(); }
CPUADAM_EXPORT int cpuadam_set_num_threads(int n) {
  return cpuadam::set_num_threads(n < 1 ? 1 : n);
}
