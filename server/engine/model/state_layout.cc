// StateLayout: sizes from algorithm.md section 4, laid out with checked int64_t arithmetic so
// that an absurd config gives an error instead of a wrapped size.
#include "server/engine/model/state_layout.h"

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>

#include <absl/status/status.h>
#include <absl/strings/str_cat.h>

#include "base/status_macros.h"

namespace ps::engine {
namespace {

constexpr int64_t kFloatBytes = 4;
constexpr int64_t kCounterBytes = 8;

// Product of `factors`, or nullopt when it overflows int64_t.
std::optional<int64_t> CheckedProduct(std::initializer_list<int64_t> factors) {
  int64_t product = 1;
  for (int64_t factor : factors) {
    if (__builtin_mul_overflow(product, factor, &product)) return std::nullopt;
  }
  return product;
}

// Appends components to a slot, each at the next multiple of kStateAlignment.
class SlotBuilder {
 public:
  // Reserves `size` bytes (nullopt: the size computation overflowed) for `component` of layer
  // `layer_index`, described by `layer`.
  absl::Status Add(size_t layer_index, LayerStateLayout& layer, StateComponent component,
                   std::optional<int64_t> size) {
    int64_t end = 0;
    int64_t padded = 0;
    if (!size.has_value() || __builtin_add_overflow(offset_, *size, &end) ||
        __builtin_add_overflow(end, kStateAlignment - 1, &padded)) {
      return absl::InvalidArgumentError(
          absl::StrCat("layers[", layer_index, "]: per-request state (",
                       StateComponentName(component), ") overflows int64_t bytes"));
    }
    layer.regions[static_cast<int>(component)] = StateRegion{offset_, *size};
    offset_ = padded / kStateAlignment * kStateAlignment;
    return absl::OkStatus();
  }

  int64_t offset() const { return offset_; }

