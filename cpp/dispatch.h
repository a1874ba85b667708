// SPDX-License-Identifier: MIT
// The chosen ISA level's kernel table and the thread count: the only
// process-wide values of the core, both set outside the kernels.
#pragma once

#include <string>
#include <vector>

#include "cpu_features.h"
#include "types.h"

namespace cpuadam {

struct DispatchInfo {
  std::vector<std::string> compiled;   // levels in this build, lowest first
  std::vector<std::string> supported;  // compiled levels this CPU can run
  std::string selected;
  bool forced = false;
  CpuFeatures features;
};

// Chooses the level once; honours CPUADAM_ISA. Throws std::runtime_error
// (listing the valid choices) for an unknown or unsupported forced level.
void init_dispatch();
const DispatchInfo& dispatch_info();
const KernelTable& active_table();
// The table of a named level this CPU supports (benchmarks compare levels).
const KernelTable* table_for(const std::string& level);

int num_threads();
// n >= 1; clamped to max_threads() (threads.h). Returns the count now in force.
int set_num_threads(int n);
// Threads worth starting for `elements` of work: at most num_threads().
int threads_for(long long elements, int requested);

}  // namespace cpuadam

// Symbols _core exports by name despite pybind11's hidden visibility.
#if defined(_WIN32)
#define CPUADAM_EXPORT extern "C" __declspec(dllexport)
#else
#define CPUADAM_EXPORT extern "C" __attribute__((visibility("default")))
#endif
CPUADAM_EXPORT int cpuadam_get_num_threads();
CPUADAM_EXPORT int cpuadam_set_num_threads(int n);
