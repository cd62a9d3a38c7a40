// FaultyBackend: a kernels::Backend that forwards every op to another backend and fails on demand,
// as a GPU backend can (kernels/backend.h, "failures"): a failed op does not run (its output is
// left as it was) and the failure is reported by TakeStatus. A sticky failure also skips every
// later op and stays reported (failed() true), like a poisoned CUDA context. For tests of how
// the model, the scheduler and the server report backend failures. Header-only.
//
// Thread-safety: InjectFailure and the counters may be called from any thread while the engine
// thread runs ops.
#ifndef POLYSKETCH_TESTS_TESTING_FAULTY_BACKEND_H_
#define POLYSKETCH_TESTS_TESTING_FAULTY_BACKEND_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/str_cat.h>

#include "kernels/backend.h"

namespace ps::test {

class FaultyBackend final : public kernels::Backend {
 public:
  // Forwards to `inner` (which must outlive this); name() is `name`, or inner's when empty.
  explicit FaultyBackend(kernels::Backend& inner, std::string name = "")
      : inner_(inner), name_(name.empty() ? std::string(inner.name()) : std::move(name)) {}

  // The compute or copy op `after_ops` ops from now (0: the next one) fails with `status`;
  // `sticky` makes the failure permanent.
  void InjectFailure(absl::Status status, bool sticky, int64_t after_ops = 0) {
    std::lock_guard<std::mutex> lock(mu_);
    armed_ = true;
    inject_ = std::move(status);
    inject_sticky_ = sticky;
    countdown_ = after_ops;
  }
  // Ops that ran on the inner backend.
  int64_t ops_run() const {
    std::lock_guard<std::mutex> lock(mu_);
    return ops_run_;
  }
  // A shape CheckShape refuses from now on (Unimplemented naming it): KV layers with head_dim
  // above `max_kv_head_dim`.
  void LimitKvHeadDim(int64_t max_kv_head_dim) { max_kv_head_dim_ = max_kv_head_dim; }
  // From now on only fp32 weights (Backend's default CheckWeightDtype), as the CUDA backend.
  void RefuseLowPrecisionWeights() { fp32_weights_only_ = true; }

  absl::string_view name() const override { return name_; }
  bool host_memory() const override { return inner_.host_memory(); }

