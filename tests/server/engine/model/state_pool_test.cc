// StatePool: acquire until full, reuse, zeroing, refused releases, the budget constructor and the
// typed accessors.
#include "server/engine/model/state_pool.h"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include <absl/status/status.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "kernels/backend.h"
#include "server/engine/model/state_layout.h"
#include "server/engine/model_io/model_config.h"
#include "tests/testing/status_matchers.h"

namespace ps::engine {
namespace {

using ::ps::test::IsOk;
using ::ps::test::StatusIs;

// A stand-in for a device backend: host memory, but every allocation and zeroing is recorded, so
// the pool's use of backend memory can be checked without a GPU. Compute ops are not used.
class RecordingBackend final : public kernels::Backend {
 public:
  absl::string_view name() const override { return "recording"; }
  absl::StatusOr<kernels::DeviceBuffer> Allocate(int64_t bytes) override {
    if (bytes > int64_t{1} << 30) return absl::ResourceExhaustedError("too big");
    allocated.push_back(bytes);
    void* data = std::aligned_alloc(64, static_cast<size_t>((bytes + 63) / 64 * 64));
    std::memset(data, 0x5a, static_cast<size_t>(bytes));  // not zero: Acquire must zero
    return kernels::DeviceBuffer(this, data, bytes);
  }
  void CopyFromHost(const void* host, int64_t bytes, void* device) override {
    std::memcpy(device, host, static_cast<size_t>(bytes));
  }
  void CopyToHost(const void* device, int64_t bytes, void* host) override {
    std::memcpy(host, device, static_cast<size_t>(bytes));
  }
  void Zero(void* device, int64_t bytes) override {
    zeroed.emplace_back(device, bytes);
    std::memset(device, 0, static_cast<size_t>(bytes));
  }
  void Copy(const void* src, int64_t bytes, void* dst) override {
    std::memcpy(dst, src, static_cast<size_t>(bytes));
  }
  absl::StatusOr<std::unique_ptr<kernels::LinearWeight>> PrepareLinear(
      absl::Span<const float>, int64_t, int64_t, kernels::WeightDtype) override {
    return absl::UnimplementedError("not a compute backend");
  }
  void Linear(const float*, int64_t, const kernels::LinearWeight&, float*, bool) override {}
  void LayerNorm(const float*, int64_t, int64_t, const float*, const float*, float,
                 float*) override {}
  void Embed(const float*, int64_t, absl::Span<const int32_t>, absl::Span<const int64_t>, bool,
             float*) override {}
  void SplitQkvRope(const float*, int64_t, int64_t, absl::Span<const int64_t>, bool, float*, float*,
                    float*) override {}
  void Rope(const float*, int64_t, int64_t, absl::Span<const int64_t>, float*) override {}
  void GeluGate(const float*, int64_t, int64_t, float*) override {}
  void Gelu(float*, int64_t) override {}
  void Multiply(const float*, const float*, int64_t, float*) override {}
  void SketchCombine(const float*, const float*, int64_t, int64_t, float*) override {}
  void AddBias(float*, int64_t, int64_t, const float*) override {}
  void SketchDecode(const kernels::SketchAttentionShape&, absl::Span<const int64_t>,
                    absl::Span<const kernels::SketchSlotState>, const float*, const float*,
                    const float*, const float*, const float*, float*) override {}
  void SketchPrefill(const kernels::SketchAttentionShape&, int64_t, int64_t,
                     const kernels::SketchSlotState&, const float*, const float*, const float*,
                     const float*, const float*, float*) override {}
  void KvDecode(const kernels::KvAttentionShape&, absl::Span<const int64_t>,
                absl::Span<const kernels::KvSlotState>, const float*, const float*, const float*,
                float*) override {}
  void KvPrefill(const kernels::KvAttentionShape&, int64_t, int64_t, const kernels::KvSlotState&,
                 const float*, const float*, const float*, float*) override {}

  std::vector<int64_t> allocated;
  std::vector<std::pair<void*, int64_t>> zeroed;

