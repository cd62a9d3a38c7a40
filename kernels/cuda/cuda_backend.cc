// CudaBackend: memory, copies, the staging arena for per-call host arrays, cuBLAS GEMMs, and the
// host side of every kernel launch (work splits, per-sequence arrays). The kernels themselves are
// in the .cu files (kernels/cuda/kernels.h).
#include "kernels/cuda/cuda_backend.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <dlfcn.h>
#include <string>
#include <utility>

#include <absl/strings/str_cat.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/kernels.h"
#include "kernels/packed_index.h"

namespace ps::kernels::cuda {
namespace {

// Pinned staging for per-call host arrays (positions, tokens, slot pointers): reused from the
// start after every synchronisation, grown when one call needs more.
constexpr int64_t kArenaBytes = int64_t{4} << 20;
constexpr int64_t kArenaAlign = 256;

const char* CublasName(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS:
      return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED:
      return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
    default:
      return "cuBLAS error";
  }
}

absl::Status CublasStatus(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", CublasName(status)));
}

// The cuBLAS entry points the backend uses. cuBLAS is loaded with dlopen rather than linked:
// libcublasLt.so.13 carries ~94 KiB of static TLS, which glibc counts against every thread's
// stack when the library is loaded at program start, so threads created with small stacks fail
// (civetweb's, in the Prometheus exposer of polysketch-server: pthread_create returns EINVAL).
// TLS of a dlopen'ed library is allocated on demand instead. The emulation build
// (tests/kernels/cuda/emulation) links its stand-ins directly (PS_CUBLAS_LINKED).
struct CublasApi {
  decltype(&cublasCreate) create = nullptr;
  decltype(&cublasDestroy) destroy = nullptr;
  decltype(&cublasSetStream) set_stream = nullptr;
  decltype(&cublasSgemm) sgemm = nullptr;
  // cublasGemmEx has C++ overloads: name the C signature.
  cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                            const void*, const void*, cudaDataType, int, const void*, cudaDataType,
                            int, const void*, void*, cudaDataType, int, cublasComputeType_t,
                            cublasGemmAlgo_t) = nullptr;
};

absl::StatusOr<CublasApi> LoadCublas() {
  CublasApi api;
#if defined(PS_CUBLAS_LINKED)
  api.create = &cublasCreate;
  api.destroy = &cublasDestroy;
  api.set_stream = &cublasSetStream;
  api.sgemm = &cublasSgemm;
  api.gemm_ex = &cublasGemmEx;
#else
  static void* handle = [] {
    const std::string soname = absl::StrCat("libcublas.so.", CUBLAS_VER_MAJOR);
    // The loader's search path (LD_LIBRARY_PATH, the executable's RUNPATH, ld.so.cache), then
    // the toolkit's usual places.
    for (const std::string& name :
         {soname, "/usr/local/cuda/lib64/" + soname, "/usr/local/cuda/lib/" + soname}) {
      if (void* h = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL)) return h;
    }
    return static_cast<void*>(nullptr);
  }();
  if (handle == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("cuda backend: cannot load libcublas.so.", CUBLAS_VER_MAJOR,
                     " (add the CUDA toolkit's lib64 directory to LD_LIBRARY_PATH)"));
  }
  const auto symbol = [&](const char* name) { return dlsym(handle, name); };
  api.create = reinterpret_cast<decltype(api.create)>(symbol("cublasCreate_v2"));
  api.destroy = reinterpret_cast<decltype(api.destroy)>(symbol("cublasDestroy_v2"));
  api.set_stream = reinterpret_cast<decltype(api.set_stream)>(symbol("cublasSetStream_v2"));
  api.sgemm = reinterpret_cast<decltype(api.sgemm)>(symbol("cublasSgemm_v2"));
  api.gemm_ex = reinterpret_cast<decltype(api.gemm_ex)>(symbol("cublasGemmEx"));
  if (api.create == nullptr || api.destroy == nullptr || api.set_stream == nullptr ||
      api.sgemm == nullptr || api.gemm_ex == nullptr) {
    return absl::FailedPreconditionError("cuda backend: libcublas lacks an expected symbol");
  }
#endif
  return api;
}

