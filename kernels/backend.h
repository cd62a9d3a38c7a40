// The backend boundary: every op the model forward needs, on memory the backend owns. The model
// code (server/engine/model/model.cc) only orchestrates: it allocates buffers here, passes their
// pointers to these ops and copies results back; it never reads backend memory directly. The CPU
// backend (kernels/cpu/) implements it on host memory; a CUDA backend implements the same ops on
// device memory without touching the model code.
//
// Conventions for every op:
//   * "Backend pointers" (float*, and the pointers inside SketchSlotState / KvSlotState) point
//     into memory from Allocate (or from a pool the backend allows, e.g. the engine's state pool
//     for the CPU backend). Host spans (absl::Span) are ordinary host memory, read during the
//     call only.
//   * Activations are row-major fp32: [rows, cols] with cols contiguous. Per-head tensors are
//     [tokens, H, h] == [tokens * H, h].
//   * Ops are synchronous from the caller's point of view: a later op (or a copy to host) sees
//     an earlier op's results. Outputs never alias inputs unless an op says so.
//   * Sizes are the caller's invariants (checked with assert in debug builds). Allocation and
//     PrepareLinear return their errors; the other ops return nothing, because a device runs
//     them asynchronously and learns of a failure later. A backend records such a failure and
//     reports it through TakeStatus, which the model reads once per forward pass (and after each
//     state copy), so a failed op ends the requests it served instead of streaming garbage.
//   * A shape a backend cannot run is refused at load (CheckShape, called by Model::Create), not
//     met later by an op.
//
// Thread-compatibility: a Backend is used by one thread at a time (the engine thread); the CPU
// backend parallelises each op internally over its own thread pool.
//
// Shape letters (algorithm.md): D width, H heads, h head width, r sketch size, P = r(r+1)/2,
// b block size, F FFN width, V vocab, m rows (tokens) of a call.
#ifndef POLYSKETCH_KERNELS_BACKEND_H_
#define POLYSKETCH_KERNELS_BACKEND_H_

#include <cstddef>
#include <cstdint>
#include <memory>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/string_view.h>
#include <absl/types/span.h>

#include "kernels/attention_mask.h"

namespace ps::kernels {

class Backend;

// Memory owned by a backend. Move-only; frees on destruction. data() is aligned to 64 bytes.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Backend* backend, void* data, int64_t bytes)
      : backend_(backend), data_(data), bytes_(bytes) {}
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { Reset(); }

  void* data() const { return data_; }
  float* f32() const { return static_cast<float*>(data_); }
  int64_t bytes() const { return bytes_; }
  void Reset();

 private:
  Backend* backend_ = nullptr;
  void* data_ = nullptr;
  int64_t bytes_ = 0;
};

// The precision a linear layer's weight is kept in (issue 19; docs/model-format.md,
// "weights_dtype"). Weight-only: activations, states and accumulation stay fp32 in every format.
//   kFp32  as loaded (the 1e-4 parity contract of the golden fixtures holds);
//   kBf16  each weight rounded to the nearest bfloat16 (8 significant bits: relative error
//          <= 2^-8 per weight); half the bytes;
//   kInt8  per output channel j symmetric: w[j, i] ~ scale[j] * q[j, i], q in [-127, 127],
//          scale[j] = max_i |w[j, i]| / 127 (absolute error <= scale[j] / 2); a quarter of the
//          bytes.
enum class WeightDtype { kFp32, kBf16, kInt8 };

// "fp32", "bf16", "int8": the spelling of --weights_dtype.
absl::string_view WeightDtypeName(WeightDtype dtype);

// A linear layer's weight W [n, k] (PyTorch's [out, in]) in the backend's preferred layout and
// in the precision PrepareLinear was asked for (the CUDA backend's own fp32 choice keeps bf16
// GEMM operands: kernels/cuda/cuda_backend.h). Created by Backend::PrepareLinear; immutable
// afterwards.
class LinearWeight {
 public:
  virtual ~LinearWeight() = default;
  int64_t out_features() const { return n_; }  // n
  int64_t in_features() const { return k_; }   // k
  WeightDtype dtype() const { return dtype_; }

 protected:
  LinearWeight(int64_t n, int64_t k, WeightDtype dtype = WeightDtype::kFp32)
      : n_(n), k_(k), dtype_(dtype) {}

 private:
  int64_t n_ = 0;
  int64_t k_ = 0;
  WeightDtype dtype_ = WeightDtype::kFp32;
};

