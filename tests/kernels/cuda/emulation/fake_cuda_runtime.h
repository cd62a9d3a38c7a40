// Stand-ins for the CUDA runtime and cuBLAS calls of kernels/cuda/cuda_backend.cc, on host memory,
// for the emulation build (simt_emulator.h): one pretend device, streams that run everything at
// once, and cuBLAS GEMMs computed naively with cuBLAS's documented column-major semantics (so the
// backend's operand mapping is checked, not assumed). bf16 operands are widened exactly.
#ifndef POLYSKETCH_TESTS_KERNELS_CUDA_EMULATION_FAKE_CUDA_RUNTIME_H_
#define POLYSKETCH_TESTS_KERNELS_CUDA_EMULATION_FAKE_CUDA_RUNTIME_H_

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "simt_emulator.h"

inline constexpr cudaError_t cudaErrorMemoryAllocation = static_cast<cudaError_t>(2);
inline constexpr cudaError_t cudaErrorInvalidDevice = static_cast<cudaError_t>(101);
inline constexpr unsigned cudaStreamNonBlocking = 1;
enum cudaMemcpyKind {
  cudaMemcpyHostToHost,
  cudaMemcpyHostToDevice,
  cudaMemcpyDeviceToHost,
  cudaMemcpyDeviceToDevice
};
struct cudaDeviceProp {
  char name[256];
  int major;
  int minor;
  int multiProcessorCount;
};

inline const char* cudaGetErrorName(cudaError_t e) {
  return e == cudaSuccess ? "cudaSuccess" : "cudaErrorEmulated";
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "emulated failure";
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : cudaErrorInvalidDevice;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int) {
  std::memset(prop, 0, sizeof(*prop));
  std::strcpy(prop->name, "SIMT emulator");
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = 4;  // few SMs: small split counts keep emulated launches short
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned) {
  static int token;
  *stream = &token;
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaMalloc(void** p, size_t bytes) {
  if (bytes > (size_t{1} << 36)) return cudaErrorMemoryAllocation;
  *p = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
  if (*p == nullptr) return cudaErrorMemoryAllocation;
  std::memset(*p, 0xa5, bytes);  // garbage: Allocate must zero
  return cudaSuccess;
}
inline cudaError_t cudaMallocHost(void** p, size_t bytes) { return cudaMalloc(p, bytes); }
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaFreeHost(void* p) { return cudaFree(p); }
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind,
                                   cudaStream_t) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}

// --- cuBLAS ------------------------------------------------------------------------------------
using cublasHandle_t = void*;
enum cublasStatus_t {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_NOT_INITIALIZED = 1,
  CUBLAS_STATUS_ALLOC_FAILED = 3,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_ARCH_MISMATCH = 8,
  CUBLAS_STATUS_EXECUTION_FAILED = 13,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum cudaDataType { CUDA_R_32F = 0, CUDA_R_16BF = 14 };
enum cublasComputeType_t { CUBLAS_COMPUTE_32F = 68 };
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1 };

inline cublasStatus_t cublasCreate(cublasHandle_t* handle) {
  static int token;
  *handle = &token;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasDestroy(cublasHandle_t) { return CUBLAS_STATUS_SUCCESS; }
inline cublasStatus_t cublasSetStream(cublasHandle_t, cudaStream_t) {
  return CUBLAS_STATUS_SUCCESS;
}

namespace ps_emu {
inline float Element(const void* p, cudaDataType type, int64_t i) {
  if (type == CUDA_R_32F) return static_cast<const float*>(p)[i];
  const uint32_t bits = uint32_t{static_cast<const uint16_t*>(p)[i]} << 16;
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}
// C = alpha op(A) op(B) + beta C, column-major, C [m, n] with leading dimension ldc.
inline cublasStatus_t Gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                           const float* alpha, const void* a, cudaDataType at, int lda,
                           const void* b, cudaDataType bt, int ldb, const float* beta, float* c,
                           int ldc) {
  if (lda < (ta == CUBLAS_OP_N ? m : k) || ldb < (tb == CUBLAS_OP_N ? k : n) || ldc < m) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  for (int j = 0; j < n; ++j) {
    for (int i = 0; i < m; ++i) {
      double sum = 0.0;
      for (int l = 0; l < k; ++l) {
        const float x =
            Element(a, at, ta == CUBLAS_OP_N ? i + int64_t{l} * lda : l + int64_t{i} * lda);
        const float y =
            Element(b, bt, tb == CUBLAS_OP_N ? l + int64_t{j} * ldb : j + int64_t{l} * ldb);
        sum += double{x} * y;
      }
      float& out = c[i + int64_t{j} * ldc];
      out = static_cast<float>(*alpha * sum + (*beta == 0.0f ? 0.0 : double{*beta} * out));
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}
}  // namespace ps_emu

inline cublasStatus_t cublasSgemm(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m,
                                  int n, int k, const float* alpha, const float* a, int lda,
                                  const float* b, int ldb, const float* beta, float* c, int ldc) {
  return ps_emu::Gemm(ta, tb, m, n, k, alpha, a, CUDA_R_32F, lda, b, CUDA_R_32F, ldb, beta, c, ldc);
}
inline cublasStatus_t cublasGemmEx(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb,
                                   int m, int n, int k, const void* alpha, const void* a,
                                   cudaDataType at, int lda, const void* b, cudaDataType bt,
                                   int ldb, const void* beta, void* c, cudaDataType ct, int ldc,
                                   cublasComputeType_t, cublasGemmAlgo_t) {
  if (ct != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
  return ps_emu::Gemm(ta, tb, m, n, k, static_cast<const float*>(alpha), a, at, lda, b, bt, ldb,
                      static_cast<const float*>(beta), static_cast<float*>(c), ldc);
}

#endif  // POLYSKETCH_TESTS_KERNELS_CUDA_EMULATION_FAKE_CUDA_RUNTIME_H_