 protected:
  void Free(void* data, int64_t) override { std::free(data); }
};

// D 16, H 2, h 8: layer 0 polysketch r 3 + local_exact b 5 (1280 bytes), layer 1 sliding window
// w 3 (448 bytes), layer 2 softmax (KV cache, 0 bytes). 1728 bytes per slot.
ModelConfig SmallConfig() {
  ModelConfig config;
  config.vocab_size = 256;
  config.d_model = 16;
  config.n_heads = 2;
  config.n_layers = 3;
  config.d_ff = 64;
  config.max_seq_len = 64;
  AttentionConfig sketch;
  sketch.kind = AttentionKind::kPolysketch;
  sketch.sketch = SketchKind::kLearned;
  sketch.sketch_size = 3;
  sketch.local_exact = true;
  sketch.block_size = 5;
  AttentionConfig window;
  window.kind = AttentionKind::kSlidingWindow;
  window.window = 3;
  config.layers = {sketch, window, AttentionConfig{}};
  return config;
}

StateLayout SmallLayout(int64_t max_context = 0) {
  absl::StatusOr<StateLayout> layout = StateLayout::Create(SmallConfig(), max_context);
  EXPECT_THAT(layout, IsOk());
  return *std::move(layout);
}

// Layer 0 (polysketch, H 2, h 8, r 3, b 5): S 448 + psi(k) 128 + keys 320 + values 320 + count 64
// = 1280; layer 1 (window 3): two rings of 192 + count 64 = 448.
constexpr int64_t kSlotBytes = 1728;

TEST(StatePoolTest, SizesAndAlignment) {
  ASSERT_EQ(SmallLayout().bytes_per_slot(), kSlotBytes);
  PS_ASSERT_OK_AND_ASSIGN(StatePool pool, StatePool::Create(SmallLayout(), 3));
  EXPECT_EQ(pool.num_slots(), 3);
  EXPECT_EQ(pool.num_free(), 3);
  EXPECT_EQ(pool.bytes_per_slot(), kSlotBytes);
  EXPECT_EQ(pool.total_bytes(), 3 * kSlotBytes);
  PS_ASSERT_OK_AND_ASSIGN(SlotId a, pool.Acquire());
  PS_ASSERT_OK_AND_ASSIGN(SlotId b, pool.Acquire());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(pool.SlotBytes(a).data()) % kStateAlignment, 0u);
  EXPECT_EQ(pool.SlotBytes(b).data() - pool.SlotBytes(a).data(), kSlotBytes);
  EXPECT_EQ(static_cast<int64_t>(pool.SlotBytes(a).size()), kSlotBytes);
}

TEST(StatePoolTest, AcquireUntilFullThenResourceExhausted) {
  PS_ASSERT_OK_AND_ASSIGN(StatePool pool, StatePool::Create(SmallLayout(), 3));
  for (int32_t i = 0; i < 3; ++i) {
    PS_ASSERT_OK_AND_ASSIGN(SlotId id, pool.Acquire());
    EXPECT_EQ(id.index, i);  // a fresh pool hands out 0, 1, 2
    EXPECT_TRUE(pool.InUse(id));
  }
  EXPECT_EQ(pool.num_free(), 0);
  EXPECT_EQ(pool.num_in_use(), 3);
  EXPECT_THAT(pool.Acquire(),
              StatusIs(absl::StatusCode::kResourceExhausted, "no free state slot (3 of 3 in use)"));
}

TEST(StatePoolTest, ReleaseThenAcquireReusesTheSlot) {
  PS_ASSERT_OK_AND_ASSIGN(StatePool pool, StatePool::Create(SmallLayout(), 3));
  std::vector<SlotId> ids;
  for (int i = 0; i < 3; ++i) {
    PS_ASSERT_OK_AND_ASSIGN(SlotId id, pool.Acquire());
    ids.push_back(id);
  }
  ASSERT_THAT(pool.Release(ids[1]), IsOk());
  EXPECT_FALSE(pool.InUse(ids[1]));
  EXPECT_EQ(pool.num_free(), 1);
  PS_ASSERT_OK_AND_ASSIGN(SlotId again, pool.Acquire());
  EXPECT_EQ(again, ids[1]);
  EXPECT_EQ(pool.num_free(), 0);
  // LIFO: the most recently released slot comes back first.
  ASSERT_THAT(pool.Release(ids[0]), IsOk());
  ASSERT_THAT(pool.Release(ids[2]), IsOk());
  PS_ASSERT_OK_AND_ASSIGN(SlotId top, pool.Acquire());
  EXPECT_EQ(top, ids[2]);
  PS_ASSERT_OK_AND_ASSIGN(SlotId next, pool.Acquire());
  EXPECT_EQ(next, ids[0]);
}

TEST(StatePoolTest, AcquireZeroesTheSlot) {
  PS_ASSERT_OK_AND_ASSIGN(StatePool pool, StatePool::Create(SmallLayout(), 1));
  PS_ASSERT_OK_AND_ASSIGN(SlotId id, pool.Acquire());
  for (std::byte b : pool.SlotBytes(id)) ASSERT_EQ(b, std::byte{0});
  std::memset(pool.SlotBytes(id).data(), 0xA5, pool.SlotBytes(id).size());
  ASSERT_THAT(pool.Release(id), IsOk());
  PS_ASSERT_OK_AND_ASSIGN(SlotId again, pool.Acquire());
  ASSERT_EQ(again, id);
  for (std::byte b : pool.SlotBytes(again)) ASSERT_EQ(b, std::byte{0});
}

TEST(StatePoolTest, BadReleasesAreRefusedAndChangeNothing) {
  PS_ASSERT_OK_AND_ASSIGN(StatePool pool, StatePool::Create(SmallLayout(), 2));
  PS_ASSERT_OK_AND_ASSIGN(SlotId id, pool.Acquire());
  ASSERT_THAT(pool.Release(id), IsOk());
  EXPECT_THAT(pool.Release(id), StatusIs(absl::StatusCode::kFailedPrecondition, "not in use"));
  EXPECT_THAT(pool.Release(SlotId{1}), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(pool.Release(SlotId{2}),
              StatusIs(absl::StatusCode::kInvalidArgument, "out of range [0, 2)"));
  EXPECT_THAT(pool.Release(SlotId{-1}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(pool.Release(SlotId{}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_FALSE(pool.InUse(SlotId{7}));
  // The free list is intact: exactly two distinct slots, then full.
  EXPECT_EQ(pool.num_free(), 2);
  PS_ASSERT_OK_AND_ASSIGN(SlotId a, pool.Acquire());
  PS_ASSERT_OK_AND_ASSIGN(SlotId b, pool.Acquire());
  EXPECT_NE(a, b);
  EXPECT_THAT(pool.Acquire(), StatusIs(absl::StatusCode::kResourceExhausted));
}

TEST(StatePoolTest, CreateRefusesBadSlotCounts) {
  EXPECT_THAT(StatePool::Create(SmallLayout(), 0),
              StatusIs(absl::StatusCode::kInvalidArgument, "num_slots"));
  EXPECT_THAT(StatePool::Create(SmallLayout(), -3), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(StatePool::Create(SmallLayout(), kMaxStateSlots + 1),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(StatePoolTest, CreateRefusesAnOverflowingSize) {
  // 2^24 slots of more than 2^46 bytes each: the product overflows int64_t.
  ModelConfig config = SmallConfig();
  config.layers[1].window = kMaxConfigInt;  // 2 x (2^31-1) x 8 x 4 bytes, ~2^37 per ring
  config.layers[0].block_size = kMaxConfigInt;
  config.layers[0].sketch_size = 1 << 20;  // P ~ 2^39: each sketch ~2^45 bytes
  PS_ASSERT_OK_AND_ASSIGN(StateLayout layout, StateLayout::Create(config));
  ASSERT_GT(layout.bytes_per_slot(), int64_t{1} << 46);
  EXPECT_THAT(StatePool::Create(std::move(layout), kMaxStateSlots),
              StatusIs(absl::StatusCode::kInvalidArgument, "overflows"));
}

TEST(StatePoolTest, BudgetExactFitAndOneByteShort) {
  PS_ASSERT_OK_AND_ASSIGN(StatePool exact,
                          StatePool::CreateForBudget(SmallLayout(), 4 * kSlotBytes));
  EXPECT_EQ(exact.num_slots(), 4);
  EXPECT_EQ(exact.total_bytes(), 4 * kSlotBytes);
  PS_ASSERT_OK_AND_ASSIGN(StatePool short_by_one,
                          StatePool::CreateForBudget(SmallLayout(), 4 * kSlotBytes - 1));
  EXPECT_EQ(short_by_one.num_slots(), 3);
  PS_ASSERT_OK_AND_ASSIGN(StatePool one, StatePool::CreateForBudget(SmallLayout(), kSlotBytes));
  EXPECT_EQ(one.num_slots(), 1);
  EXPECT_THAT(StatePool::CreateForBudget(SmallLayout(), kSlotBytes - 1),
              StatusIs(absl::StatusCode::kResourceExhausted,
                       "a budget of 1727 bytes holds no state slot; one slot needs 1728 bytes"));
  EXPECT_THAT(StatePool::CreateForBudget(SmallLayout(), 0),
              StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_THAT(StatePool::CreateForBudget(SmallLayout(), -1),
              StatusIs(absl::StatusCode::kInvalidArgument, "budget"));
}

TEST(StatePoolTest, KvCacheOnlyModel) {
  ModelConfig config = SmallConfig();
  config.layers = {AttentionConfig{}, AttentionConfig{}, AttentionConfig{}};
  PS_ASSERT_OK_AND_ASSIGN(StateLayout layout, StateLayout::Create(config));
  EXPECT_EQ(layout.bytes_per_slot(), 0);
  EXPECT_TRUE(layout.needs_kv_cache());
  EXPECT_EQ(layout.kv_bytes_per_token(), 3 * 2 * 8 * 2 * 4);
  EXPECT_THAT(StatePool::CreateForBudget(layout, 1 << 20),
              StatusIs(absl::StatusCode::kInvalidArgument, "bytes_per_slot is 0"));
  // A slot count still works: the pool only counts admissions.
  PS_ASSERT_OK_AND_ASSIGN(StatePool pool, StatePool::Create(layout, 2));
  EXPECT_EQ(pool.total_bytes(), 0);
  PS_ASSERT_OK_AND_ASSIGN(SlotId id, pool.Acquire());
  EXPECT_TRUE(pool.SlotBytes(id).empty());
  EXPECT_TRUE(pool.Floats(id, 0, StateComponent::kSketch).empty());
  EXPECT_THAT(pool.Release(id), IsOk());
}

TEST(StatePoolTest, TypedAccessorsPointIntoTheSlot) {
  PS_ASSERT_OK_AND_ASSIGN(StatePool pool, StatePool::Create(SmallLayout(), 2));
  PS_ASSERT_OK_AND_ASSIGN(SlotId first, pool.Acquire());
  PS_ASSERT_OK_AND_ASSIGN(SlotId id, pool.Acquire());
  const std::byte* base = pool.SlotBytes(id).data();
  const StateLayout& layout = pool.layout();
  for (int64_t layer = 0; layer < layout.num_layers(); ++layer) {
    for (int c = 0; c < kNumStateComponents; ++c) {
      const auto component = static_cast<StateComponent>(c);
      const StateRegion& region = layout.layer(layer).region(component);
      if (component == StateComponent::kKvPositions) {
        EXPECT_TRUE(pool.Int64s(id, layer, component).empty());  // no max_context
        continue;
      }
      if (IsInt64(component)) {
        int64_t* counter = pool.Counter(id, layer, component);
        if (!region.present()) {
          EXPECT_EQ(counter, nullptr);
          continue;
        }
        EXPECT_EQ(reinterpret_cast<const std::byte*>(counter), base + region.offset_bytes);
        EXPECT_EQ(*counter, 0);
        continue;
      }
      absl::Span<float> floats = pool.Floats(id, layer, component);
      if (!region.present()) {
        EXPECT_TRUE(floats.empty());
        continue;
      }
      EXPECT_EQ(reinterpret_cast<const std::byte*>(floats.data()), base + region.offset_bytes);
      EXPECT_EQ(static_cast<int64_t>(floats.size() * sizeof(float)), region.size_bytes);
    }
  }
  // Shapes: the sketch is [H 2, P 6, h+1 9], the local keys [H 2, b 5, h 8].
  EXPECT_EQ(pool.Floats(id, 0, StateComponent::kSketch).size(), 2u * 6 * 9);
  EXPECT_EQ(pool.Floats(id, 0, StateComponent::kLocalKeys).size(), 2u * 5 * 8);
  EXPECT_EQ(pool.Floats(id, 1, StateComponent::kRingValues).size(), 2u * 3 * 8);
  // Writing one slot leaves the other alone.
  for (float& x : pool.Floats(id, 0, StateComponent::kLocalSketch)) x = 1.5f;
  *pool.Counter(id, 1, StateComponent::kRingCount) = 42;
  for (std::byte b : pool.SlotBytes(first)) ASSERT_EQ(b, std::byte{0});
  const StatePool& const_pool = pool;
  EXPECT_EQ(const_pool.Floats(id, 0, StateComponent::kLocalSketch)[3], 1.5f);
  EXPECT_EQ(*pool.Counter(id, 1, StateComponent::kRingCount), 42);
}

TEST(StatePoolTest, KvRegionsWithAContextLimit) {
  // max_context 10: layer 2 (softmax) keeps 10 rows of 2 x 8 floats: keys and values 640 bytes
  // each, positions 80 (padded to 128), count 8 (padded to 64).
  constexpr int64_t kKvSlotBytes = kSlotBytes + 640 + 640 + 128 + 64;
  const StateLayout layout = SmallLayout(10);
  ASSERT_EQ(layout.bytes_per_slot(), kKvSlotBytes);
  PS_ASSERT_OK_AND_ASSIGN(StatePool pool, StatePool::Create(layout, 2));
  PS_ASSERT_OK_AND_ASSIGN(SlotId other, pool.Acquire());
  PS_ASSERT_OK_AND_ASSIGN(SlotId id, pool.Acquire());
  const std::byte* base = pool.SlotBytes(id).data();
  const LayerStateLayout& kv = pool.layout().layer(2);
  absl::Span<float> keys = pool.Floats(id, 2, StateComponent::kKvKeys);
  absl::Span<float> values = pool.Floats(id, 2, StateComponent::kKvValues);
  absl::Span<int64_t> positions = pool.Int64s(id, 2, StateComponent::kKvPositions);
  absl::Span<int64_t> count = pool.Int64s(id, 2, StateComponent::kKvCount);
  EXPECT_EQ(keys.size(), 10u * 2 * 8);
  EXPECT_EQ(values.size(), 10u * 2 * 8);
  ASSERT_EQ(positions.size(), 10u);
  ASSERT_EQ(count.size(), 1u);
  EXPECT_EQ(reinterpret_cast<const std::byte*>(keys.data()),
            base + kv.region(StateComponent::kKvKeys).offset_bytes);
  EXPECT_EQ(reinterpret_cast<const std::byte*>(positions.data()),
            base + kv.region(StateComponent::kKvPositions).offset_bytes);
  EXPECT_EQ(count.data(), pool.Counter(id, 2, StateComponent::kKvCount));
  EXPECT_EQ(reinterpret_cast<uintptr_t>(positions.data()) % kStateAlignment, 0u);
  for (int64_t p : positions) EXPECT_EQ(p, 0);
  // Other layers have no KV regions.
  EXPECT_TRUE(pool.Int64s(id, 0, StateComponent::kKvPositions).empty());
  EXPECT_EQ(pool.Counter(id, 1, StateComponent::kKvCount), nullptr);
  // Int64s also reaches the single counters.
  ASSERT_EQ(pool.Int64s(id, 1, StateComponent::kRingCount).size(), 1u);
  EXPECT_EQ(pool.Int64s(id, 1, StateComponent::kRingCount).data(),
            pool.Counter(id, 1, StateComponent::kRingCount));

  for (float& x : keys) x = 2.5f;
  for (size_t i = 0; i < positions.size(); ++i) positions[i] = static_cast<int64_t>(i) * 3;
  count[0] = 7;
  for (std::byte b : pool.SlotBytes(other)) ASSERT_EQ(b, std::byte{0});
  const StatePool& const_pool = pool;
  EXPECT_EQ(const_pool.Int64s(id, 2, StateComponent::kKvPositions)[9], 27);
  EXPECT_EQ(*pool.Counter(id, 2, StateComponent::kKvCount), 7);
  EXPECT_EQ(pool.Floats(id, 2, StateComponent::kKvKeys)[159], 2.5f);
  // Released and acquired again, the cache is empty.
  ASSERT_THAT(pool.Release(id), IsOk());
  PS_ASSERT_OK_AND_ASSIGN(SlotId again, pool.Acquire());
  ASSERT_EQ(again, id);
  for (int64_t p : pool.Int64s(again, 2, StateComponent::kKvPositions)) EXPECT_EQ(p, 0);
  EXPECT_EQ(*pool.Counter(again, 2, StateComponent::kKvCount), 0);
  for (float x : pool.Floats(again, 2, StateComponent::kKvKeys)) ASSERT_EQ(x, 0.0f);
  for (float x : pool.Floats(again, 2, StateComponent::kKvValues)) ASSERT_EQ(x, 0.0f);
}

}  // namespace
}  // namespace ps::engine

namespace ps::engine {
namespace {

TEST(StatePoolTest, DeviceMemoryComesFromTheBackendAndAcquireZeroesThroughIt) {
  RecordingBackend device;
  {
    PS_ASSERT_OK_AND_ASSIGN(StatePool pool, StatePool::Create(SmallLayout(), 3, &device));
    ASSERT_EQ(device.allocated, std::vector<int64_t>{3 * kSlotBytes});  // one allocation
    PS_ASSERT_OK_AND_ASSIGN(SlotId a, pool.Acquire());
    PS_ASSERT_OK_AND_ASSIGN(SlotId b, pool.Acquire());
    ASSERT_EQ(device.zeroed.size(), 2u);
    EXPECT_EQ(device.zeroed[0].first, pool.SlotBytes(a).data());
    EXPECT_EQ(device.zeroed[0].second, kSlotBytes);
    EXPECT_EQ(device.zeroed[1].first, pool.SlotBytes(b).data());
    EXPECT_EQ(pool.SlotBytes(b).data() - pool.SlotBytes(a).data(), kSlotBytes);
    // The slot's bytes are backend memory: here host memory that the backend zeroed.
    std::vector<std::byte> bytes(kSlotBytes, std::byte{1});
    device.CopyToHost(pool.SlotBytes(a).data(), kSlotBytes, bytes.data());
    EXPECT_EQ(bytes, std::vector<std::byte>(kSlotBytes, std::byte{0}));
    StatePool moved = std::move(pool);  // the memory moves with the pool
    EXPECT_EQ(moved.SlotBytes(a).data(), static_cast<const std::byte*>(device.zeroed[0].first));
  }
  EXPECT_THAT(StatePool::Create(SmallLayout(), 1 << 20, &device),
              StatusIs(absl::StatusCode::kResourceExhausted, "recording memory"));
}

}  // namespace
}  // namespace ps::engine
