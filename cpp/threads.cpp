// SPDX-License-Identifier: MIT
// The thread pool behind every parallel step: std::thread workers that spin
// briefly after a job and then sleep on a condition variable, restarted lazily
// in a forked child. Compiled with baseline flags.
#include "threads.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif
#if !defined(_WIN32)
#include <pthread.h>
#endif
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#include <immintrin.h>
#endif

namespace cpuadam {
namespace {

// How long a worker (and the caller, waiting for the team) polls before it
// sleeps. Long enough to catch the next region of the same step (a norm pass
// then the update, one region per param group), short enough that a finished
// step leaves torch's threads the cores within a fraction of its own
// intra-op work; a condition-variable wake-up costs a few tens of us.
constexpr auto kSpin = std::chrono::microseconds(50);

void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
  _mm_pause();
#elif defined(__aarch64__) && defined(__GNUC__)
  __asm__ __volatile__("yield");
#endif
}

// Polls done() for up to kSpin; true if it became true.
template <typename Pred>
bool spin_until(Pred done) {
  const auto deadline = std::chrono::steady_clock::now() + kSpin;
  for (unsigned i = 1;; ++i) {
    if (done()) return true;
    cpu_relax();
    if (i % 64 == 0 && std::chrono::steady_clock::now() > deadline) return done();
  }
}

struct Job {
  ThreadFn fn = nullptr;
  void* ctx = nullptr;
  int num_threads = 1;
  uint64_t generation = 0;
};

// One worker: the caller bumps `ticket` to hand it the current job.
struct Worker {
  std::atomic<uint64_t> ticket{0};
  std::mutex m;
  std::condition_variable cv;
  std::thread thread;
};

struct Pool {
  std::mutex busy;  // held by the caller of the running job
  // The current job, read by a worker under job_m: a worker woken late may read
  // it while the caller already posts the next one.
  std::mutex job_m;
  Job job;
  uint64_t generation = 0;
  // The next slice to claim, with the job's generation in the high bits: any
  // thread (caller or worker) takes any slice, so a worker that is slow to be
  // scheduled (torch's threads spinning on the other cores) never holds up the
  // step: the caller takes its slice instead. Each slice computes the same
  // elements whoever runs it, so the results do not change.
  std::atomic<uint64_t> cursor{0};
  std::atomic<int> remaining{0};  // slices not yet finished
  std::mutex done_m;
  std::condition_variable done_cv;
  // Workers 1..n-1 (index 0 is unused: the caller is thread 0). Grown only
  // while `busy` is held; a Worker never moves once started.
  std::vector<std::unique_ptr<Worker>> workers;
  std::atomic<int> started{0};  // worker threads running, for pool_size()
};

// The live pool. Never destroyed: at exit its workers sleep until the process
// ends, and in a forked child the parent's pool (its threads gone, its mutexes
// maybe held) is abandoned rather than touched.
std::atomic<Pool*> g_pool{nullptr};

// Claims slices of `job` until none is left (or the pool has moved on to a later
// job: the generation in the cursor differs), running each.
void run_slices(Pool* pool, const Job& job) {
  for (;;) {
    uint64_t c = pool->cursor.load(std::memory_order_acquire);
    int slice;
    do {
      slice = static_cast<int>(c & 0xFFFFu);
      if ((c >> 16) != job.generation || slice >= job.num_threads) return;
    } while (!pool->cursor.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel));
    job.fn(job.ctx, slice, job.num_threads);
    if (pool->remaining.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      // Taking the mutex orders this notify after the caller's predicate check.
      { std::lock_guard<std::mutex> lock(pool->done_m); }
      pool->done_cv.notify_one();
    }
  }
}

void work(Pool* pool, Worker* self, int index) {
  uint64_t seen = 0;
  for (;;) {
    if (!spin_until([&] { return self->ticket.load(std::memory_order_acquire) != seen; })) {
      std::unique_lock<std::mutex> lock(self->m);
      self->cv.wait(lock, [&] { return self->ticket.load(std::memory_order_acquire) != seen; });
    }
    seen = self->ticket.load(std::memory_order_acquire);
    Job job;
    {
      std::lock_guard<std::mutex> lock(pool->job_m);
      job = pool->job;
    }
    (void)index;
    run_slices(pool, job);
  }
}

