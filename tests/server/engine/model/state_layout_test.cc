// StateLayout: hand-computed sizes for every attention kind, alignment, the packed symmetric index,
// algorithm.md's GPT-2-small figure and the shipped tiny-polysketch model.
#include "server/engine/model/state_layout.h"

#include <cstdint>
#include <limits>
#include <set>
#include <utility>
#include <vector>

#include <absl/status/status.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "server/engine/model_io/model_config.h"
#include "tests/testing/status_matchers.h"

namespace ps::engine {
namespace {

using ::ps::test::StatusIs;

constexpr int64_t kF = 4;  // bytes per float

int64_t AlignUp(int64_t bytes) { return (bytes + 63) / 64 * 64; }

ModelConfig Config(int64_t d_model, int64_t n_heads, std::vector<AttentionConfig> layers) {
  ModelConfig config;
  config.vocab_size = 256;
  config.d_model = d_model;
  config.n_heads = n_heads;
  config.n_layers = static_cast<int64_t>(layers.size());
  config.d_ff = 64;
  config.max_seq_len = 1024;
  config.layers = std::move(layers);
  return config;
}

AttentionConfig Polysketch(int64_t r, bool local_exact = false, int64_t b = 0) {
  AttentionConfig attn;
  attn.kind = AttentionKind::kPolysketch;
  attn.sketch = SketchKind::kRandom;
  attn.sketch_size = r;
  attn.local_exact = local_exact;
  attn.block_size = b;
  return attn;
}

AttentionConfig Kind(AttentionKind kind) {
  AttentionConfig attn;
  attn.kind = kind;
  return attn;
}

AttentionConfig SlidingWindow(int64_t w) {
  AttentionConfig attn = Kind(AttentionKind::kSlidingWindow);
  attn.window = w;
  return attn;
}

TEST(PackedSymmetricIndexTest, IsARowMajorUpperTriangleBijection) {
  for (int64_t r : {1, 2, 3, 7, 32}) {
    std::set<int64_t> seen;
    int64_t expected = 0;  // row-major order visits the pairs in index order
    for (int64_t a = 0; a < r; ++a) {
      for (int64_t c = a; c < r; ++c) {
        const int64_t index = PackedSymmetricIndex(a, c, r);
        EXPECT_EQ(index, expected) << "r=" << r << " a=" << a << " c=" << c;
        EXPECT_GE(index, 0);
        EXPECT_LT(index, PackedSymmetricRows(r));
        seen.insert(index);
        ++expected;
      }
    }
    EXPECT_EQ(static_cast<int64_t>(seen.size()), PackedSymmetricRows(r)) << "r=" << r;
  }
  EXPECT_EQ(PackedSymmetricRows(32), 528);
  EXPECT_EQ(PackedSymmetricIndex(0, 31, 32), 31);
  EXPECT_EQ(PackedSymmetricIndex(1, 1, 32), 32);
  EXPECT_EQ(PackedSymmetricIndex(31, 31, 32), 527);
}

TEST(StateLayoutTest, PlainPolysketch) {
  // D 16, H 2, h 8, r 3: P 6, S is 2 x 6 x 9 floats = 432 bytes, padded to 448.
  PS_ASSERT_OK_AND_ASSIGN(StateLayout layout,
                          StateLayout::Create(Config(16, 2, {Polysketch(3), Polysketch(3)})));
  ASSERT_EQ(layout.num_layers(), 2);
  const LayerStateLayout& layer = layout.layer(1);
  EXPECT_EQ(layer.packed_rows, 6);
  EXPECT_EQ(layer.sketch_size, 3);
  EXPECT_FALSE(layer.needs_kv_cache);
  EXPECT_EQ(layout.layer(0).region(StateComponent::kSketch), (StateRegion{0, 2 * 6 * 9 * kF}));
  EXPECT_EQ(layer.region(StateComponent::kSketch), (StateRegion{448, 432}));
  EXPECT_FALSE(layer.region(StateComponent::kLocalSketch).present());
  EXPECT_FALSE(layer.region(StateComponent::kLocalKeys).present());
  EXPECT_EQ(layout.bytes_per_slot(), 2 * 448);
  EXPECT_FALSE(layout.needs_kv_cache());
  EXPECT_EQ(layout.kv_bytes_per_token(), 0);
}

TEST(StateLayoutTest, PolysketchBlockSizeWithoutLocalExactAddsNothing) {
  PS_ASSERT_OK_AND_ASSIGN(StateLayout plain, StateLayout::Create(Config(16, 2, {Polysketch(3)})));
  PS_ASSERT_OK_AND_ASSIGN(StateLayout with_b,
                          StateLayout::Create(Config(16, 2, {Polysketch(3, false, 5)})));
  EXPECT_EQ(plain.bytes_per_slot(), with_b.bytes_per_slot());
}

TEST(StateLayoutTest, PolysketchLocalExact) {
  // D 16, H 2, h 8, r 3, b 5.
  PS_ASSERT_OK_AND_ASSIGN(StateLayout layout,
                          StateLayout::Create(Config(16, 2, {Polysketch(3, true, 5)})));
  const LayerStateLayout& layer = layout.layer(0);
  EXPECT_EQ(layer.local_size, 5);
  const int64_t sketch = 2 * 6 * 9 * kF;    // 432 -> 448
  const int64_t sketched = 2 * 5 * 3 * kF;  // 120 -> 128: psi(k) of the block, [H, b, r]
  const int64_t buffer = 2 * 5 * 8 * kF;    // 320, a multiple of 64
  EXPECT_EQ(layer.region(StateComponent::kSketch), (StateRegion{0, sketch}));
  EXPECT_EQ(layer.region(StateComponent::kLocalSketch), (StateRegion{448, sketched}));
  EXPECT_EQ(layer.region(StateComponent::kLocalKeys), (StateRegion{576, buffer}));
  EXPECT_EQ(layer.region(StateComponent::kLocalValues), (StateRegion{896, buffer}));
  EXPECT_EQ(layer.region(StateComponent::kLocalPending), (StateRegion{1216, 8}));
  EXPECT_EQ(layout.bytes_per_slot(), 1280);
}

TEST(StateLayoutTest, SlidingWindowRingLivesInTheSlot) {
  // D 16, H 2, h 8, w 3: 2 x 3 x 8 floats = 192 bytes each.
  PS_ASSERT_OK_AND_ASSIGN(StateLayout layout,
                          StateLayout::Create(Config(16, 2, {SlidingWindow(3)})));
  const LayerStateLayout& layer = layout.layer(0);
  EXPECT_EQ(layer.window, 3);
  EXPECT_FALSE(layer.needs_kv_cache);
  EXPECT_EQ(layer.region(StateComponent::kRingKeys), (StateRegion{0, 192}));
  EXPECT_EQ(layer.region(StateComponent::kRingValues), (StateRegion{192, 192}));
  EXPECT_EQ(layer.region(StateComponent::kRingCount), (StateRegion{384, 8}));
  EXPECT_FALSE(layer.region(StateComponent::kSketch).present());
  EXPECT_EQ(layout.bytes_per_slot(), 448);
}

TEST(StateLayoutTest, GrowingKindsNeedAKvCacheAndNoSlotBytes) {
  AttentionConfig strided = Kind(AttentionKind::kSparseStrided);
  strided.window = 4;
  strided.stride = 2;
  AttentionConfig fixed = Kind(AttentionKind::kSparseFixed);
  fixed.chunk = 4;
  fixed.summary = 1;
  // D 16, H 2, h 8: keys + values = 2 x 8 x 2 floats = 128 bytes per kept token per layer.
  PS_ASSERT_OK_AND_ASSIGN(
      StateLayout layout,
      StateLayout::Create(Config(
          16, 2,
          {Kind(AttentionKind::kSoftmax), Kind(AttentionKind::kPolynomial), strided, fixed})));
  EXPECT_EQ(layout.bytes_per_slot(), 0);
  EXPECT_TRUE(layout.needs_kv_cache());
  EXPECT_EQ(layout.kv_bytes_per_token(), 4 * 128);
  EXPECT_EQ(layout.max_context(), 0);
  for (const LayerStateLayout& layer : layout.layers()) {
    EXPECT_TRUE(layer.needs_kv_cache);
    EXPECT_EQ(layer.kv_bytes_per_token, 128);
    EXPECT_EQ(layer.kv_capacity, 0);
    for (const StateRegion& region : layer.regions) EXPECT_FALSE(region.present());
  }
}

TEST(StateLayoutTest, MaxContextPutsASoftmaxCacheInTheSlot) {
  // D 16, H 2, h 8, max_context 100: cap 100 rows of 2 x 8 floats (64 bytes): keys and values
  // 6400 bytes each, positions 800 (ends at 13600, padded to 13632), count 8 (padded to 64).
  PS_ASSERT_OK_AND_ASSIGN(
      StateLayout layout,
      StateLayout::Create(Config(16, 2, {Kind(AttentionKind::kSoftmax)}), /*max_context=*/100));
  EXPECT_EQ(layout.max_context(), 100);
  const LayerStateLayout& layer = layout.layer(0);
  EXPECT_EQ(layer.kv_capacity, 100);
  EXPECT_TRUE(layer.needs_kv_cache);  // describes the kind, whatever max_context
  EXPECT_EQ(layer.kv_bytes_per_token, 128);
  EXPECT_EQ(layer.region(StateComponent::kKvKeys), (StateRegion{0, 6400}));
  EXPECT_EQ(layer.region(StateComponent::kKvValues), (StateRegion{6400, 6400}));
  EXPECT_EQ(layer.region(StateComponent::kKvPositions), (StateRegion{12800, 800}));
  EXPECT_EQ(layer.region(StateComponent::kKvCount), (StateRegion{13632, 8}));
  EXPECT_EQ(layout.bytes_per_slot(), 13696);
  EXPECT_TRUE(layout.needs_kv_cache());
  EXPECT_EQ(layout.kv_bytes_per_token(), 128);
}

TEST(StateLayoutTest, Fp16KvCachesHalveTheRowsAndNothingElse) {
  // As MaxContextPutsASoftmaxCacheInTheSlot with 2-byte elements: keys and values 3200 bytes
  // each, positions 800 at 6400 (ends 7200, padded to 7232), count at 7232. The sliding window's
  // ring [H 2, w 3, h 8] is 96 bytes per buffer; the polysketch layer's state keeps fp32.
  const ModelConfig config =
      Config(16, 2, {Kind(AttentionKind::kSoftmax), SlidingWindow(3), Polysketch(4, true, 4)});
  PS_ASSERT_OK_AND_ASSIGN(StateLayout fp32, StateLayout::Create(config, 100));
  PS_ASSERT_OK_AND_ASSIGN(StateLayout fp16,
                          StateLayout::Create(config, 100, kernels::KvCacheDtype::kFp16));
  EXPECT_EQ(fp16.kv_cache_dtype(), kernels::KvCacheDtype::kFp16);
  EXPECT_TRUE(fp16.has_kv_cache_rows());
  const LayerStateLayout& kv = fp16.layer(0);
  EXPECT_EQ(kv.kv_bytes_per_token, 64);
  EXPECT_EQ(fp16.kv_bytes_per_token(), 64);
  EXPECT_EQ(fp32.kv_bytes_per_token(), 128);
  EXPECT_EQ(kv.region(StateComponent::kKvKeys), (StateRegion{0, 3200}));
  EXPECT_EQ(kv.region(StateComponent::kKvValues), (StateRegion{3200, 3200}));
  EXPECT_EQ(kv.region(StateComponent::kKvPositions), (StateRegion{6400, 800}));
  EXPECT_EQ(kv.region(StateComponent::kKvCount), (StateRegion{7232, 8}));
  EXPECT_EQ(fp16.layer(1).region(StateComponent::kRingKeys).size_bytes, 96);
  EXPECT_EQ(fp32.layer(1).region(StateComponent::kRingKeys).size_bytes, 192);
  EXPECT_EQ(fp16.layer(2).bytes(), fp32.layer(2).bytes());
  for (StateComponent c : {StateComponent::kKvKeys, StateComponent::kKvValues,
                           StateComponent::kRingKeys, StateComponent::kRingValues}) {
    EXPECT_TRUE(fp16.IsFp16(c));
    EXPECT_FALSE(fp32.IsFp16(c));
  }
  for (StateComponent c : {StateComponent::kSketch, StateComponent::kLocalKeys,
                           StateComponent::kKvPositions, StateComponent::kRingCount}) {
    EXPECT_FALSE(fp16.IsFp16(c));
  }
  // Only a polysketch model: no KV rows, so the dtype changes nothing.
  PS_ASSERT_OK_AND_ASSIGN(
      StateLayout constant,
      StateLayout::Create(Config(16, 2, {Polysketch(4)}), 0, kernels::KvCacheDtype::kFp16));
  EXPECT_FALSE(constant.has_kv_cache_rows());
}

TEST(StateLayoutTest, MaxContextSizesSparseCachesByTheirMask) {
  AttentionConfig strided = Kind(AttentionKind::kSparseStrided);
  strided.window = 4;
  strided.stride = 2;
  AttentionConfig fixed = Kind(AttentionKind::kSparseFixed);
  fixed.chunk = 4;
  fixed.summary = 1;
  // max_context 100, rows of 64 bytes. strided: every key stays reachable by a later query (j is
  // seen again by j + 2m), so all 100 rows, as softmax. fixed: the chunk 4, the new key, 1
  // summary per 25 chunks: 30 rows.
  PS_ASSERT_OK_AND_ASSIGN(StateLayout layout,
                          StateLayout::Create(Config(16, 2, {strided, fixed, SlidingWindow(3)}),
                                              /*max_context=*/100));
  const LayerStateLayout& s = layout.layer(0);
  EXPECT_EQ(s.kv_capacity, 100);
  EXPECT_EQ(s.region(StateComponent::kKvKeys), (StateRegion{0, 6400}));
  EXPECT_EQ(s.region(StateComponent::kKvValues), (StateRegion{6400, 6400}));
  EXPECT_EQ(s.region(StateComponent::kKvPositions), (StateRegion{12800, 800}));
  EXPECT_EQ(s.region(StateComponent::kKvCount), (StateRegion{13632, 8}));
  const LayerStateLayout& f = layout.layer(1);
  EXPECT_EQ(f.kv_capacity, 30);
  EXPECT_EQ(f.region(StateComponent::kKvKeys), (StateRegion{13696, 1920}));
  EXPECT_EQ(f.region(StateComponent::kKvValues), (StateRegion{15616, 1920}));
  EXPECT_EQ(f.region(StateComponent::kKvPositions), (StateRegion{17536, 240}));
  EXPECT_EQ(f.region(StateComponent::kKvCount), (StateRegion{17792, 8}));
  // The sliding window keeps its ring and gets no KV regions.
  const LayerStateLayout& w = layout.layer(2);
  EXPECT_EQ(w.kv_capacity, 0);
  EXPECT_FALSE(w.region(StateComponent::kKvKeys).present());
  EXPECT_EQ(w.region(StateComponent::kRingKeys), (StateRegion{17856, 192}));
  EXPECT_EQ(layout.bytes_per_slot(), 17856 + 448);

  // A short limit caps every kind at max_context (fixed would be 4 + 1 + 0 = 5).
  PS_ASSERT_OK_AND_ASSIGN(StateLayout short_context,
                          StateLayout::Create(Config(16, 2, {strided, fixed}), 3));
  EXPECT_EQ(short_context.layer(0).kv_capacity, 3);
  EXPECT_EQ(short_context.layer(1).kv_capacity, 3);
  EXPECT_EQ(short_context.layer(0).region(StateComponent::kKvKeys), (StateRegion{0, 192}));
}

TEST(StateLayoutTest, MaxContextRegionsAreAlignedAndDisjoint) {
  // Odd sizes: D 6, H 3, h 2 (rows of 24 bytes), max_context 37.
  AttentionConfig strided = Kind(AttentionKind::kSparseStrided);
  strided.window = 5;
  strided.stride = 3;
  AttentionConfig fixed = Kind(AttentionKind::kSparseFixed);
  fixed.chunk = 7;
  fixed.summary = 3;
  PS_ASSERT_OK_AND_ASSIGN(
      StateLayout layout,
      StateLayout::Create(Config(6, 3,
                                 {Kind(AttentionKind::kPolynomial), Polysketch(5, true, 3), strided,
                                  SlidingWindow(7), fixed, Kind(AttentionKind::kSoftmax)}),
                          37));
  int64_t expected_offset = 0;
  for (const LayerStateLayout& layer : layout.layers()) {
    for (const StateRegion& region : layer.regions) {
      if (!region.present()) continue;
      EXPECT_EQ(region.offset_bytes % kStateAlignment, 0);
      EXPECT_EQ(region.offset_bytes, expected_offset);  // in order, so disjoint
      expected_offset = AlignUp(region.offset_bytes + region.size_bytes);
    }
  }
  EXPECT_EQ(layout.bytes_per_slot(), expected_offset);
  const int64_t caps[] = {37, 0, 37, 0, 7 + 1 + 3 * 5, 37};  // strided keeps every key
  for (int64_t i = 0; i < layout.num_layers(); ++i) {
    const LayerStateLayout& layer = layout.layer(i);
    EXPECT_EQ(layer.kv_capacity, caps[i]) << i;
    EXPECT_EQ(layer.region(StateComponent::kKvKeys).size_bytes, caps[i] * 3 * 2 * kF) << i;
    EXPECT_EQ(layer.region(StateComponent::kKvValues).size_bytes, caps[i] * 3 * 2 * kF) << i;
    EXPECT_EQ(layer.region(StateComponent::kKvPositions).size_bytes, caps[i] * 8) << i;
    EXPECT_EQ(layer.region(StateComponent::kKvCount).size_bytes, caps[i] > 0 ? 8 : 0) << i;
  }
}

TEST(StateLayoutTest, BadMaxContextIsRefused) {
  const ModelConfig config = Config(16, 2, {Kind(AttentionKind::kSoftmax)});
  EXPECT_THAT(StateLayout::Create(config, -1),
              StatusIs(absl::StatusCode::kInvalidArgument, "max_context: must be >= 0"));
  EXPECT_THAT(StateLayout::Create(config, std::numeric_limits<int64_t>::max()),
              StatusIs(absl::StatusCode::kInvalidArgument, "max_context"));
  // 2^40 rows of 2^30 floats overflow int64_t bytes.
  EXPECT_THAT(StateLayout::Create(Config(int64_t{1} << 30, 2, {Kind(AttentionKind::kSoftmax)}),
                                  int64_t{1} << 40),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "layers[0]: per-request state (kv_keys) overflows"));
}

TEST(StateLayoutTest, MixedModelAlignsEveryComponent) {
  // Odd sizes: D 6, H 3, h 2, r 5 (P 15), b 3, w 7.
  PS_ASSERT_OK_AND_ASSIGN(
      StateLayout layout,
      StateLayout::Create(Config(6, 3,
                                 {Polysketch(5, true, 3), Kind(AttentionKind::kSoftmax),
                                  SlidingWindow(7), Polysketch(5)})));
  int64_t expected_offset = 0;
  for (const LayerStateLayout& layer : layout.layers()) {
    for (const StateRegion& region : layer.regions) {
      if (!region.present()) continue;
      EXPECT_EQ(region.offset_bytes % kStateAlignment, 0);
      EXPECT_EQ(region.offset_bytes, expected_offset);  // components in enum order, no gaps
      expected_offset = AlignUp(region.offset_bytes + region.size_bytes);
    }
  }
  EXPECT_EQ(layout.bytes_per_slot(), expected_offset);
  EXPECT_EQ(layout.bytes_per_slot() % kStateAlignment, 0);
  const int64_t sketch = AlignUp(3 * 15 * 3 * kF);
  const int64_t local = AlignUp(3 * 3 * 2 * kF);
  const int64_t sketched = AlignUp(3 * 3 * 5 * kF);  // psi(k) of the block, [H, b, r]
  const int64_t ring = AlignUp(3 * 7 * 2 * kF);
  EXPECT_EQ(layout.bytes_per_slot(),
            (sketch + sketched + 2 * local + 64) + (2 * ring + 64) + sketch);
  EXPECT_EQ(layout.kv_bytes_per_token(), 3 * 2 * 2 * kF);
  EXPECT_TRUE(layout.layer(1).needs_kv_cache);
  EXPECT_FALSE(layout.layer(3).needs_kv_cache);
}

TEST(StateLayoutTest, Gpt2SmallShapeMatchesAlgorithmDoc) {
  // algorithm.md section 4: 12 layers, 12 heads, h 64, r 32, fp32, symmetric: 18.9 MiB.
  PS_ASSERT_OK_AND_ASSIGN(
      StateLayout layout,
      StateLayout::Create(Config(768, 12, std::vector<AttentionConfig>(12, Polysketch(32)))));
  const int64_t expected = int64_t{12} * 12 * 528 * 65 * 4;
  EXPECT_EQ(layout.bytes_per_slot(), expected);
  EXPECT_NEAR(static_cast<double>(layout.bytes_per_slot()) / (1 << 20), 18.9, 0.05);
  // The unpacked r*r state would be 36.6 MiB.
  EXPECT_NEAR(12.0 * 12 * 32 * 32 * 65 * 4 / (1 << 20), 36.6, 0.05);
}

TEST(StateLayoutTest, ShippedTinyPolysketch) {
  PS_ASSERT_OK_AND_ASSIGN(ModelConfig config,
                          LoadModelConfig(PS_SOURCE_DIR "/models/tiny-polysketch"));
  PS_ASSERT_OK_AND_ASSIGN(StateLayout layout, StateLayout::Create(config));
  // 4 layers, H 3, h 64, r 32 (P 528), local_exact with b 128; every size is already a multiple
  // of 64 except the 8-byte count, padded to 64.
  const int64_t sketch = 3 * 528 * 65 * kF;
  const int64_t sketched = 3 * 128 * 32 * kF;  // psi(k) of the block (S_cur until issue 19)
  const int64_t buffer = 3 * 128 * 64 * kF;
  EXPECT_EQ(layout.bytes_per_slot(), 4 * (sketch + sketched + 2 * buffer + 64));
  EXPECT_EQ(layout.bytes_per_slot(), 2630656);  // 4,081,408 with S_cur
  EXPECT_FALSE(layout.needs_kv_cache());
}

TEST(StateLayoutTest, InvalidConfigIsRefused) {
  ModelConfig config = Config(16, 2, {Polysketch(3)});
  config.layers[0].sketch_size = 0;
  EXPECT_THAT(StateLayout::Create(config),
              StatusIs(absl::StatusCode::kInvalidArgument, "layers[0].sketch_size"));
}

TEST(StateLayoutTest, OverflowingSizeIsRefused) {
  // r = 2^31 - 1: P ~ 2^61, times H (h+1) 4 overflows int64_t.
  EXPECT_THAT(StateLayout::Create(Config(16, 2, {Polysketch(kMaxConfigInt)})),
              StatusIs(absl::StatusCode::kInvalidArgument, "layers[0]: per-request state"));
}

TEST(StateComponentTest, NamesAndCounters) {
  EXPECT_EQ(StateComponentName(StateComponent::kSketch), "sketch");
  EXPECT_EQ(StateComponentName(StateComponent::kRingCount), "ring_count");
  EXPECT_EQ(StateComponentName(StateComponent::kKvKeys), "kv_keys");
  EXPECT_EQ(StateComponentName(StateComponent::kKvValues), "kv_values");
  EXPECT_EQ(StateComponentName(StateComponent::kKvPositions), "kv_positions");
  EXPECT_EQ(StateComponentName(StateComponent::kKvCount), "kv_count");
  EXPECT_EQ(kNumStateComponents, 12);
  EXPECT_TRUE(IsInt64(StateComponent::kLocalPending));
  EXPECT_TRUE(IsInt64(StateComponent::kRingCount));
  EXPECT_TRUE(IsInt64(StateComponent::kKvPositions));
  EXPECT_TRUE(IsInt64(StateComponent::kKvCount));
  EXPECT_FALSE(IsInt64(StateComponent::kLocalKeys));
  EXPECT_FALSE(IsInt64(StateComponent::kKvKeys));
  EXPECT_FALSE(IsInt64(StateComponent::kKvValues));
}

}  // namespace
}  // namespace ps::engine
