// The per-request decode state of a model (algorithm.md sections 2 and 4): which buffers every
// layer keeps for one request, their shapes, and their byte offsets inside one fixed-size state
// slot (StatePool). Constant-size state always lives in a slot. Layers whose memory grows with the
// sequence (KV caches) are reported separately; given a context limit (max_context), their caches
// are also sized for that limit and placed in the slot, so that one slot holds a whole request.
//
// Shape letters (algorithm.md): H n_heads, h = d_model / H head width, r sketch_size,
// P = r(r+1)/2 packed sketch rows, b block_size, w window, cap the kept rows of a KV cache
// (AttentionKeyMask(attn).MaxKept(max_context)).
#ifndef POLYSKETCH_SERVER_ENGINE_MODEL_STATE_LAYOUT_H_
#define POLYSKETCH_SERVER_ENGINE_MODEL_STATE_LAYOUT_H_

#include <array>
#include <cstdint>
#include <vector>

#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>

#include "kernels/backend.h"
#include "kernels/packed_index.h"
#include "server/engine/model_io/model_config.h"

namespace ps::engine {

// Every component of a slot starts at a multiple of this many bytes (one cache line; also enough
// for any SIMD load), and bytes_per_slot is a multiple of it.
inline constexpr int64_t kStateAlignment = 64;

// The packed order of symmetric sketch rows (kernels/packed_index.h), under the engine's names.
using ::ps::kernels::PackedSymmetricIndex;
using ::ps::kernels::PackedSymmetricRows;

// The buffers one layer may keep in a slot. Float components are fp32 (algorithm.md section 5:
// sums overflow fp16), row-major in the shape given, except the KV-cache rows (kRingKeys,
// kRingValues, kKvKeys, kKvValues), which are binary16 bits when the layout's kv_cache_dtype is
// kFp16 (StateLayout::IsFp16); counters are one int64_t, positions an int64_t array.
enum class StateComponent {
  // polysketch: [H, P, h+1] f32. Element (head, PackedSymmetricIndex(a, c), j) holds S[a, c, j];
  // j < h are the value sums, j == h the normaliser sum. Plain sketch: S over all tokens so far;
  // local_exact: S_prev over all completed blocks.
  kSketch,
  kLocalSketch,   // polysketch + local_exact: [H, b, r] f32, psi(k) of the current block's keys
                  // (folded into kSketch with [v; 1] over the next block's first steps)
  kLocalKeys,     // polysketch + local_exact: [H, b, h] f32, post-LayerNorm keys k~ of the block
  kLocalValues,   // polysketch + local_exact: [H, b, h] f32, values of the current block
  kLocalPending,  // polysketch + local_exact: int64_t, rows of the previous block not yet
                  // folded into kSketch (the buffer's last rows), 0..b - position % b
  kRingKeys,      // sliding_window: [H, w, h] f32, keys as attention reads them (post-RoPE unless
                  // "local_rope"); token t at ring row t % w
  kRingValues,    // sliding_window: [H, w, h] f32, values, same rows as the keys
  kRingCount,     // sliding_window: int64_t, tokens written so far (rows filled: min(count, w))
  // softmax, polynomial, sparse_strided, sparse_fixed, only with max_context > 0: the KV cache as
  // kernels/backend.h KvSlotState describes it (a list of the kept tokens in position order).
  kKvKeys,       // [cap, H, h] f32: keys of the kept rows (post-RoPE unless "local_rope";
                 // polynomial: qk-normalised)
  kKvValues,     // [cap, H, h] f32: values, same rows as the keys
  kKvPositions,  // [cap] int64_t: the position of each kept row, ascending
  kKvCount,      // int64_t: rows kept, 0..cap
};
inline constexpr int kNumStateComponents = 12;
absl::string_view StateComponentName(StateComponent component);  // "sketch", "ring_keys", ...
// True for the int64_t components (the counters kLocalPending, kRingCount, kKvCount and the
// kKvPositions array), false for the f32 buffers.
bool IsInt64(StateComponent component);
// True for the KV-cache rows (kRingKeys, kRingValues, kKvKeys, kKvValues): the buffers that
// --kv_cache_dtype stores in fp16.
bool IsKvCacheRows(StateComponent component);

// Where one component lives inside a slot. size_bytes == 0: the layer does not have it.
struct StateRegion {
  int64_t offset_bytes = 0;  // from the start of the slot; a multiple of kStateAlignment
  int64_t size_bytes = 0;    // exact size, without the padding up to the next component

  bool present() const { return size_bytes > 0; }
  friend bool operator==(const StateRegion&, const StateRegion&) = default;
};

// One layer's state: shape parameters, its regions in the slot, and its KV-cache needs.
struct LayerStateLayout {
  AttentionKind kind = AttentionKind::kSoftmax;
  int64_t num_heads = 0;                                   // H
  int64_t head_dim = 0;                                    // h
  int64_t sketch_size = 0;                                 // r (polysketch), else 0
  int64_t packed_rows = 0;                                 // P = r(r+1)/2 (polysketch), else 0
  int64_t local_size = 0;                                  // b (polysketch + local_exact), else 0
  int64_t window = 0;                                      // w (sliding_window), else 0
  std::array<StateRegion, kNumStateComponents> regions{};  // indexed by StateComponent

