// One pool of worker threads shared by every CPU kernel (architecture.md, "Threads"). A
// ParallelFor splits [0, n) into contiguous ranges, runs them on the workers and the calling
// thread, and returns when all are done. Calls must not overlap (one engine thread drives the
// backend) and must not nest: a body that calls ParallelFor on the same pool runs it inline.
#ifndef POLYSKETCH_KERNELS_CPU_THREAD_POOL_H_
#define POLYSKETCH_KERNELS_CPU_THREAD_POOL_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ps::kernels::cpu {

class ThreadPool {
 public:
  // `num_threads` >= 1 threads in all, counting the caller (num_threads - 1 workers). 0 means
  // std::thread::hardware_concurrency().
  explicit ThreadPool(int num_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // Runs body(begin, end) over disjoint ranges covering [0, n), each at least `grain` long
  // (except the last), on up to num_threads() threads. Returns when every range is done.
  void ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body);

 private:
  void WorkerLoop(int index);

  int num_threads_ = 1;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  const std::function<void(int64_t, int64_t)>* body_ = nullptr;  // guarded by mu_
  int64_t n_ = 0;
  int64_t chunk_ = 0;
  int64_t num_chunks_ = 0;
  int64_t next_chunk_ = 0;            // guarded by mu_
  int64_t pending_ = 0;               // chunks not finished; guarded by mu_
  uint64_t generation_ = 0;           // bumped per ParallelFor; guarded by mu_
  bool stop_ = false;                 // guarded by mu_
  std::atomic<bool> running_{false};  // a ParallelFor is in progress (nesting runs inline)
};

}  // namespace ps::kernels::cpu

#endif  // POLYSKETCH_KERNELS_CPU_THREAD_POOL_H_
