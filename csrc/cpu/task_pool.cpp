// TaskPool (see task_pool.h).
#include "cpu/task_pool.h"

#include <immintrin.h>
#include <omp.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <exception>

namespace lathe {
namespace {

thread_local TaskPool* tl_pool = nullptr;
constexpr int kSpins = 1 << 13;  // pauses before a waiting thread yields its core (tens of us: a layer gap)

inline void range(int64_t tasks, int64_t n, int64_t k, int64_t* a, int64_t* b) {
  *a = tasks * k / n, *b = tasks * (k + 1) / n;
}

template <typename Pred>
inline void wait_until(Pred done) {
  for (int s = 0; !done(); ++s) {
    if (s < kSpins) _mm_pause();
    else sched_yield();
  }
}

}  // namespace

bool TaskPool::work(uint64_t gen) {
  uint64_t s = claim_.load(std::memory_order_acquire);
  for (;;) {
    if ((s >> 32) != (gen & 0xFFFFFFFFu)) return false;
    const int64_t c = static_cast<int64_t>(s & 0xFFFFFFFFu);
    if (c >= chunks_) return false;
    if (!claim_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) continue;
    int64_t a, b;
    range(tasks_, chunks_, c, &a, &b);
    if (a < b) (*fn_)(a, b);
    done_.fetch_add(1, std::memory_order_acq_rel);
    s = claim_.load(std::memory_order_acquire);
  }
}

void TaskPool::serve() {
  // start from the current job: one posted before this thread arrived is still claimable
  uint64_t seen = gen_.load(std::memory_order_acquire) - 1;
  auto over = [&] { return !hosting_.load(std::memory_order_acquire); };
  for (;;) {
    uint64_t g = gen_.load(std::memory_order_acquire);
    for (int s = 0; g == seen && s < kSpins && !over(); ++s) {
      _mm_pause();
      g = gen_.load(std::memory_order_acquire);
    }
    if (g == seen && !over()) {
      std::unique_lock<std::mutex> lk(mu_);
      wake_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen || over(); });
      g = gen_.load(std::memory_order_acquire);
    }
    if (g == seen && over()) return;
    seen = g;
    work(g);
  }
}

void TaskPool::run(int64_t tasks, int ways, const std::function<void(int64_t, int64_t)>& fn) {
  if (ways <= 1 || tasks <= 1) {
    if (tasks > 0) fn(0, tasks);
    return;
  }
  const int64_t chunks = std::min<int64_t>(tasks, 4 * static_cast<int64_t>(ways));
  const uint64_t g = gen_.load(std::memory_order_relaxed) + 1;
  // the new generation first: a worker still in work() for the last job fails its next claim
  // instead of claiming a chunk against this job's counts; gen_ (stored last) publishes the rest
  claim_.store((g & 0xFFFFFFFFu) << 32, std::memory_order_seq_cst);
  tasks_ = tasks, chunks_ = chunks, fn_ = &fn;
  done_.store(0, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lk(mu_);  // a worker about to sleep sees the new job under the lock
    gen_.store(g, std::memory_order_release);
  }
  wake_.notify_all();
  work(g);
  if (done_.load(std::memory_order_acquire) != chunks) {  // a worker's chunk is still running
    const auto t0 = std::chrono::steady_clock::now();
    wait_until([&] { return done_.load(std::memory_order_acquire) == chunks; });
    wait_ns_.fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0)
                           .count());
  }
}

void TaskPool::host(int nthreads, const std::function<void()>& body) {
  if (nthreads <= 1 || omp_in_parallel()) {  // nested: the caller does every chunk itself
    Bind b(this);
    body();
    return;
  }
  std::exception_ptr err;
  hosting_.store(true, std::memory_order_release);
#pragma omp parallel num_threads(nthreads)
  {
    if (omp_get_thread_num() == 0) {
      try {
        Bind b(this);
        body();
      } catch (...) {
        err = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> lk(mu_);  // a worker about to sleep sees the end under the lock
        hosting_.store(false, std::memory_order_release);
      }
      wake_.notify_all();
    } else {
      serve();  // returns at once where body() ended before this thread arrived
    }
  }
  if (err) std::rethrow_exception(err);
}

TaskPool::Bind::Bind(TaskPool* p) : prev(tl_pool) { tl_pool = p; }
TaskPool::Bind::~Bind() { tl_pool = prev; }

void parallel_tasks(int nthreads, int64_t tasks, const std::function<void(int64_t, int64_t)>& fn) {
  if (tasks <= 0) return;
  if (tl_pool != nullptr) {
    tl_pool->run(tasks, nthreads, fn);
    return;
  }
  const int n = static_cast<int>(std::min<int64_t>(std::max(1, nthreads), tasks));
  if (n <= 1) {
    fn(0, tasks);
    return;
  }
#pragma omp parallel num_threads(n)
  {
    const int k = omp_get_thread_num(), m = omp_get_num_threads();
    int64_t a, b;
    range(tasks, m, k, &a, &b);
    if (a < b) fn(a, b);
  }
}

}  // namespace lathe