  // softmax, polynomial, sparse_strided and sparse_fixed keep keys and values of (some of) the
  // tokens so far: memory that grows with the sequence. kv_bytes_per_token is what one kept
  // token costs in this layer: keys and values, H x h x 2 elements of the layout's KV dtype
  // (4 bytes fp32, 2 fp16; positions not counted). Which
  // tokens a layer keeps is its kind's business (softmax, polynomial and sparse_strided: all,
  // since every key of a strided layer is seen again by a later query; sparse_fixed: the current
  // chunk and k_sum per earlier chunk). Without a context limit (max_context 0) the cache is NOT in
  // the slot (the kKv* regions are absent, kv_capacity 0) and the engine sizes a separate KV pool;
  // with one, the slot holds kv_capacity rows (kKvKeys, kKvValues, kKvPositions, kKvCount).
  // needs_kv_cache and kv_bytes_per_token describe the kind and do not depend on max_context.
  bool needs_kv_cache = false;
  int64_t kv_bytes_per_token = 0;  // 0 unless needs_kv_cache
  // cap: the most rows the slot's cache holds, AttentionKeyMask(attn).MaxKept(max_context)
  // (counting a decode step's new key before it drops the ones it hides). 0: no KV regions.
  int64_t kv_capacity = 0;

  const StateRegion& region(StateComponent component) const {
    return regions[static_cast<int>(component)];
  }
  // Bytes of all of this layer's regions in a slot (without alignment padding).
  int64_t bytes() const {
    int64_t sum = 0;
    for (const StateRegion& r : regions) sum += r.size_bytes;
    return sum;
  }
  friend bool operator==(const LayerStateLayout&, const LayerStateLayout&) = default;
};

// The layout of one request's slot for a model: layer 0's components first, each component
// starting at a multiple of kStateAlignment. Immutable plain data: copy freely; thread-compatible.
class StateLayout {
 public:
  // Computes the layout of `config`, which is validated first (its errors are returned as they
  // are). max_context > 0: the longest request (prompt plus generated tokens) the engine admits;
  // KV layers then get their cache in the slot, sized for it. 0: KV caches stay outside.
  // InvalidArgument "max_context: ..." when it is negative or too large to size a cache with;
  // InvalidArgument "layers[i]: per-request state ... overflows" when a size does not fit in
  // int64_t (only absurd configs or limits; every config integer is <= kMaxConfigInt).
  // kv_dtype: the element type of the KV-cache rows (ring and list caches; IsKvCacheRows).
  [[nodiscard]] static absl::StatusOr<StateLayout> Create(
      const ModelConfig& config, int64_t max_context = 0,
      kernels::KvCacheDtype kv_dtype = kernels::KvCacheDtype::kFp32);

  const std::vector<LayerStateLayout>& layers() const { return layers_; }
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  const LayerStateLayout& layer(int64_t index) const { return layers_[index]; }

  // Bytes of state per request: every region of every layer plus the alignment padding. 0 for a
  // model whose layers all use a KV cache when max_context is 0.
  int64_t bytes_per_slot() const { return bytes_per_slot_; }
  // True when at least one layer needs a KV cache (see LayerStateLayout::needs_kv_cache).
  bool needs_kv_cache() const { return kv_bytes_per_token_ > 0; }
  // Sum of kv_bytes_per_token over the layers: what one token kept by every KV layer costs.
  int64_t kv_bytes_per_token() const { return kv_bytes_per_token_; }
  // The context limit the layout was made for (0: none, KV caches outside the slot).
  int64_t max_context() const { return max_context_; }
  // The element type of the KV-cache rows, as asked for in Create.
  kernels::KvCacheDtype kv_cache_dtype() const { return kv_cache_dtype_; }
  // True when some layer keeps KV-cache rows in its slot (list or ring): kv_cache_dtype matters.
  bool has_kv_cache_rows() const { return has_kv_cache_rows_; }
  // True when `component` is stored as binary16: KV-cache rows of an fp16 layout.
  bool IsFp16(StateComponent component) const {
    return kv_cache_dtype_ == kernels::KvCacheDtype::kFp16 && IsKvCacheRows(component);
  }

 private:
  StateLayout() = default;

  std::vector<LayerStateLayout> layers_;
  int64_t bytes_per_slot_ = 0;
  int64_t kv_bytes_per_token_ = 0;
  int64_t max_context_ = 0;
  kernels::KvCacheDtype kv_cache_dtype_ = kernels::KvCacheDtype::kFp32;
  bool has_kv_cache_rows_ = false;
};

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_MODEL_STATE_LAYOUT_H_
