#include "kernels/cpu/thread_pool.h"

#include <algorithm>

namespace ps::kernels::cpu {

ThreadPool::ThreadPool(int num_threads) {
  if (num_threads <= 0) num_threads = static_cast<int>(std::thread::hardware_concurrency());
  num_threads_ = std::max(1, num_threads);
  workers_.reserve(num_threads_ - 1);
  for (int i = 1; i < num_threads_; ++i) workers_.emplace_back([this, i] { WorkerLoop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

void ThreadPool::ParallelFor(int64_t n, int64_t grain,
                             const std::function<void(int64_t, int64_t)>& body) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  // Small work, a single thread, or a nested call: run inline.
  if (num_threads_ == 1 || n <= grain || running_) {
    body(0, n);
    return;
  }
  // A few chunks per thread balance uneven ranges without much locking.
  const int64_t max_chunks = (n + grain - 1) / grain;
  const int64_t num_chunks = std::min<int64_t>(max_chunks, int64_t{num_threads_} * 4);
  const int64_t chunk = (n + num_chunks - 1) / num_chunks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    running_ = true;
    body_ = &body;
    n_ = n;
    chunk_ = chunk;
    num_chunks_ = (n + chunk - 1) / chunk;
    next_chunk_ = 0;
    pending_ = num_chunks_;
    ++generation_;
  }
  work_cv_.notify_all();
  // The caller works too.
  while (true) {
    int64_t index;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (next_chunk_ >= num_chunks_) break;
      index = next_chunk_++;
    }
    body(index * chunk, std::min(n, (index + 1) * chunk));
    std::lock_guard<std::mutex> lock(mu_);
    --pending_;
  }
  std::unique_lock<std::mutex> lock(mu_);
  done_cv_.wait(lock, [this] { return pending_ == 0; });
  body_ = nullptr;
  running_ = false;
}

void ThreadPool::WorkerLoop(int /*index*/) {
  uint64_t seen = 0;
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    work_cv_.wait(lock,
                  [&] { return stop_ || (generation_ != seen && next_chunk_ < num_chunks_); });
    if (stop_) return;
    seen = generation_;
    while (next_chunk_ < num_chunks_) {
      const int64_t index = next_chunk_++;
      const auto* body = body_;
      const int64_t begin = index * chunk_;
      const int64_t end = std::min(n_, begin + chunk_);
      lock.unlock();
      (*body)(begin, end);
      lock.lock();
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }
}

}  // namespace ps::kernels::cpu
