// Chunked parallel loops for a chain of short layers (csrc/cpu/conv_chain.h), run inside one
// OpenMP parallel region: thread 0 drives the chain and calls run() per loop; the other threads
// of the region sit in serve(). Every thread claims chunks of the current loop from one counter,
// so thread 0 never waits for a thread the OS has not scheduled (it does the chunks itself) and
// waits only for chunks already in progress. Between loops an idle thread spins briefly, then
// yields. parallel_tasks() uses the pool bound to the calling thread (TaskPool::Bind) or,
// without one, a plain OpenMP loop.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>

namespace lathe {

class TaskPool {
 public:
  // fn(first, last) over contiguous chunks of [0, tasks); `ways`: the chunk count is 4 x ways.
  void run(int64_t tasks, int ways, const std::function<void(int64_t, int64_t)>& fn);
  void serve();   // the helpers' loop, until finish()
  void finish();  // thread 0, when the chain is done

  struct Bind {  // routes parallel_tasks() on this thread to the pool while alive
    explicit Bind(TaskPool* p);
    ~Bind();
    TaskPool* prev;
  };

 private:
  bool work(uint64_t gen);  // claims and runs chunks of job gen; false once none is left
  std::atomic<uint64_t> gen_{0};    // job generation; kStop when finished
  std::atomic<uint64_t> claim_{0};  // gen << 32 | next chunk: a late thread cannot claim a newer job's chunk
  std::atomic<int64_t> done_{0};    // chunks finished in the current job
  int64_t tasks_ = 0, chunks_ = 0;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
};

// fn(first, last) over [0, tasks) on up to nthreads threads (1: inline, no fork/join).
void parallel_tasks(int nthreads, int64_t tasks, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace lathe
