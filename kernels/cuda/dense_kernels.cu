// The CUDA backend's dense elementwise and row ops (kernels/backend.h "dense ops"); the CPU
// versions (kernels/cpu/dense.cc) are their oracle in tests/kernels/cuda/cuda_backend_test.cc.
// All memory-bound: one read and one write of each element, grid-stride loops over flat indices
// (row ops: one warp per row). Numerics follow the CPU backend: LayerNorm two-pass in fp32 (mean,
// then the centred sum of squares; the CPU uses double, the difference is a few fp32 ulp for the
// widths of these models), sinusoid and RoPE angles in double, GELU as x / (1 + e^(-2u)) in fp32,
// the learned-sketch tanh in double.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/kernels.h"

namespace ps::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// Enough blocks for a grid-stride loop over n elements, capped (the loop does the rest).
unsigned BlocksFor(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

__device__ __forceinline__ float WarpSum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float GeluTanh(float x) {
  constexpr float kTwoSqrt2OverPi = 2.0f * 0.7978845608028654f;
  const float z = (x + 0.044715f * x * x * x) * -kTwoSqrt2OverPi;
  return x / (1.0f + expf(z));
}

__global__ void F32ToBf16Kernel(const float* __restrict__ x, int64_t n, __nv_bfloat16* y) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] = __float2bfloat16_rn(x[i]);
  }
}

// One warp per row: x is read twice from L1/L2 (mean, then variance) and once more to write y.
__global__ void LayerNormKernel(const float* __restrict__ x, int64_t rows, int64_t n,
                                const float* __restrict__ gamma, const float* __restrict__ beta,
                                float eps, float* y) {
  const int lane = threadIdx.x % 32;
  const int64_t warps_per_block = blockDim.x / 32;
  for (int64_t row = blockIdx.x * warps_per_block + threadIdx.x / 32; row < rows;
       row += int64_t{gridDim.x} * warps_per_block) {
    const float* xr = x + row * n;
    float sum = 0.0f;
    for (int64_t i = lane; i < n; i += 32) sum += xr[i];
    const float mean = WarpSum(sum) / static_cast<float>(n);
    float sq = 0.0f;
    for (int64_t i = lane; i < n; i += 32) {
      const float d = xr[i] - mean;
      sq += d * d;
    }
    const float var = WarpSum(sq) / static_cast<float>(n);
    const float inv_std = rsqrtf(var + eps);
    float* yr = y + row * n;  // may alias xr: every lane read its elements above
    for (int64_t i = lane; i < n; i += 32) yr[i] = (xr[i] - mean) * inv_std * gamma[i] + beta[i];
  }
}

// sinusoidal false: a copy of the table rows (positions unread, may be null).
__global__ void EmbedKernel(const float* __restrict__ table, int64_t d,
                            const int32_t* __restrict__ tokens,
                            const int64_t* __restrict__ positions, int64_t m, bool sinusoidal,
                            float* x) {
  const int64_t half = d / 2;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < m * half;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = idx / half;
    const int64_t i = idx % half;
    const float* e = table + static_cast<int64_t>(tokens[row]) * d;
    if (!sinusoidal) {
      x[row * d + 2 * i] = e[2 * i];
      x[row * d + 2 * i + 1] = e[2 * i + 1];
      continue;
    }
    const double freq = pow(10000.0, -static_cast<double>(i) / static_cast<double>(half));
    const double angle = static_cast<double>(positions[row]) * freq;
    double s, c;
    sincos(angle, &s, &c);
    x[row * d + 2 * i] = static_cast<float>(e[2 * i] + s);
    x[row * d + 2 * i + 1] = static_cast<float>(e[2 * i + 1] + c);
  }
}

// Pair i of one head: y[i] = x[2i] c - x[2i+1] s, y[h/2 + i] = x[2i+1] c + x[2i] s, the angle
// t * 10000^(-2i/h) in double (reference::Rope).
__device__ __forceinline__ void RotatePair(const float* __restrict__ x, int64_t i, int64_t half,
                                           double s, double c, float* y) {
  const double even = x[2 * i];
  const double odd = x[2 * i + 1];
  y[i] = static_cast<float>(even * c - odd * s);
  y[half + i] = static_cast<float>(odd * c + even * s);
}

__device__ __forceinline__ void RopeSinCos(int64_t t, int64_t i, int64_t h, double* s, double* c) {
  const double theta = pow(10000.0, -2.0 * static_cast<double>(i) / static_cast<double>(h));
  sincos(static_cast<double>(t) * theta, s, c);
}

// One thread per (row, head, pair) rotates the pair of q and of k (rope) or copies it (!rope),
// and copies two v elements.
__global__ void SplitQkvRopeKernel(const float* __restrict__ qkv, int64_t m, int64_t heads,
                                   int64_t h, const int64_t* __restrict__ positions, bool rope,
                                   float* q, float* k, float* v) {
  const int64_t half = h / 2;
  const int64_t D = heads * h;
  const int64_t total = m * heads * half;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = idx % half;
    const int64_t head = (idx / half) % heads;
    const int64_t row = idx / (half * heads);
    const float* src = qkv + row * 3 * D + head * h;
    const int64_t out = row * D + head * h;
    if (rope) {
      double s, c;
      RopeSinCos(positions[row], i, h, &s, &c);
      RotatePair(src, i, half, s, c, q + out);
      RotatePair(src + D, i, half, s, c, k + out);
    } else {
      q[out + 2 * i] = src[2 * i];
      q[out + 2 * i + 1] = src[2 * i + 1];
      k[out + 2 * i] = src[D + 2 * i];
      k[out + 2 * i + 1] = src[D + 2 * i + 1];
    }
    v[out + 2 * i] = src[2 * D + 2 * i];
    v[out + 2 * i + 1] = src[2 * D + 2 * i + 1];
  }
}

