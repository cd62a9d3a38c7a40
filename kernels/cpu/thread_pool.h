// One pool of worker threads shared by every CPU kernel (architecture.md, "Threads"). A
// ParallelFor splits [0, n) into contiguous ranges, runs them on the workers and the calling
// thread, and returns when all are done. Calls must not overlap (one engine thread drives the
// backend) and must not nest: a body that calls ParallelFor on the same pool runs it inline.
//
// A decode step is ~100 small ops of tens of microseconds each, so waking threads through the
// kernel for every op would cost more than the op. Workers therefore spin (with pause) for a
// short while after each op, waiting for the next one, and only then sleep on a condition
// variable; the caller wakes sleepers only when there are any.
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
  // Claims and runs chunks of job `generation` until none is left.
  void RunChunks(uint32_t generation);
  void WorkerLoop();

  int num_threads_ = 1;
  std::vector<std::thread> workers_;

  // The current job. Written by the caller between closing the previous job and publishing this
  // one through `claim_`; body_, n_ and chunk_ are read by a worker only after it claimed a chunk
  // of this job (so the job is still running and the fields are stable).
  const std::function<void(int64_t, int64_t)>* body_ = nullptr;
  int64_t n_ = 0;
  int64_t chunk_ = 0;
  std::atomic<int64_t> num_chunks_{0};  // read by workers before they claim
  // (generation << 32) | next unclaimed chunk. A claim is a compare-and-swap that keeps the
  // generation, so a late worker can never claim a chunk of a newer job by mistake.
  std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> done_{0};  // chunks finished in the current job
  std::atomic<bool> running_{false};

  // Sleeping workers.
  std::mutex mu_;
  std::condition_variable wake_;
  std::atomic<int> sleeping_{0};
  std::atomic<bool> stop_{false};
};

}  // namespace ps::kernels::cpu

#endif  // POLYSKETCH_KERNELS_CPU_THREAD_POOL_H_