// The shape of one polysketch layer's attention (algorithm.md sections 3 and 4).
struct SketchAttentionShape {
  int64_t heads = 0;        // H
  int64_t head_dim = 0;     // h
  int64_t sketch_size = 0;  // r
  bool local_exact = false;
  // b. With local_exact: the trained block (blocks aligned to absolute position 0). Without:
  // only the tile size of the prefill block algorithm (the result does not depend on it).
  int64_t block_size = 0;
};

// One sequence's polysketch state for one layer (backend pointers into its state slot; the
// engine's StateLayout documents the shapes). An all-zero state is the empty one.
struct SketchSlotState {
  float* sketch = nullptr;        // [H, P, h+1]: S (plain) or S_prev (local_exact)
  float* local_sketch = nullptr;  // [H, b, r]: psi(k) of the current block; local_exact only
  float* local_keys = nullptr;    // [H, b, h]: k~ of the current block; local_exact only
  float* local_values = nullptr;  // [H, b, h]: v of the current block; local_exact only
  // local_exact only: rows of the previous block not yet folded into S_prev, 0..b. They are the
  // last `*local_pending` rows of the buffer, [b - pending, b), which the current block has not
  // reached yet; a query reads them exactly ((psi_q . psi_k)^2 [v; 1]) until they are folded
  // (algorithm.md section 4: the fold is spread over the first steps of a block).
  int64_t* local_pending = nullptr;
};

// The weighting of a KV-cache layer (algorithm.md section 2).
enum class KvWeighting {
  kSoftmax,     // exp(q.k / sqrt(h)), normalised by the sum
  kPolynomial,  // (q.k)^4 on qk-normalised q and k (the caller normalises), sum w v / (1 + sum w)
};

// How a KV cache stores its keys and values. Scores, softmax and sums are fp32 either way.
enum class KvCacheDtype {
  kFp32,  // float: the reference numerics (the 1e-4 golden parity)
  kFp16,  // IEEE binary16, rounded to nearest even on write: half the bytes a decode step reads
};

// The shape of one KV-cache layer.
struct KvAttentionShape {
  int64_t heads = 0;     // H
  int64_t head_dim = 0;  // h
  KvWeighting weighting = KvWeighting::kSoftmax;
  KeyMask mask;
  // true (sliding_window): the cache is a ring of `capacity` == mask.window rows; the key of
  // position t lives in row t % window. false: the cache is a list of the kept keys in position
  // order (mask.Kept: every key under kCausal and kStrided, so there row r holds position r), at
  // most `capacity` of them (mask.MaxKept of the engine's context limit).
  bool ring = false;
  int64_t capacity = 0;
  // kFp16: every key and value is rounded to binary16 when it enters the cache, and attention
  // (decode, and prefill over both the cached rows and the chunk's own tokens) reads only those
  // rounded values, so prefill and decode still agree. A backend that cannot keep fp16 caches
  // refuses the shape in CheckShape.
  KvCacheDtype cache_dtype = KvCacheDtype::kFp32;
};

// One sequence's KV cache for one layer (backend pointers into its slot).
struct KvSlotState {
  float* keys = nullptr;           // [capacity, H, h]; fp32 caches, else null
  float* values = nullptr;         // [capacity, H, h]; fp32 caches, else null
  int64_t* positions = nullptr;    // [capacity]: position of each kept row; list caches only
  int64_t* count = nullptr;        // list: rows kept; ring: tokens written so far (all time)
  uint16_t* keys_f16 = nullptr;    // [capacity, H, h] binary16 bits; fp16 caches, else null
  uint16_t* values_f16 = nullptr;  // [capacity, H, h] binary16 bits; fp16 caches, else null
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual absl::string_view name() const = 0;  // "cpu", "cuda"
  // True when backend memory is ordinary host memory that other host allocators may provide
  // too (the CPU backend): the engine then keeps its state pool in plain host memory. False
  // (device backends): the engine asks Allocate for the pool and never dereferences it.
  virtual bool host_memory() const { return false; }

  // --- failures (see "Conventions" above) ----------------------------------------------------
  // The first failure of an op since the previous call, or OK when every op since then ran. Not
  // OK: the outputs and the state slots those ops wrote hold unspecified values, and the caller
  // must not use them (Internal with the CUDA / cuBLAS error, ResourceExhausted when scratch
  // memory could not grow, ...). A call forgets a failure, unless the failure is sticky: the
  // backend can compute nothing trustworthy any more (a CUDA error that poisons the context,
  // device memory of unknown contents); then failed() is true and every later call returns the
  // same status again.
  virtual absl::Status TakeStatus() { return absl::OkStatus(); }
  // True once a sticky failure happened (TakeStatus).
  virtual bool failed() const { return false; }