// One thread per (row, head, pair) of x [m, H, h]: y = RoPE(x) at positions[row].
__global__ void RopeKernel(const float* __restrict__ x, int64_t m, int64_t heads, int64_t h,
                           const int64_t* __restrict__ positions, float* y) {
  const int64_t half = h / 2;
  const int64_t total = m * heads * half;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = idx % half;
    const int64_t row_head = idx / half;  // row * heads + head
    double s, c;
    RopeSinCos(positions[row_head / heads], i, h, &s, &c);
    RotatePair(x + row_head * h, i, half, s, c, y + row_head * h);
  }
}

__global__ void GeluGateKernel(const float* __restrict__ up, int64_t m, int64_t f, float* out) {
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < m * f;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = idx / f;
    const int64_t j = idx % f;
    out[idx] = GeluTanh(up[row * 2 * f + f + j]) * up[row * 2 * f + j];
  }
}

__global__ void GeluKernel(float* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    x[i] = GeluTanh(x[i]);
  }
}

__global__ void MultiplyKernel(const float* a, const float* b, int64_t n, float* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = a[i] * b[i];
  }
}

__global__ void SketchCombineKernel(const float* f1, const float* f2, int64_t n, double sqrt_r,
                                    float* psi) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const double z = static_cast<double>(f1[i]) * f2[i];
    psi[i] = static_cast<float>(sqrt_r * tanh(z / sqrt_r));
  }
}

__global__ void AddBiasKernel(float* y, int64_t m, int64_t n, const float* __restrict__ bias) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < m * n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] += bias[i % n];
  }
}

}  // namespace

void LaunchF32ToBf16(const float* x, int64_t n, void* y, cudaStream_t stream) {
  if (n <= 0) return;
  F32ToBf16Kernel<<<BlocksFor(n), kThreads, 0, stream>>>(x, n, static_cast<__nv_bfloat16*>(y));
}

void LaunchLayerNorm(const float* x, int64_t rows, int64_t n, const float* gamma, const float* beta,
                     float eps, float* y, cudaStream_t stream) {
  if (rows <= 0) return;
  LayerNormKernel<<<BlocksFor(rows * 32), kThreads, 0, stream>>>(x, rows, n, gamma, beta, eps, y);
}

void LaunchEmbed(const float* table, int64_t d, const int32_t* tokens, const int64_t* positions,
                 int64_t m, bool sinusoidal, float* x, cudaStream_t stream) {
  if (m <= 0) return;
  EmbedKernel<<<BlocksFor(m * d / 2), kThreads, 0, stream>>>(table, d, tokens, positions, m,
                                                             sinusoidal, x);
}

void LaunchSplitQkvRope(const float* qkv, int64_t m, int64_t heads, int64_t head_dim,
                        const int64_t* positions, bool rope, float* q, float* k, float* v,
                        cudaStream_t stream) {
  if (m <= 0) return;
  SplitQkvRopeKernel<<<BlocksFor(m * heads * head_dim / 2), kThreads, 0, stream>>>(
      qkv, m, heads, head_dim, positions, rope, q, k, v);
}

void LaunchRope(const float* x, int64_t m, int64_t heads, int64_t head_dim,
                const int64_t* positions, float* y, cudaStream_t stream) {
  if (m <= 0) return;
  RopeKernel<<<BlocksFor(m * heads * head_dim / 2), kThreads, 0, stream>>>(x, m, heads, head_dim,
                                                                           positions, y);
}

void LaunchGeluGate(const float* up, int64_t m, int64_t f, float* out, cudaStream_t stream) {
  if (m * f <= 0) return;
  GeluGateKernel<<<BlocksFor(m * f), kThreads, 0, stream>>>(up, m, f, out);
}

void LaunchGelu(float* x, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  GeluKernel<<<BlocksFor(n), kThreads, 0, stream>>>(x, n);
}

void LaunchMultiply(const float* a, const float* b, int64_t n, float* out, cudaStream_t stream) {
  if (n <= 0) return;
  MultiplyKernel<<<BlocksFor(n), kThreads, 0, stream>>>(a, b, n, out);
}

void LaunchSketchCombine(const float* f1, const float* f2, int64_t n, int64_t r, float* psi,
                         cudaStream_t stream) {
  if (n <= 0) return;
  SketchCombineKernel<<<BlocksFor(n), kThreads, 0, stream>>>(f1, f2, n,
                                                             sqrt(static_cast<double>(r)), psi);
}

void LaunchAddBias(float* y, int64_t m, int64_t n, const float* bias, cudaStream_t stream) {
  if (m * n <= 0) return;
  AddBiasKernel<<<BlocksFor(m * n), kThreads, 0, stream>>>(y, m, n, bias);
}

}  // namespace ps::kernels::cuda
