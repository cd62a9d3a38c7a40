// A small SIMT emulator that runs the CUDA kernels of kernels/cuda/*.cu on the CPU, so that their
// indexing, masking and reduction logic is executed in CI, where there is no GPU (the real GPU
// tests, tests/kernels/cuda/cuda_backend_test.cc, skip themselves there). translate_cu.py rewrites
// a .cu file into C++ that includes this header: kernel launches become ps_emu::Launch calls,
// `__shared__` becomes `static` (blocks run one after the other), dynamic shared memory a buffer.
// Every CUDA thread of a block is a fiber (ucontext) on the calling thread, switched at barriers;
// __syncthreads is a block-wide barrier and the warp shuffles exchange values through per-warp
// slots between two warp barriers.
//
// What this checks: the arithmetic and the thread/block mapping of every kernel, including
// shared-memory staging and warp reductions, on host memory. What it cannot check: the GPU memory
// model (visibility without barriers), timing, occupancy, launch limits, or the host side of the
// backend (cuda_backend.cc: streams, cuBLAS, the staging arena).
#ifndef POLYSKETCH_TESTS_KERNELS_CUDA_EMULATION_SIMT_EMULATOR_H_
#define POLYSKETCH_TESTS_KERNELS_CUDA_EMULATION_SIMT_EMULATOR_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <math.h>  // expf, sqrtf, fmaxf in the global namespace, as in CUDA
#include <memory>
#include <tuple>
#include <ucontext.h>
#include <utility>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <typename F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}

struct __nv_bfloat16 {
  uint16_t bits;
};
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  if ((b & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((b >> 16) | 0x40)};
  b += 0x7fffu + ((b >> 16) & 1u);
  return {static_cast<uint16_t>(b >> 16)};
}