// fp32 -> bf16 bits, round to nearest even (NaN stays NaN); matches __float2bfloat16_rn.
uint16_t ToBf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

class CudaLinearWeight final : public LinearWeight {
 public:
  CudaLinearWeight(int64_t n, int64_t k, DeviceBuffer data, bool bf16)
      : LinearWeight(n, k), data_(std::move(data)), bf16_(bf16) {}
  const void* data() const { return data_.data(); }  // [n, k] row-major, bf16 or fp32
  bool bf16() const { return bf16_; }

 private:
  DeviceBuffer data_;
  bool bf16_;
};

SketchDims DimsOf(const SketchAttentionShape& shape) {
  return SketchDims{shape.heads, shape.head_dim, shape.sketch_size, shape.local_exact,
                    shape.block_size};
}

KvDims DimsOf(const KvAttentionShape& shape) {
  return KvDims{shape.heads, shape.head_dim, shape.weighting == KvWeighting::kPolynomial,
                shape.mask,  shape.ring,     shape.capacity};
}

}  // namespace

struct CudaBackend::Impl {
  int device = 0;
  GemmPrecision gemm = GemmPrecision::kBf16;
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  CublasApi blas;
  // Staging arena: host (pinned) and device halves of the same size; `used` bytes handed out
  // since the last synchronisation, `generation` counts resets (invalidates cached uploads).
  void* host_arena = nullptr;
  void* device_arena = nullptr;
  int64_t arena_bytes = 0;
  int64_t used = 0;
  uint64_t generation = 0;
  // UploadPositions cache: the last positions uploaded and where they are.
  std::vector<int64_t> cached_positions;
  const int64_t* cached_device = nullptr;
  uint64_t cached_generation = ~uint64_t{0};

  ~Impl() {
    if (stream != nullptr) cudaStreamSynchronize(stream);
    if (host_arena != nullptr) cudaFreeHost(host_arena);
    if (device_arena != nullptr) cudaFree(device_arena);
    if (cublas != nullptr) blas.destroy(cublas);
    if (stream != nullptr) cudaStreamDestroy(stream);
  }
};

int CudaDeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" / "no device" error
    return 0;
  }
  return count;
}

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(
    const CudaBackendOptions& options) {
  const int count = CudaDeviceCount();
  if (options.device < 0 || options.device >= count) {
    return absl::FailedPreconditionError(absl::StrCat("cuda backend: device ", options.device,
                                                      " is not available (", count,
                                                      " CUDA device(s) visible to this process)"));
  }
  auto impl = std::make_unique<Impl>();
  impl->device = options.device;
  impl->gemm = options.gemm;
  PS_CUDA_RETURN_IF_ERROR(cudaSetDevice(options.device));
  cudaDeviceProp prop;
  PS_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, options.device));
  PS_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&impl->stream, cudaStreamNonBlocking));
  absl::StatusOr<CublasApi> blas = LoadCublas();
  if (!blas.ok()) return blas.status();
  impl->blas = *blas;
  {
    const absl::Status s = CublasStatus(impl->blas.create(&impl->cublas), "cublasCreate");
    if (!s.ok()) return s;
  }
  {
    const absl::Status s =
        CublasStatus(impl->blas.set_stream(impl->cublas, impl->stream), "cublasSetStream");
    if (!s.ok()) return s;
  }
  impl->arena_bytes = kArenaBytes;
  PS_CUDA_RETURN_IF_ERROR(cudaMallocHost(&impl->host_arena, static_cast<size_t>(kArenaBytes)));
  PS_CUDA_RETURN_IF_ERROR(cudaMalloc(&impl->device_arena, static_cast<size_t>(kArenaBytes)));
  std::unique_ptr<CudaBackend> backend(new CudaBackend(std::move(impl)));
  backend->num_sms_ = prop.multiProcessorCount;
  backend->description_ = absl::StrCat(prop.name, " (sm_", prop.major, prop.minor, ", ",
                                       prop.multiProcessorCount, " SMs)");
  return backend;
}

