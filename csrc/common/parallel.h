// Grain sizes for at::parallel_for, from measured per-item costs: a parallel
// region is opened only where each thread gets enough work to pay for it.
//
// Why: entering an OpenMP region costs a few µs on a quiet machine, but when
// another process keeps a core busy, the region's closing barrier waits for a
// worker thread the OS has descheduled. Measured (issue 19, 2-core EPYC,
// torch 2.13): mvar_advantages at 512 x 10 took 41 µs median on one thread and
// 8,000 µs with two while one core was busy. Work that a thread finishes in
// well under a time slice is cheaper on the calling thread alone.
//
// How at::parallel_for behaves (ATen/Parallel-inl.h and ParallelOpenMP.h, the
// same in torch 2.11 and 2.13; both are header code compiled into this
// extension): it calls f(begin, end) on the calling thread, with no OpenMP
// region at all, unless end - begin > grain (and more than one thread, and not
// already inside a region). Above the grain it opens `#pragma omp parallel`
// over every thread and cuts the range into divup(range, min(threads,
// divup(range, grain))) sized chunks, so a range just over one grain gives
// chunks of just over half a grain. Hence grain = 2 x kMinChunkNs of work:
// every chunk a region hands out then holds >= kMinChunkNs.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

namespace riskpo {

// Work per chunk below which a parallel region does not pay, in ns: ~100 µs,
// many times the quiet cost of a region (~5-10 µs on 2 cores) and the point
// where a descheduled worker's delay stops dominating a call.
constexpr double kMinChunkNs = 100e3;

// The grain, in items, of a loop whose items each cost about `ns_per_item` on
// one thread. Callers pass a measured lower bound of the cost: erring low makes
// the grain larger, i.e. runs more calls on the calling thread.
inline int64_t grain_for_cost(double ns_per_item) {
  const double items = 2.0 * kMinChunkNs / std::max(ns_per_item, 1e-3);
  return std::max<int64_t>(1, static_cast<int64_t>(std::ceil(std::min(items, 1e15))));
}

// at::parallel_for's split is static: each thread gets an equal share and the
// region ends when the slowest share is done. When another process keeps a core
// busy, the thread sharing that core runs about half the time, so a static
// region takes about twice as long (measured, issue 19: the fused-linear loss
// went from 1.13x to 1.48x its matmuls with one core busy). Above the grain this
// hands out tasks of `task` items from a shared counter instead: a thread that
// is descheduled takes fewer of them, the others take the rest. Which thread
// computes an item never changes its result (each item is independent), so the
// output is bitwise the same as the static split's (tests/test_cpu_threads.py).
template <typename F>
void parallel_for_dynamic(int64_t begin, int64_t end, int64_t grain, int64_t task, const F& f) {
  const int threads = at::get_num_threads();
  if (end - begin <= grain || threads <= 1 || at::in_parallel_region()) {
    if (begin < end) f(begin, end);
    return;
  }
  task = std::max<int64_t>(1, task);
  std::atomic<int64_t> next{begin};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t start = next.fetch_add(task); start < end; start = next.fetch_add(task)) {
      f(start, std::min(start + task, end));
    }
  });
}

}  // namespace riskpo
