// Chunked parallel loops for a chain of short layers (csrc/cpu/conv_chain.h). host() runs the
// chain on the calling thread, which calls run() per loop, while the other threads of an OpenMP
// team sit in serve(): the threads torch's and lathe's own OpenMP loops already use (and that
// spin a while after each loop), instead of threads of the pool's own that would contend with
// them for the cores. Every thread claims chunks of the current loop from one counter, so the
// caller never waits for a worker the OS has not scheduled (it does the chunks itself), only for
// chunks in progress, and no loop ends in a barrier. Between loops an idle worker spins briefly,
// then sleeps. parallel_tasks() uses the pool bound to the calling thread (TaskPool::Bind) or,
// without one, a plain OpenMP loop.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>

namespace lathe {

class TaskPool {
 public:
  // Runs body() on the calling thread with the pool bound to it, while nthreads - 1 threads of
  // the OpenMP team serve the pool's loops. Exceptions from body() come back here.
  void host(int nthreads, const std::function<void()>& body);
  // fn(first, last) over contiguous chunks of [0, tasks); `ways`: the chunk count is 4 x ways.
  void run(int64_t tasks, int ways, const std::function<void(int64_t, int64_t)>& fn);
  // Nanoseconds the caller spent waiting for workers' chunks since the last call (then reset).
  int64_t take_wait_ns() { return wait_ns_.exchange(0); }

  struct Bind {  // routes parallel_tasks() on this thread to the pool while alive
    explicit Bind(TaskPool* p);
    ~Bind();
    TaskPool* prev;
  };

 private:
  void serve();             // a worker's loop, until host()'s body ends
  bool work(uint64_t gen);  // claims and runs chunks of job gen; false once none is left
  std::mutex mu_;
  std::condition_variable wake_;
  std::atomic<uint64_t> gen_{0};    // job generation
  std::atomic<uint64_t> claim_{0};  // gen << 32 | next chunk: a late thread cannot claim a newer job's chunk
  std::atomic<int64_t> done_{0};    // chunks finished in the current job
  std::atomic<bool> hosting_{false};  // host(): its workers serve until it is false again
  std::atomic<int64_t> wait_ns_{0};
  int64_t tasks_ = 0, chunks_ = 0;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
};

// fn(first, last) over [0, tasks) on up to nthreads threads (1: inline, no fork/join).
void parallel_tasks(int nthreads, int64_t tasks, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace lathe