CudaBackend::CudaBackend(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

CudaBackend::~CudaBackend() {
  // The scratch buffers free through this backend: before the stream and handles go.
  bf16_x_.Reset();
  partials_.Reset();
}

void CudaBackend::Record(absl::Status status, bool sticky) {
  if (status.ok()) return;
  if (!sticky) {
    if (transient_.ok()) transient_ = std::move(status);
    return;
  }
  if (!status_.ok()) return;
  std::fprintf(stderr, "cuda backend error: %s\n", status.ToString().c_str());
  status_ = std::move(status);
}

void CudaBackend::CheckLaunch(const char* what) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) Record(CudaStatus(error, what));
}

absl::Status CudaBackend::Synchronize() {
  Record(CudaStatus(cudaStreamSynchronize(impl_->stream), "cudaStreamSynchronize"));
  impl_->used = 0;
  ++impl_->generation;
  return status_;
}

absl::Status CudaBackend::TakeStatus() {
  // Errors of work still running surface at a synchronisation (the model's logits copy has
  // synchronised already, so this wait is usually for nothing).
  Record(CudaStatus(cudaStreamSynchronize(impl_->stream), "cudaStreamSynchronize"));
  if (!status_.ok()) return status_;
  return std::exchange(transient_, absl::OkStatus());
}

absl::Status CudaBackend::CheckShape(const KvAttentionShape& shape) const {
  if (shape.cache_dtype != KvCacheDtype::kFp32) {
    // TODO(issue 19): fp16 KV caches in kv_kernels.cu (the CPU backend has them).
    return absl::UnimplementedError(
        "the cuda backend keeps KV caches in fp32 only: run with --kv_cache_dtype fp32 (or "
        "auto), or use the cpu backend for fp16 KV caches");
  }
  if (shape.head_dim > kMaxKvHeadDim) {
    return absl::UnimplementedError(
        absl::StrCat("the cuda backend's KV attention kernels support head_dim up to ",
                     kMaxKvHeadDim, ", got ", shape.head_dim));
  }
  return absl::OkStatus();
}

absl::StatusOr<DeviceBuffer> CudaBackend::Allocate(int64_t bytes) {
  if (bytes < 0) return absl::InvalidArgumentError(absl::StrCat("Allocate: bytes ", bytes, " < 0"));
  if (bytes == 0) return DeviceBuffer();
  void* data = nullptr;
  const cudaError_t error = cudaMalloc(&data, static_cast<size_t>(bytes));
  if (error != cudaSuccess) {
    cudaGetLastError();
    return absl::ResourceExhaustedError(
        absl::StrCat("cuda backend: cannot allocate ", bytes,
                     " bytes of device memory: ", cudaGetErrorString(error)));
  }
  Record(CudaStatus(cudaMemsetAsync(data, 0, static_cast<size_t>(bytes), impl_->stream),
                    "cudaMemsetAsync"));
  return DeviceBuffer(this, data, bytes);
}

void CudaBackend::Free(void* data, int64_t /*bytes*/) {
  // Work still queued may use the buffer.
  cudaStreamSynchronize(impl_->stream);
  Record(CudaStatus(cudaFree(data), "cudaFree"));
}

void CudaBackend::CopyFromHost(const void* host, int64_t bytes, void* device) {
  if (bytes <= 0) return;
  Record(CudaStatus(cudaMemcpyAsync(device, host, static_cast<size_t>(bytes),
                                    cudaMemcpyHostToDevice, impl_->stream),
                    "cudaMemcpyAsync(host to device)"));
  // The host buffer may be reused as soon as this returns (kernels/backend.h).
  Record(Synchronize());
}

void CudaBackend::CopyToHost(const void* device, int64_t bytes, void* host) {
  if (bytes <= 0) return;
  Record(CudaStatus(cudaMemcpyAsync(host, device, static_cast<size_t>(bytes),
                                    cudaMemcpyDeviceToHost, impl_->stream),
                    "cudaMemcpyAsync(device to host)"));
  Record(Synchronize());
}

void CudaBackend::Zero(void* device, int64_t bytes) {
  if (bytes <= 0) return;
  Record(CudaStatus(cudaMemsetAsync(device, 0, static_cast<size_t>(bytes), impl_->stream),
                    "cudaMemsetAsync"));
}

