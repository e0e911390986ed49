// How jadam's CPU kernels spread their work over XLA's thread pool: a job is cut into tasks, which the calling
// thread and up to pool.num_threads() - 1 helpers claim one at a time until none is left.

#ifndef JADAM_KERNELS_POOL_H_
#define JADAM_KERNELS_POOL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jadam {

// Tasks 0..n-1 and who has claimed and run them.
struct Tasks {
  int64_t n = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  // Runs `run(task)` for each task this thread claims, until none is left to claim.
  template <typename F>
  void Drain(F&& run) {
    int64_t ran = 0;
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      run(c);
      ++ran;
    }
    if (ran) done.fetch_add(ran, std::memory_order_acq_rel);
  }
};

// Runs job->Work() (which drains job->tasks) on the calling thread and, when `parallel`, on helpers; returns once
// every task has run. Helpers that start after every task is claimed return at once, so the caller never waits for
// a helper to be scheduled, only for claimed tasks to finish; they share the job, so it outlives them.
template <typename Job>
void RunOnPool(xla::ffi::ThreadPool& pool, const std::shared_ptr<Job>& job, bool parallel) {
  const int64_t n = job->tasks.n;
  if (parallel && pool.num_threads() > 1 && n > 1) {
    const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
    for (int64_t h = 0; h < helpers; ++h) pool.Schedule([job] { job->Work(); });
  }
  job->Work();
  while (job->tasks.done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace jadam

#endif  // JADAM_KERNELS_POOL_H_