 private:
  int64_t offset_ = 0;
};

}  // namespace

absl::string_view StateComponentName(StateComponent component) {
  switch (component) {
    case StateComponent::kSketch:
      return "sketch";
    case StateComponent::kLocalSketch:
      return "local_sketch";
    case StateComponent::kLocalKeys:
      return "local_keys";
    case StateComponent::kLocalValues:
      return "local_values";
    case StateComponent::kLocalPending:
      return "local_pending";
    case StateComponent::kRingKeys:
      return "ring_keys";
    case StateComponent::kRingValues:
      return "ring_values";
    case StateComponent::kRingCount:
      return "ring_count";
    case StateComponent::kKvKeys:
      return "kv_keys";
    case StateComponent::kKvValues:
      return "kv_values";
    case StateComponent::kKvPositions:
      return "kv_positions";
    case StateComponent::kKvCount:
      return "kv_count";
  }
  return "unknown";
}

bool IsKvCacheRows(StateComponent component) {
  return component == StateComponent::kRingKeys || component == StateComponent::kRingValues ||
         component == StateComponent::kKvKeys || component == StateComponent::kKvValues;
}

bool IsInt64(StateComponent component) {
  return component == StateComponent::kLocalPending || component == StateComponent::kRingCount ||
         component == StateComponent::kKvPositions || component == StateComponent::kKvCount;
}

absl::StatusOr<StateLayout> StateLayout::Create(const ModelConfig& config, int64_t max_context,
                                                kernels::KvCacheDtype kv_dtype) {
  PS_RETURN_IF_ERROR(config.Validate());
  if (max_context < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_context: must be >= 0 (0: no limit), got ", max_context));
  }
  // KeyMask::MaxKept adds up to chunk + 1 (chunk <= kMaxConfigInt) to max_context; the bound
  // leaves room for two config integers.
  if (max_context > std::numeric_limits<int64_t>::max() - 2 * kMaxConfigInt - 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_context: ", max_context, " overflows the KV-cache sizes"));
  }
  const int64_t H = config.n_heads;
  const int64_t h = config.head_dim();

  // Bytes of one KV-cache element (IsKvCacheRows).
  const int64_t kv_element_bytes = kv_dtype == kernels::KvCacheDtype::kFp16 ? 2 : kFloatBytes;
  StateLayout layout;
  layout.max_context_ = max_context;
  layout.kv_cache_dtype_ = kv_dtype;
  layout.layers_.reserve(config.layers.size());
  SlotBuilder slot;
  for (size_t i = 0; i < config.layers.size(); ++i) {
    const AttentionConfig& attn = config.layers[i];
    LayerStateLayout layer;
    layer.kind = attn.kind;
    layer.num_heads = H;
    layer.head_dim = h;
    switch (attn.kind) {
      case AttentionKind::kPolysketch: {
        const int64_t r = attn.sketch_size;
        // r <= kMaxConfigInt < 2^31, so r * (r + 1) fits in int64_t.
        layer.sketch_size = r;
        layer.packed_rows = PackedSymmetricRows(r);
        const std::optional<int64_t> sketch_bytes =
            CheckedProduct({H, layer.packed_rows, h + 1, kFloatBytes});
        PS_RETURN_IF_ERROR(slot.Add(i, layer, StateComponent::kSketch, sketch_bytes));
        if (attn.local_exact) {
          const int64_t b = attn.block_size;
          layer.local_size = b;
          const std::optional<int64_t> buffer_bytes = CheckedProduct({H, b, h, kFloatBytes});
          PS_RETURN_IF_ERROR(slot.Add(i, layer, StateComponent::kLocalSketch,
                                      CheckedProduct({H, b, r, kFloatBytes})));
          PS_RETURN_IF_ERROR(slot.Add(i, layer, StateComponent::kLocalKeys, buffer_bytes));
          PS_RETURN_IF_ERROR(slot.Add(i, layer, StateComponent::kLocalValues, buffer_bytes));
          PS_RETURN_IF_ERROR(slot.Add(i, layer, StateComponent::kLocalPending, kCounterBytes));
        }
        break;
      }
      case AttentionKind::kSlidingWindow: {
        const int64_t w = attn.window;
        layer.window = w;
        const std::optional<int64_t> ring_bytes = CheckedProduct({H, w, h, kv_element_bytes});
        layout.has_kv_cache_rows_ = true;
        PS_RETURN_IF_ERROR(slot.Add(i, layer, StateComponent::kRingKeys, ring_bytes));
        PS_RETURN_IF_ERROR(slot.Add(i, layer, StateComponent::kRingValues, ring_bytes));
        PS_RETURN_IF_ERROR(slot.Add(i, layer, StateComponent::kRingCount, kCounterBytes));
        break;
      }
      case AttentionKind::kSoftmax:
      case AttentionKind::kPolynomial:
      case AttentionKind::kSparseStrided:
      case AttentionKind::kSparseFixed:
        // H * h = d_model <= kMaxConfigInt, so one layer's bytes fit; the sum over layers is
        // checked all the same.
        layer.needs_kv_cache = true;
        if (std::optional<int64_t> bytes = CheckedProduct({H, h, 2, kv_element_bytes});
            bytes.has_value() && !__builtin_add_overflow(layout.kv_bytes_per_token_, *bytes,
                                                         &layout.kv_bytes_per_token_)) {
          layer.kv_bytes_per_token = *bytes;
        } else {
          return absl::InvalidArgumentError(
              absl::StrCat("layers[", i, "]: KV-cache bytes per token overflow int64_t"));
        }
        if (max_context > 0) {
          const int64_t cap = AttentionKeyMask(attn).MaxKept(max_context);
          layer.kv_capacity = cap;
          const std::optional<int64_t> rows_bytes = CheckedProduct({cap, H, h, kv_element_bytes});
          layout.has_kv_cache_rows_ = true;
          PS_RETURN_IF_ERROR(slot.Add(i, layer, StateComponent::kKvKeys, rows_bytes));
          PS_RETURN_IF_ERROR(slot.Add(i, layer, StateComponent::kKvValues, rows_bytes));
          PS_RETURN_IF_ERROR(slot.Add(i, layer, StateComponent::kKvPositions,
                                      CheckedProduct({cap, kCounterBytes})));
          PS_RETURN_IF_ERROR(slot.Add(i, layer, StateComponent::kKvCount, kCounterBytes));
        }
        break;
    }
    layout.layers_.push_back(layer);
  }
  layout.bytes_per_slot_ = slot.offset();
  return layout;
}

}  // namespace ps::engine