  absl::Status TakeStatus() override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!sticky_.ok()) return sticky_;
    return std::exchange(pending_, absl::OkStatus());
  }
  bool failed() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return !sticky_.ok();
  }
  absl::Status CheckShape(const kernels::SketchAttentionShape& shape) const override {
    return inner_.CheckShape(shape);
  }
  absl::Status CheckShape(const kernels::KvAttentionShape& shape) const override {
    if (shape.head_dim > max_kv_head_dim_) {
      return absl::UnimplementedError(absl::StrCat("KV attention supports head_dim up to ",
                                                   max_kv_head_dim_, ", got ", shape.head_dim));
    }
    return inner_.CheckShape(shape);
  }

  absl::StatusOr<kernels::DeviceBuffer> Allocate(int64_t bytes) override {
    // Memory of the inner backend, kept in owned_ and handed out as this backend's.
    absl::StatusOr<kernels::DeviceBuffer> buffer = inner_.Allocate(bytes);
    if (!buffer.ok()) return buffer.status();
    void* data = buffer->data();
    const int64_t size = buffer->bytes();
    if (data == nullptr) return kernels::DeviceBuffer();
    std::lock_guard<std::mutex> lock(mu_);
    owned_.emplace(data, *std::move(buffer));
    return kernels::DeviceBuffer(this, data, size);
  }
  void CopyFromHost(const void* host, int64_t bytes, void* device) override {
    if (Run()) inner_.CopyFromHost(host, bytes, device);
  }
  void CopyToHost(const void* device, int64_t bytes, void* host) override {
    if (Run()) inner_.CopyToHost(device, bytes, host);
  }
  void Zero(void* device, int64_t bytes) override {
    if (Run()) inner_.Zero(device, bytes);
  }
  void Copy(const void* src, int64_t bytes, void* dst) override {
    if (Run()) inner_.Copy(src, bytes, dst);
  }
  absl::Status CheckWeightDtype(kernels::WeightDtype dtype) const override {
    return fp32_weights_only_ ? Backend::CheckWeightDtype(dtype) : inner_.CheckWeightDtype(dtype);
  }
  absl::StatusOr<std::unique_ptr<kernels::LinearWeight>> PrepareLinear(
      absl::Span<const float> w, int64_t n, int64_t k, kernels::WeightDtype dtype) override {
    if (absl::Status status = CheckWeightDtype(dtype); !status.ok()) return status;
    return inner_.PrepareLinear(w, n, k, dtype);
  }
  void Linear(const float* x, int64_t m, const kernels::LinearWeight& w, float* y,
              bool accumulate) override {
    if (Run()) inner_.Linear(x, m, w, y, accumulate);
  }
  void LayerNorm(const float* x, int64_t rows, int64_t n, const float* gamma, const float* beta,
                 float eps, float* y) override {
    if (Run()) inner_.LayerNorm(x, rows, n, gamma, beta, eps, y);
  }
  void Embed(const float* table, int64_t d, absl::Span<const int32_t> tokens,
             absl::Span<const int64_t> positions, bool sinusoidal, float* x) override {
    if (Run()) inner_.Embed(table, d, tokens, positions, sinusoidal, x);
  }
  void SplitQkvRope(const float* qkv, int64_t heads, int64_t head_dim,
                    absl::Span<const int64_t> positions, bool rope, float* q, float* k,
                    float* v) override {
    if (Run()) inner_.SplitQkvRope(qkv, heads, head_dim, positions, rope, q, k, v);
  }
  void Rope(const float* x, int64_t heads, int64_t head_dim, absl::Span<const int64_t> positions,
            float* y) override {
    if (Run()) inner_.Rope(x, heads, head_dim, positions, y);
  }
  void GeluGate(const float* up, int64_t m, int64_t f, float* out) override {
    if (Run()) inner_.GeluGate(up, m, f, out);
  }
  void Gelu(float* x, int64_t n) override {
    if (Run()) inner_.Gelu(x, n);
  }
  void Multiply(const float* a, const float* b, int64_t n, float* out) override {
    if (Run()) inner_.Multiply(a, b, n, out);
  }
  void SketchCombine(const float* f1, const float* f2, int64_t rows, int64_t r,
                     float* psi) override {
    if (Run()) inner_.SketchCombine(f1, f2, rows, r, psi);
  }
  void AddBias(float* y, int64_t m, int64_t n, const float* bias) override {
    if (Run()) inner_.AddBias(y, m, n, bias);
  }
  void SketchDecode(const kernels::SketchAttentionShape& shape, absl::Span<const int64_t> positions,
                    absl::Span<const kernels::SketchSlotState> slots, const float* psi_q,
                    const float* psi_k, const float* v, const float* q_local, const float* k_local,
                    float* out) override {
    if (Run()) inner_.SketchDecode(shape, positions, slots, psi_q, psi_k, v, q_local, k_local, out);
  }
  void SketchPrefill(const kernels::SketchAttentionShape& shape, int64_t start, int64_t n,
                     const kernels::SketchSlotState& slot, const float* psi_q, const float* psi_k,
                     const float* v, const float* q_local, const float* k_local,
                     float* out) override {
    if (Run()) inner_.SketchPrefill(shape, start, n, slot, psi_q, psi_k, v, q_local, k_local, out);
  }
  void KvDecode(const kernels::KvAttentionShape& shape, absl::Span<const int64_t> positions,
                absl::Span<const kernels::KvSlotState> slots, const float* q, const float* k,
                const float* v, float* out) override {
    if (Run()) inner_.KvDecode(shape, positions, slots, q, k, v, out);
  }
  void KvPrefill(const kernels::KvAttentionShape& shape, int64_t start, int64_t n,
                 const kernels::KvSlotState& slot, const float* q, const float* k, const float* v,
                 float* out) override {
    if (Run()) inner_.KvPrefill(shape, start, n, slot, q, k, v, out);
  }

 protected:
  void Free(void* data, int64_t /*bytes*/) override {
    kernels::DeviceBuffer owned;  // freed by the inner backend once out of the lock
    std::lock_guard<std::mutex> lock(mu_);
    if (auto it = owned_.find(data); it != owned_.end()) {
      owned = std::move(it->second);
      owned_.erase(it);
    }
  }

 private:
  // Whether the next op runs; records the injected failure when it is this op's turn.
  bool Run() {
    std::lock_guard<std::mutex> lock(mu_);
    if (!sticky_.ok()) return false;
    if (armed_ && countdown_-- == 0) {
      armed_ = false;
      if (inject_sticky_) {
        sticky_ = inject_;
      } else if (pending_.ok()) {
        pending_ = inject_;
      }
      return false;
    }
    ++ops_run_;
    return true;
  }

  kernels::Backend& inner_;
  const std::string name_;
  int64_t max_kv_head_dim_ = INT64_MAX;
  bool fp32_weights_only_ = false;
  mutable std::mutex mu_;
  bool armed_ = false;
  absl::Status inject_;
  bool inject_sticky_ = false;
  int64_t countdown_ = 0;
  absl::Status sticky_;
  absl::Status pending_;
  int64_t ops_run_ = 0;
  std::unordered_map<void*, kernels::DeviceBuffer> owned_;
};

}  // namespace ps::test

#endif  // POLYSKETCH_TESTS_TESTING_FAULTY_BACKEND_H_