#if !defined(_WIN32)
// The child of fork() has only the forking thread: the workers are gone. A new
// pool starts its workers at the child's first parallel call.
void reset_after_fork() { g_pool.store(nullptr, std::memory_order_relaxed); }
#endif

Pool* pool() {
#if !defined(_WIN32)
  static const bool registered = (pthread_atfork(nullptr, nullptr, &reset_after_fork), true);
  (void)registered;
#endif
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p != nullptr) return p;
  auto fresh = std::make_unique<Pool>();
  if (g_pool.compare_exchange_strong(p, fresh.get(), std::memory_order_acq_rel)) return fresh.release();
  return p;  // another thread made one first; ours has no threads yet
}

void run_serially(int num_threads, ThreadFn fn, void* ctx) {
  for (int t = 0; t < num_threads; ++t) fn(ctx, t, num_threads);
}

}  // namespace

void parallel_run(int num_threads, ThreadFn fn, void* ctx) {
  if (num_threads <= 1) return fn(ctx, 0, 1);
  Pool* p = pool();
  std::unique_lock<std::mutex> busy(p->busy, std::try_to_lock);
  if (!busy.owns_lock()) return run_serially(num_threads, fn, ctx);
  if (static_cast<int>(p->workers.size()) < num_threads) {
    if (p->workers.empty()) p->workers.emplace_back();  // slot 0: the caller
    try {
      while (static_cast<int>(p->workers.size()) < num_threads) {
        auto w = std::make_unique<Worker>();
        Worker* raw = w.get();
        const int index = static_cast<int>(p->workers.size());
        raw->thread = std::thread(work, p, raw, index);
        raw->thread.detach();
        p->workers.push_back(std::move(w));
        p->started.store(index, std::memory_order_relaxed);
      }
    } catch (const std::exception&) {
      // No more threads to be had (a resource limit): the same slices, in turn.
      if (static_cast<int>(p->workers.size()) < num_threads) {
        busy.unlock();
        return run_serially(num_threads, fn, ctx);
      }
    }
  }
  ++p->generation;
  const Job job{fn, ctx, num_threads, p->generation & 0xFFFFFFFFFFFFull};
  p->remaining.store(num_threads, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(p->job_m);
    p->job = job;
  }
  p->cursor.store(job.generation << 16, std::memory_order_release);
  for (int t = 1; t < num_threads; ++t) {
    Worker& w = *p->workers[t];
    w.ticket.store(p->generation, std::memory_order_release);
    { std::lock_guard<std::mutex> lock(w.m); }
    w.cv.notify_one();
  }
  run_slices(p, job);
  auto all_done = [&] { return p->remaining.load(std::memory_order_acquire) == 0; };
  if (!spin_until(all_done)) {
    std::unique_lock<std::mutex> lock(p->done_m);
    p->done_cv.wait(lock, all_done);
  }
}

int available_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  const unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? static_cast<int>(n) : 1;
}

int max_threads() {
  // More threads than 4 per CPU only adds switching; the absolute cap keeps a
  // mistaken huge request from creating thousands of threads.
  const long long bound = 4LL * available_cpus();
  return bound < kMaxThreads ? static_cast<int>(bound) : kMaxThreads;
}

int default_num_threads() {
  int n = available_cpus();
  const char* env = std::getenv("CPUADAM_NUM_THREADS");
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long value = std::strtol(env, &end, 10);
    if (*end != '\0' || value < 1)
      throw std::runtime_error(std::string("CPUADAM_NUM_THREADS=") + env +
                               " is not a positive integer");
    n = value < max_threads() ? static_cast<int>(value) : max_threads();
  }
  return n < max_threads() ? n : max_threads();
}

int pool_size() {
  const Pool* p = g_pool.load(std::memory_order_acquire);
  return p == nullptr ? 0 : p->started.load(std::memory_order_relaxed);
}

}  // namespace cpuadam
