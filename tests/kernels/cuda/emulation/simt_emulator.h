// A small SIMT emulator that runs the CUDA kernels of kernels/cuda/*.cu on the CPU, so that their
// indexing, masking and reduction logic is executed in CI, where there is no GPU (the real GPU
// tests, tests/kernels/cuda/cuda_backend_test.cc, skip themselves there). translate_cu.py rewrites
// a .cu file into C++ that includes this header: kernel launches become ps_emu::Launch calls,
// `__shared__` becomes `static` (blocks run one after the other), dynamic shared memory a buffer.
// Every CUDA thread of a block is a std::thread; __syncthreads is a block-wide barrier and the
// warp shuffles exchange values through per-warp slots between two warp barriers.
//
// What this checks: the arithmetic and the thread/block mapping of every kernel, including
// shared-memory staging and warp reductions, on host memory. What it cannot check: the GPU memory
// model (visibility without barriers), timing, occupancy, launch limits, or the host side of the
// backend (cuda_backend.cc: streams, cuBLAS, the staging arena).
#ifndef POLYSKETCH_TESTS_KERNELS_CUDA_EMULATION_SIMT_EMULATOR_H_
#define POLYSKETCH_TESTS_KERNELS_CUDA_EMULATION_SIMT_EMULATOR_H_

#include <barrier>
#include <cmath>
#include <math.h>  // expf, sqrtf, fmaxf in the global namespace, as in CUDA
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
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

struct BlockContext {
  dim3 block_dim, grid_dim;
  std::unique_ptr<std::barrier<>> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<float> slots;  // one per thread: the shuffle exchange
  std::vector<double> dynamic_shared;  // 8-byte aligned
};
inline BlockContext* g_block = nullptr;
inline thread_local dim3 t_thread_idx;
inline thread_local dim3 t_block_idx;
inline thread_local int t_linear = 0;

inline void SyncThreads() { g_block->block_barrier->arrive_and_wait(); }

inline float Exchange(float v, int source_lane) {
  const int warp = t_linear / 32;
  g_block->slots[t_linear] = v;
  g_block->warp_barriers[warp]->arrive_and_wait();
  const float r = g_block->slots[warp * 32 + source_lane];
  g_block->warp_barriers[warp]->arrive_and_wait();
  return r;
}

inline void* DynamicShared() { return g_block->dynamic_shared.data(); }

// Runs kernel<<<grid, block, shared_bytes>>>(args...) to completion, blocks in order.
template <typename... Params, typename... Args>
void Launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t,
            Args&&... args) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  BlockContext ctx;
  ctx.block_dim = block;
  ctx.grid_dim = grid;
  ctx.slots.assign(static_cast<size_t>(threads), 0.0f);
  g_block = &ctx;
  const std::tuple<Params...> params(static_cast<Params>(args)...);
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        ctx.block_barrier = std::make_unique<std::barrier<>>(threads);
        ctx.warp_barriers.clear();
        for (int w = 0; w < (threads + 31) / 32; ++w) {
          ctx.warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32, threads - 32 * w)));
        }
        // Garbage, not zeros: kernels must initialise their shared memory.
        ctx.dynamic_shared.assign(shared_bytes / sizeof(double) + 1, std::nan(""));
        std::vector<std::thread> pool;
        pool.reserve(static_cast<size_t>(threads));
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t, bx, by, bz] {
            t_linear = t;
            t_thread_idx = dim3(static_cast<unsigned>(t) % block.x,
                                (static_cast<unsigned>(t) / block.x) % block.y,
                                static_cast<unsigned>(t) / (block.x * block.y));
            t_block_idx = dim3(bx, by, bz);
            std::apply(kernel, params);
          });
        }
        for (std::thread& th : pool) th.join();
      }
    }
  }
  g_block = nullptr;
}

}  // namespace ps_emu

#define threadIdx (::ps_emu::t_thread_idx)
#define blockIdx (::ps_emu::t_block_idx)
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
  return ps_emu::Exchange(v, (ps_emu::t_linear % 32) ^ offset);
}
inline float __shfl_sync(unsigned, float v, int lane) { return ps_emu::Exchange(v, lane); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline void sincos(double x, double* s, double* c) {
  *s = std::sin(x);
  *c = std::cos(x);
}

#endif  // POLYSKETCH_TESTS_KERNELS_CUDA_EMULATION_SIMT_EMULATOR_H_
