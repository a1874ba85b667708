// SPDX-License-Identifier: MIT
// cpuadam's own thread pool: runs fn(ctx, thread, num_threads) on every thread
// of a team. No OpenMP, so the wheel brings no second OpenMP runtime beside torch's.
#pragma once

namespace cpuadam {

using ThreadFn = void (*)(void* ctx, int thread, int num_threads);

// Calls fn(ctx, t, num_threads) once for each t in [0, num_threads) and returns
// when all calls have returned. The caller runs t = 0; pool workers run the
// rest. If the pool is busy (another thread's call is running) the calls run
// one after another on the caller: the slices, and so the results, are the
// same. fn must not throw.
void parallel_run(int num_threads, ThreadFn fn, void* ctx);

// Runs f(thread, num_threads) on every thread of a team of num_threads.
template <typename F>
void parallel_for_threads(int num_threads, F& f) {
  parallel_run(
      num_threads,
      [](void* ctx, int thread, int n) { (*static_cast<F*>(ctx))(thread, n); }, &f);
}

// CPUs this process may run on (its affinity mask on Linux), at least 1.
int available_cpus();
// The most threads a step may use: 4 x available_cpus(), at most kMaxThreads.
int max_threads();
constexpr int kMaxThreads = 1024;
// CPUADAM_NUM_THREADS if set, else available_cpus(), bounded by max_threads().
// Throws std::runtime_error for a value that is not a positive integer.
int default_num_threads();
// Threads the pool has started in this process (0 until the first parallel
// call, and again in a child forked after one).
int pool_size();

}  // namespace cpuadam