namespace ps_emu {

// Every CUDA thread of the running block is a fiber (ucontext) on this one OS thread: a fiber
// runs until it reaches a barrier (__syncthreads, or the warp barrier inside a shuffle), then the
// scheduler resumes the next runnable one. No OS threads, so emulation costs little CPU.
struct Fiber {
  ucontext_t context;
  dim3 thread_idx;
  int linear = 0;
  bool done = false;
  int waiting = 0;  // 0: runnable, 1: block barrier, 2: warp barrier
  uint64_t wait_generation = 0;
};

struct BlockContext {
  dim3 block_dim, grid_dim, block_idx;
  int threads = 0;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  int block_arrived = 0;
  uint64_t block_generation = 0;
  std::vector<int> warp_arrived;
  std::vector<uint64_t> warp_generation;
  std::vector<float> slots;            // one per thread: the shuffle exchange
  std::vector<double> dynamic_shared;  // 8-byte aligned
  std::function<void()> body;
};
inline BlockContext* g_block = nullptr;

inline Fiber& Current() { return g_block->fibers[static_cast<size_t>(g_block->current)]; }

// Waits at the block barrier (kind 1) or this thread's warp barrier (kind 2).
inline void Arrive(int kind) {
  BlockContext& b = *g_block;
  Fiber& me = Current();
  const int warp = me.linear / 32;
  int& arrived = kind == 1 ? b.block_arrived : b.warp_arrived[static_cast<size_t>(warp)];
  uint64_t& generation =
      kind == 1 ? b.block_generation : b.warp_generation[static_cast<size_t>(warp)];
  const int expected = kind == 1 ? b.threads : std::min(32, b.threads - 32 * warp);
  if (++arrived == expected) {  // the last one releases the others and goes on
    arrived = 0;
    ++generation;
    return;
  }
  me.waiting = kind;
  me.wait_generation = generation;
  swapcontext(&me.context, &b.scheduler);
}

inline void FiberMain() {
  g_block->body();
  Current().done = true;
  // Returning ends the fiber: uc_link resumes the scheduler.
}

inline void SyncThreads() { Arrive(1); }

inline float Exchange(float v, int source_lane) {
  const int linear = Current().linear;
  const int warp = linear / 32;
  g_block->slots[static_cast<size_t>(linear)] = v;
  Arrive(2);
  const float r = g_block->slots[static_cast<size_t>(warp * 32 + source_lane)];
  Arrive(2);
  return r;
}

inline void* DynamicShared() { return g_block->dynamic_shared.data(); }

// Runs one block (ctx.block_idx) to completion. getcontext/swapcontext save and restore every
// register, so the "might be clobbered" warning GCC gives for returns-twice calls does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wclobbered"
inline void RunBlock(BlockContext& ctx, size_t shared_bytes) {
  constexpr size_t kStackBytes = 256 * 1024;
  const int warps = (ctx.threads + 31) / 32;
  const dim3 block = ctx.block_dim;
  ctx.block_arrived = 0;
  ctx.warp_arrived.assign(static_cast<size_t>(warps), 0);
  ctx.warp_generation.assign(static_cast<size_t>(warps), 0);
  // Garbage, not zeros: kernels must initialise their shared memory.
  ctx.dynamic_shared.assign(shared_bytes / sizeof(double) + 1, std::nan(""));
  // Fiber stacks are kept across launches (allocating them is most of an emulated launch).
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (stacks.size() < static_cast<size_t>(ctx.threads)) {
    stacks.push_back(std::unique_ptr<char[]>(new char[kStackBytes]));
  }
  ctx.fibers.assign(static_cast<size_t>(ctx.threads), Fiber());
  for (int t = 0; t < ctx.threads; ++t) {
    Fiber& f = ctx.fibers[static_cast<size_t>(t)];
    f.linear = t;
    f.thread_idx =
        dim3(static_cast<unsigned>(t) % block.x, (static_cast<unsigned>(t) / block.x) % block.y,
             static_cast<unsigned>(t) / (block.x * block.y));
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stacks[static_cast<size_t>(t)].get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &ctx.scheduler;
    makecontext(&f.context, &FiberMain, 0);
  }
  for (int remaining = ctx.threads; remaining > 0;) {
    bool progressed = false;
    for (int t = 0; t < ctx.threads; ++t) {
      Fiber& f = ctx.fibers[static_cast<size_t>(t)];
      if (f.done) continue;
      if (f.waiting != 0) {
        const uint64_t now = f.waiting == 1 ? ctx.block_generation
                                            : ctx.warp_generation[static_cast<size_t>(t / 32)];
        if (now == f.wait_generation) continue;  // still held at its barrier
        f.waiting = 0;
      }
      ctx.current = t;
      swapcontext(&ctx.scheduler, &f.context);
      progressed = true;
      if (f.done) --remaining;
    }
    if (!progressed) {
      std::fprintf(stderr, "simt emulator: deadlock (a barrier not reached by all threads)\n");
      std::abort();
    }
  }
}
#pragma GCC diagnostic pop

// Runs kernel<<<grid, block, shared_bytes>>>(args...) to completion, blocks in order.
template <typename... Params, typename... Args>
void Launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t,
            Args&&... args) {
  BlockContext ctx;
  ctx.block_dim = block;
  ctx.grid_dim = grid;
  ctx.threads = static_cast<int>(block.x * block.y * block.z);
  ctx.slots.assign(static_cast<size_t>(ctx.threads), 0.0f);
  const std::tuple<Params...> params(static_cast<Params>(args)...);
  ctx.body = [&] { std::apply(kernel, params); };
  BlockContext* saved = g_block;
  g_block = &ctx;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        ctx.block_idx = dim3(bx, by, bz);
        RunBlock(ctx, shared_bytes);
      }
    }
  }
  g_block = saved;
}

}  // namespace ps_emu

#define threadIdx (::ps_emu::Current().thread_idx)
#define blockIdx (::ps_emu::g_block->block_idx)
#define blockDim (::ps_emu::g_block->block_dim)
#define gridDim (::ps_emu::g_block->grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict

inline void __syncthreads() { ps_emu::SyncThreads(); }
inline float __shfl_xor_sync(unsigned, float v, int offset) {
  return ps_emu::Exchange(v, (ps_emu::Current().linear % 32) ^ offset);
}
inline float __shfl_sync(unsigned, float v, int lane) { return ps_emu::Exchange(v, lane); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline void sincos(double x, double* s, double* c) {
  *s = std::sin(x);
  *c = std::cos(x);
}

#endif  // POLYSKETCH_TESTS_KERNELS_CUDA_EMULATION_SIMT_EMULATOR_H_