void CudaBackend::Copy(const void* src, int64_t bytes, void* dst) {
  if (bytes <= 0) return;
  Record(CudaStatus(cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyDeviceToDevice,
                                    impl_->stream),
                    "cudaMemcpyAsync(device to device)"));
}

const void* CudaBackend::Upload(const void* host, int64_t bytes) {
  Impl& im = *impl_;
  const int64_t size = (std::max<int64_t>(bytes, 1) + kArenaAlign - 1) / kArenaAlign * kArenaAlign;
  if (im.used + size > im.arena_bytes) {
    // Everything that read the arena has to finish before it is reused (or replaced).
    Record(Synchronize());
    if (size > im.arena_bytes) {
      cudaFreeHost(im.host_arena);
      cudaFree(im.device_arena);
      im.host_arena = nullptr;
      im.device_arena = nullptr;
      im.arena_bytes = std::max(size, 2 * im.arena_bytes);
      Record(CudaStatus(cudaMallocHost(&im.host_arena, static_cast<size_t>(im.arena_bytes)),
                        "cudaMallocHost"));
      Record(CudaStatus(cudaMalloc(&im.device_arena, static_cast<size_t>(im.arena_bytes)),
                        "cudaMalloc"));
      if (im.host_arena == nullptr || im.device_arena == nullptr) return nullptr;
    }
  }
  char* h = static_cast<char*>(im.host_arena) + im.used;
  char* d = static_cast<char*>(im.device_arena) + im.used;
  im.used += size;
  if (bytes > 0 && host != nullptr) {
    std::memcpy(h, host, static_cast<size_t>(bytes));
    Record(CudaStatus(
        cudaMemcpyAsync(d, h, static_cast<size_t>(bytes), cudaMemcpyHostToDevice, im.stream),
        "cudaMemcpyAsync(staging)"));
  }
  return d;
}

void CudaBackend::ReserveUploads(int64_t bytes) {
  Impl& im = *impl_;
  if (im.used + bytes + 4 * kArenaAlign <= im.arena_bytes) return;
  Record(Synchronize());  // everything that read the arena is done: start it over
  if (bytes + 4 * kArenaAlign > im.arena_bytes) Upload(nullptr, bytes + 4 * kArenaAlign);  // grow
  Record(Synchronize());
}

const int64_t* CudaBackend::UploadPositions(absl::Span<const int64_t> positions) {
  Impl& im = *impl_;
  // Every layer of a pass passes the same positions: upload them once per pass.
  if (im.cached_generation == im.generation && im.cached_positions.size() == positions.size() &&
      std::equal(positions.begin(), positions.end(), im.cached_positions.begin())) {
    return im.cached_device;
  }
  const auto* device = static_cast<const int64_t*>(
      Upload(positions.data(), static_cast<int64_t>(positions.size() * sizeof(int64_t))));
  im.cached_positions.assign(positions.begin(), positions.end());
  im.cached_device = device;
  im.cached_generation = im.generation;
  return device;
}

void* CudaBackend::Scratch(DeviceBuffer& buffer, int64_t bytes) {
  if (buffer.bytes() < bytes) {
    buffer.Reset();
    absl::StatusOr<DeviceBuffer> grown = Allocate(std::max(bytes, 2 * buffer.bytes()));
    if (!grown.ok()) {
      Record(grown.status(), /*sticky=*/false);  // nothing ran: the op's output is unwritten
      return nullptr;
    }
    buffer = *std::move(grown);
  }
  return buffer.data();
}

absl::Status CudaBackend::CheckWeightDtype(WeightDtype dtype) const {
  if (dtype == WeightDtype::kFp32) return absl::OkStatus();
  return absl::UnimplementedError(
      absl::StrCat("the cuda backend has no ", WeightDtypeName(dtype),
                   " weight format (it keeps fp32 weights and runs its GEMMs on bf16 operands); ",
                   WeightDtypeName(dtype), " weights are the cpu backend's"));
}