  // --- what the backend can run ------------------------------------------------------------
  // OK when attention of this shape runs on this backend; otherwise Unimplemented naming the
  // limit and the value (e.g. the CUDA KV kernels' head_dim limit of 256). Model::Create checks
  // every layer, so a model a backend cannot run is refused at load.
  virtual absl::Status CheckShape(const SketchAttentionShape& /*shape*/) const {
    return absl::OkStatus();
  }
  virtual absl::Status CheckShape(const KvAttentionShape& /*shape*/) const {
    return absl::OkStatus();
  }

  // --- memory ------------------------------------------------------------------------------
  // `bytes` of zeroed backend memory. ResourceExhausted when it cannot be had.
  virtual absl::StatusOr<DeviceBuffer> Allocate(int64_t bytes) = 0;
  virtual void CopyFromHost(const void* host, int64_t bytes, void* device) = 0;
  virtual void CopyToHost(const void* device, int64_t bytes, void* host) = 0;
  virtual void Zero(void* device, int64_t bytes) = 0;
  // Device-to-device copy; the ranges must not overlap.
  virtual void Copy(const void* src, int64_t bytes, void* dst) = 0;
  // OK when this backend keeps linear weights in `dtype`; otherwise Unimplemented naming the
  // backend and the dtype. Checked at load (Model::Create) before any weight is converted.
  virtual absl::Status CheckWeightDtype(WeightDtype dtype) const {
    return dtype == WeightDtype::kFp32
               ? absl::OkStatus()
               : absl::UnimplementedError(absl::StrCat("the ", name(), " backend has no ",
                                                       WeightDtypeName(dtype), " weights"));
  }
  // Converts W [n, k] fp32 row-major (host) into the backend's layout, in `dtype` (converted
  // once, here). InvalidArgument when w is not n * k floats, or (kInt8) holds a non-finite value;
  // Unimplemented when CheckWeightDtype refuses `dtype`; ResourceExhausted without memory.
  virtual absl::StatusOr<std::unique_ptr<LinearWeight>> PrepareLinear(absl::Span<const float> w,
                                                                      int64_t n, int64_t k,
                                                                      WeightDtype dtype) = 0;

  // --- dense ops -----------------------------------------------------------------------------
  // y[m, n] = x[m, k] W^T, or y += x W^T when `accumulate` (the residual adds).
  virtual void Linear(const float* x, int64_t m, const LinearWeight& w, float* y,
                      bool accumulate) = 0;
  // Row-wise LayerNorm (biased variance, as PyTorch): x, y [rows, n]; gamma, beta [n]. y may
  // alias x.
  virtual void LayerNorm(const float* x, int64_t rows, int64_t n, const float* gamma,
                         const float* beta, float eps, float* y) = 0;
  // x[i, :] = table[tokens[i], :] + pe(positions[i]) (sinusoidal, algorithm.md section 1, angles
  // in double); without `sinusoidal`, x[i, :] = table[tokens[i], :] (positions unread). table
  // [V, D]; x [m, D] with m = tokens.size() == positions.size().
  virtual void Embed(const float* table, int64_t d, absl::Span<const int32_t> tokens,
                     absl::Span<const int64_t> positions, bool sinusoidal, float* x) = 0;
  // Splits qkv [m, 3D] = [q | k | v] into q, k, v [m, H, h]. With `rope`, applies RoPE
  // (algorithm.md section 1: interleaved pairs written de-interleaved, angles in double) to q and
  // k at positions[i]; without, q and k are copied in the projection's order (positions unread).
  // m = positions.size().
  virtual void SplitQkvRope(const float* qkv, int64_t heads, int64_t head_dim,
                            absl::Span<const int64_t> positions, bool rope, float* q, float* k,
                            float* v) = 0;
  // y = RoPE(x) at positions[i] for every head of row i, as SplitQkvRope's rotation: x, y
  // [m, H, h] with m = positions.size(). For the local block of "local_rope" models, whose q and
  // k stay unrotated for everything else. y must not alias x.
  virtual void Rope(const float* x, int64_t heads, int64_t head_dim,
                    absl::Span<const int64_t> positions, float* y) = 0;
  // out[i, j] = up[i, j] * gelu_tanh(up[i, F + j]); up [m, 2F], out [m, F].
  virtual void GeluGate(const float* up, int64_t m, int64_t f, float* out) = 0;
  // x = gelu_tanh(x) in place, n elements.
  virtual void Gelu(float* x, int64_t n) = 0;
  // out = a * b elementwise, n elements; out may alias a or b.
  virtual void Multiply(const float* a, const float* b, int64_t n, float* out) = 0;
  // Learned sketch output (algorithm.md section 2): psi = sqrt(r) tanh(f1 * f2 / sqrt(r))
  // elementwise; f1, f2, psi [rows, r]; psi may alias f1 or f2.
  virtual void SketchCombine(const float* f1, const float* f2, int64_t rows, int64_t r,
                             float* psi) = 0;
  // y[i, :] += bias for every row; y [m, n], bias [n].
  virtual void AddBias(float* y, int64_t m, int64_t n, const float* bias) = 0;

