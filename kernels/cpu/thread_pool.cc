#include "kernels/cpu/thread_pool.h"

#include <algorithm>
#include <chrono>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace ps::kernels::cpu {
namespace {

// How long an idle worker spins before it sleeps: longer than the gap between two ops of a
// decode step, short enough not to burn a core between requests.
constexpr auto kSpinTime = std::chrono::microseconds(2000);

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// The chunk index of a closed generation: larger than any job's chunk count.
constexpr uint64_t kClosed = 0xffffffffu;

inline uint32_t GenerationOf(uint64_t claim) { return static_cast<uint32_t>(claim >> 32); }
inline int64_t IndexOf(uint64_t claim) { return static_cast<int64_t>(claim & 0xffffffffu); }

}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  if (num_threads <= 0) num_threads = static_cast<int>(std::thread::hardware_concurrency());
  num_threads_ = std::max(1, num_threads);
  workers_.reserve(num_threads_ - 1);
  for (int i = 1; i < num_threads_; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
  }
  wake_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

void ThreadPool::RunChunks(uint32_t generation) {
  uint64_t claim = claim_.load(std::memory_order_acquire);
  while (GenerationOf(claim) == generation &&
         IndexOf(claim) < num_chunks_.load(std::memory_order_relaxed)) {
    if (!claim_.compare_exchange_weak(claim, claim + 1, std::memory_order_acq_rel,
                                      std::memory_order_acquire)) {
      continue;  // `claim` was reloaded
    }
    // The chunk is ours, so the job is still running and its fields are stable.
    const int64_t begin = IndexOf(claim) * chunk_;
    const int64_t end = std::min(n_, begin + chunk_);
    (*body_)(begin, end);
    done_.fetch_add(1, std::memory_order_acq_rel);
    claim = claim_.load(std::memory_order_acquire);
  }
}

void ThreadPool::ParallelFor(int64_t n, int64_t grain,
                             const std::function<void(int64_t, int64_t)>& body) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  // Small work, a single thread, or a nested call: run inline.
  if (num_threads_ == 1 || n <= grain || running_.load(std::memory_order_relaxed)) {
    body(0, n);
    return;
  }
  running_.store(true, std::memory_order_relaxed);
  // Close the previous job first: a worker still holding its generation can no longer claim
  // anything (its compare-and-swap fails) while the fields below change. The closing generation
  // has no chunks (index kClosed), so a worker that sees it runs nothing and waits for the next.
  const uint32_t closed = GenerationOf(claim_.load(std::memory_order_relaxed)) + 1;
  claim_.store((uint64_t{closed} << 32) | kClosed, std::memory_order_seq_cst);
  // A few chunks per thread balance uneven ranges.
  const int64_t max_chunks = (n + grain - 1) / grain;
  const int64_t num_chunks = std::min<int64_t>(max_chunks, int64_t{num_threads_} * 4);
  chunk_ = (n + num_chunks - 1) / num_chunks;
  num_chunks_.store((n + chunk_ - 1) / chunk_, std::memory_order_relaxed);
  n_ = n;
  body_ = &body;
  done_.store(0, std::memory_order_relaxed);
  const uint32_t generation = closed + 1;
  claim_.store(uint64_t{generation} << 32, std::memory_order_seq_cst);  // publishes the job
  if (sleeping_.load(std::memory_order_seq_cst) > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    wake_.notify_all();
  }
  RunChunks(generation);
  const int64_t total = num_chunks_.load(std::memory_order_relaxed);
  while (done_.load(std::memory_order_acquire) < total) CpuRelax();
  body_ = nullptr;
  running_.store(false, std::memory_order_relaxed);
}

void ThreadPool::WorkerLoop() {
  uint32_t seen = 0;
  while (true) {
    // Spin for the next job, then sleep until one comes.
    auto spin_until = std::chrono::steady_clock::now() + kSpinTime;
    uint32_t generation = GenerationOf(claim_.load(std::memory_order_acquire));
    for (int spins = 0; generation == seen; ++spins) {
      if (stop_.load(std::memory_order_relaxed)) return;
      CpuRelax();
      if ((spins & 63) == 63 && std::chrono::steady_clock::now() > spin_until) {
        std::unique_lock<std::mutex> lock(mu_);
        sleeping_.fetch_add(1, std::memory_order_seq_cst);
        wake_.wait(lock, [&] {
          return stop_.load() || GenerationOf(claim_.load(std::memory_order_seq_cst)) != seen;
        });
        sleeping_.fetch_sub(1, std::memory_order_seq_cst);
        if (stop_.load()) return;
        spin_until = std::chrono::steady_clock::now() + kSpinTime;
      }
      generation = GenerationOf(claim_.load(std::memory_order_acquire));
    }
    seen = generation;
    RunChunks(generation);
  }
}

}  // namespace ps::kernels::cpu