absl::StatusOr<std::unique_ptr<LinearWeight>> CudaBackend::PrepareLinear(absl::Span<const float> w,
                                                                         int64_t n, int64_t k,
                                                                         WeightDtype dtype) {
  if (absl::Status status = CheckWeightDtype(dtype); !status.ok()) return status;
  if (n <= 0 || k <= 0 || static_cast<int64_t>(w.size()) != n * k) {
    return absl::InvalidArgumentError(
        absl::StrCat("PrepareLinear: weight of ", w.size(), " floats is not [", n, ", ", k, "]"));
  }
  const bool bf16 = impl_->gemm == GemmPrecision::kBf16;
  const int64_t bytes = n * k * (bf16 ? 2 : 4);
  absl::StatusOr<DeviceBuffer> data = Allocate(bytes);
  if (!data.ok()) return data.status();
  if (bf16) {
    std::vector<uint16_t> converted(w.size());
    for (size_t i = 0; i < w.size(); ++i) converted[i] = ToBf16(w[i]);
    CopyFromHost(converted.data(), bytes, data->data());
  } else {
    CopyFromHost(w.data(), bytes, data->data());
  }
  if (!status_.ok()) return status_;
  return std::unique_ptr<LinearWeight>(new CudaLinearWeight(n, k, *std::move(data), bf16));
}