  // --- polysketch attention -----------------------------------------------------------------
  // One decode step for `positions.size()` sequences (algorithm.md section 4): sequence i feeds
  // the token at positions[i] into slots[i] (update first, then read out). With local_exact the
  // completed block's b buffered (psi(k), v) rows go into S when positions[i] % b == 0 and > 0,
  // S += phi(psi(K_blk))^T [V_blk | 1]: a backend may fold them all in that step, or fold some
  // and leave the rest in *local_pending (the buffer's last rows, read out exactly until folded)
  // for the following steps to fold, as long as every pending row is folded before the step that
  // writes over it. The buffer holds positions[i] % b entries of the current block before this
  // token's, and the step writes (psi(k), k~, v) to row positions[i] % b. psi_q, psi_k [B, H, r];
  // v, out [B, H, h]; q_local, k_local [B, H, h] (local_exact only, else null): q~ and k~.
  virtual void SketchDecode(const SketchAttentionShape& shape, absl::Span<const int64_t> positions,
                            absl::Span<const SketchSlotState> slots, const float* psi_q,
                            const float* psi_k, const float* v, const float* q_local,
                            const float* k_local, float* out) = 0;
  // Prefill of n consecutive tokens of one sequence, positions start .. start+n-1, whose state
  // holds positions [0, start) (start need not be block-aligned): the block algorithm of
  // algorithm.md section 3. Outputs and the final state equal n SketchDecode steps up to
  // rounding, and up to which rows are still pending: a prefill folds any pending rows first and
  // leaves none. Same buffers as SketchDecode with n rows.
  virtual void SketchPrefill(const SketchAttentionShape& shape, int64_t start, int64_t n,
                             const SketchSlotState& slot, const float* psi_q, const float* psi_k,
                             const float* v, const float* q_local, const float* k_local,
                             float* out) = 0;

  // --- KV-cache attention (softmax, polynomial, sliding window, sparse baselines) -----------
  // One decode step for B sequences: sequence i appends its key/value at positions[i] to its
  // cache (dropping rows that neither that position nor a later one sees: mask.Kept), then
  // attends over the kept rows that position sees (mask.Visible).
  // q, k, v, out [B, H, h] (k post-RoPE, or unrotated for "local_rope" models; for kPolynomial
  // q and k already qk-normalised).
  virtual void KvDecode(const KvAttentionShape& shape, absl::Span<const int64_t> positions,
                        absl::Span<const KvSlotState> slots, const float* q, const float* k,
                        const float* v, float* out) = 0;
  // Prefill of n consecutive tokens of one sequence from position `start` (its cache holds what
  // it keeps after position start-1). Outputs and the final cache equal n KvDecode steps.
  virtual void KvPrefill(const KvAttentionShape& shape, int64_t start, int64_t n,
                         const KvSlotState& slot, const float* q, const float* k, const float* v,
                         float* out) = 0;

 protected:
  friend class DeviceBuffer;
  virtual void Free(void* data, int64_t bytes) = 0;
};

inline absl::string_view WeightDtypeName(WeightDtype dtype) {
  switch (dtype) {
    case WeightDtype::kFp32:
      return "fp32";
    case WeightDtype::kBf16:
      return "bf16";
    case WeightDtype::kInt8:
      return "int8";
  }
  return "unknown";
}

inline DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    Reset();
    backend_ = other.backend_;
    data_ = other.data_;
    bytes_ = other.bytes_;
    other.backend_ = nullptr;
    other.data_ = nullptr;
    other.bytes_ = 0;
  }
  return *this;
}

inline void DeviceBuffer::Reset() {
  if (backend_ != nullptr && data_ != nullptr) backend_->Free(data_, bytes_);
  backend_ = nullptr;
  data_ = nullptr;
  bytes_ = 0;
}

}  // namespace ps::kernels

#endif  // POLYSKETCH_KERNELS_BACKEND_H_