// y^T [n, m] (column-major) = W [n, k] x^T: cuBLAS sees W row-major as W^T column-major (op T)
// and x row-major [m, k] as x^T column-major [k, m] (op N); y row-major [m, n] is y^T
// column-major with ld n.
void CudaBackend::Linear(const float* x, int64_t m, const LinearWeight& w, float* y,
                         bool accumulate) {
  if (m <= 0) return;
  const auto& cw = static_cast<const CudaLinearWeight&>(w);  // from this backend's PrepareLinear
  const int n = static_cast<int>(w.out_features());
  const int k = static_cast<int>(w.in_features());
  const float alpha = 1.0f;
  const float beta = accumulate ? 1.0f : 0.0f;
  if (!cw.bf16()) {
    Record(CublasStatus(
        impl_->blas.sgemm(impl_->cublas, CUBLAS_OP_T, CUBLAS_OP_N, n, static_cast<int>(m), k,
                          &alpha, static_cast<const float*>(cw.data()), k, x, k, &beta, y, n),
        "cublasSgemm"));
    return;
  }
  void* xb = Scratch(bf16_x_, m * k * 2);
  if (xb == nullptr) return;
  LaunchF32ToBf16(x, m * k, xb, impl_->stream);
  CheckLaunch("F32ToBf16");
  Record(CublasStatus(
      impl_->blas.gemm_ex(impl_->cublas, CUBLAS_OP_T, CUBLAS_OP_N, n, static_cast<int>(m), k,
                          &alpha, cw.data(), CUDA_R_16BF, k, xb, CUDA_R_16BF, k, &beta, y,
                          CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      "cublasGemmEx(bf16)"));
}

void CudaBackend::LayerNorm(const float* x, int64_t rows, int64_t n, const float* gamma,
                            const float* beta, float eps, float* y) {
  LaunchLayerNorm(x, rows, n, gamma, beta, eps, y, impl_->stream);
  CheckLaunch("LayerNorm");
}

void CudaBackend::Embed(const float* table, int64_t d, absl::Span<const int32_t> tokens,
                        absl::Span<const int64_t> positions, bool sinusoidal, float* x) {
  const int64_t m = static_cast<int64_t>(tokens.size());
  if (m == 0) return;
  ReserveUploads(m * static_cast<int64_t>(sizeof(int32_t) + sizeof(int64_t)));
  const auto* tokens_dev =
      static_cast<const int32_t*>(Upload(tokens.data(), m * static_cast<int64_t>(sizeof(int32_t))));
  const int64_t* positions_dev = sinusoidal ? UploadPositions(positions) : nullptr;
  if (tokens_dev == nullptr || (sinusoidal && positions_dev == nullptr)) return;
  LaunchEmbed(table, d, tokens_dev, positions_dev, m, sinusoidal, x, impl_->stream);
  CheckLaunch("Embed");
}

void CudaBackend::SplitQkvRope(const float* qkv, int64_t heads, int64_t head_dim,
                               absl::Span<const int64_t> positions, bool rope, float* q, float* k,
                               float* v) {
  const int64_t m = static_cast<int64_t>(positions.size());
  if (m == 0) return;
  const int64_t* positions_dev = rope ? UploadPositions(positions) : nullptr;
  if (rope && positions_dev == nullptr) return;
  LaunchSplitQkvRope(qkv, m, heads, head_dim, positions_dev, rope, q, k, v, impl_->stream);
  CheckLaunch("SplitQkvRope");
}

void CudaBackend::Rope(const float* x, int64_t heads, int64_t head_dim,
                       absl::Span<const int64_t> positions, float* y) {
  const int64_t m = static_cast<int64_t>(positions.size());
  if (m == 0) return;
  const int64_t* positions_dev = UploadPositions(positions);
  if (positions_dev == nullptr) return;
  LaunchRope(x, m, heads, head_dim, positions_dev, y, impl_->stream);
  CheckLaunch("Rope");
}

void CudaBackend::GeluGate(const float* up, int64_t m, int64_t f, float* out) {
  LaunchGeluGate(up, m, f, out, impl_->stream);
  CheckLaunch("GeluGate");
}

void CudaBackend::Gelu(float* x, int64_t n) {
  LaunchGelu(x, n, impl_->stream);
  CheckLaunch("Gelu");
}

void CudaBackend::Multiply(const float* a, const float* b, int64_t n, float* out) {
  LaunchMultiply(a, b, n, out, impl_->stream);
  CheckLaunch("Multiply");
}

void CudaBackend::SketchCombine(const float* f1, const float* f2, int64_t rows, int64_t r,
                                float* psi) {
  LaunchSketchCombine(f1, f2, rows * r, r, psi, impl_->stream);
  CheckLaunch("SketchCombine");
}

void CudaBackend::AddBias(float* y, int64_t m, int64_t n, const float* bias) {
  LaunchAddBias(y, m, n, bias, impl_->stream);
  CheckLaunch("AddBias");
}

void CudaBackend::SketchDecode(const SketchAttentionShape& shape,
                               absl::Span<const int64_t> positions,
                               absl::Span<const SketchSlotState> slots, const float* psi_q,
                               const float* psi_k, const float* v, const float* q_local,
                               const float* k_local, float* out) {
  const int64_t B = static_cast<int64_t>(positions.size());
  if (B == 0) return;
  const int64_t H = shape.heads, cols = shape.head_dim + 1;
  const int64_t P = PackedSymmetricRows(shape.sketch_size);
  // Enough blocks to fill the GPU twice over at batch 1 (a head's P rows split across blocks),
  // each split at least 32 rows so that its partial stays small against the rows it streams.
  const int64_t min_splits = (P + kMaxDecodeRowsPerBlock - 1) / kMaxDecodeRowsPerBlock;
  const int64_t want = (2 * int64_t{num_sms_} + B * H - 1) / (B * H);
  const int64_t splits = std::max(min_splits, std::min(want, std::max<int64_t>(1, P / 32)));
  std::vector<SketchSlotPtrs> ptrs(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i) {
    ptrs[i] = {slots[i].sketch, slots[i].local_sketch, slots[i].local_keys, slots[i].local_values,
               slots[i].local_pending};
  }
  ReserveUploads(B * static_cast<int64_t>(sizeof(SketchSlotPtrs) + sizeof(int64_t)));
  const auto* slots_dev = static_cast<const SketchSlotPtrs*>(
      Upload(ptrs.data(), B * static_cast<int64_t>(sizeof(SketchSlotPtrs))));
  const int64_t* positions_dev = UploadPositions(positions);
  auto* partial = static_cast<float*>(
      Scratch(partials_, B * H * splits * cols * static_cast<int64_t>(sizeof(float))));
  if (slots_dev == nullptr || positions_dev == nullptr || partial == nullptr) return;
  LaunchSketchDecode(DimsOf(shape), B, positions_dev, slots_dev, psi_q, psi_k, v, q_local, k_local,
                     out, splits, partial, impl_->stream);
  CheckLaunch("SketchDecode");
}

void CudaBackend::SketchPrefill(const SketchAttentionShape& shape, int64_t start, int64_t n,
                                const SketchSlotState& slot, const float* psi_q, const float* psi_k,
                                const float* v, const float* q_local, const float* k_local,
                                float* out) {
  if (n <= 0) return;
  const SketchSlotPtrs ptrs{slot.sketch, slot.local_sketch, slot.local_keys, slot.local_values,
                            slot.local_pending};
  LaunchSketchPrefill(DimsOf(shape), start, n, ptrs, psi_q, psi_k, v, q_local, k_local, out,
                      impl_->stream);
  CheckLaunch("SketchPrefill");
}

void CudaBackend::KvDecode(const KvAttentionShape& shape, absl::Span<const int64_t> positions,
                           absl::Span<const KvSlotState> slots, const float* q, const float* k,
                           const float* v, float* out) {
  const int64_t B = static_cast<int64_t>(positions.size());
  if (B == 0) return;
  if (absl::Status refused = CheckShape(shape); !refused.ok()) {
    // Model::Create refuses such a model (CheckShape); a direct caller learns it here.
    Record(absl::UnimplementedError(absl::StrCat("cuda KvDecode: ", refused.message())),
           /*sticky=*/false);
    return;
  }
  // The rows kept before the step and attended after it follow from the positions alone (the
  // cache is exactly what the previous position keeps), so no count is read back from the device.
  std::vector<int64_t> rows(static_cast<size_t>(2 * B));
  int64_t max_rows = 1;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t t = positions[i];
    rows[i] = shape.ring ? std::min(t, shape.capacity) : shape.mask.KeptAfter(t);
    rows[B + i] = DecodeAttendedRows(shape.mask, shape.ring, shape.capacity, t);
    max_rows = std::max(max_rows, rows[B + i]);
  }
  const int64_t H = shape.heads, h = shape.head_dim;
  // Flash-decoding: split long caches so that batch 1 still fills the GPU (4 blocks per SM),
  // each split at least 128 keys.
  const int64_t want = (4 * int64_t{num_sms_} + B * H - 1) / (B * H);
  const int64_t splits = std::clamp<int64_t>(want, 1, (max_rows + 127) / 128);
  const int64_t per_split = (max_rows + splits - 1) / splits;
  std::vector<KvSlotPtrs> ptrs(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i) {
    ptrs[i] = {slots[i].keys, slots[i].values, slots[i].positions, slots[i].count};
  }
  ReserveUploads(B * static_cast<int64_t>(sizeof(KvSlotPtrs) + 3 * sizeof(int64_t)));
  const auto* slots_dev = static_cast<const KvSlotPtrs*>(
      Upload(ptrs.data(), B * static_cast<int64_t>(sizeof(KvSlotPtrs))));
  const auto* rows_dev = static_cast<const int64_t*>(
      Upload(rows.data(), 2 * B * static_cast<int64_t>(sizeof(int64_t))));
  const int64_t* positions_dev = UploadPositions(positions);
  auto* partial = static_cast<float*>(
      Scratch(partials_, B * H * splits * (h + 2) * static_cast<int64_t>(sizeof(float))));
  if (slots_dev == nullptr || rows_dev == nullptr || positions_dev == nullptr ||
      partial == nullptr) {
    return;
  }
  LaunchKvDecode(DimsOf(shape), B, positions_dev, slots_dev, rows_dev, rows_dev + B, q, k, v, out,
                 splits, per_split, partial, impl_->stream);
  CheckLaunch("KvDecode");
}

void CudaBackend::KvPrefill(const KvAttentionShape& shape, int64_t start, int64_t n,
                            const KvSlotState& slot, const float* q, const float* k, const float* v,
                            float* out) {
  if (n <= 0) return;
  if (absl::Status refused = CheckShape(shape); !refused.ok()) {
    Record(absl::UnimplementedError(absl::StrCat("cuda KvPrefill: ", refused.message())),
           /*sticky=*/false);
    return;
  }
  const int64_t old_rows =
      shape.ring ? std::min(start, shape.capacity) : shape.mask.KeptAfter(start);
  const int64_t kept_after_drop = CountKept(shape.mask, start + n - 1, start);
  const KvSlotPtrs ptrs{slot.keys, slot.values, slot.positions, slot.count};
  LaunchKvPrefill(DimsOf(shape), start, n, ptrs, old_rows, kept_after_drop, q, k, v, out,
                  impl_->stream);
  CheckLaunch("KvPrefill");
}

}  // namespace ps::kernels::cuda
