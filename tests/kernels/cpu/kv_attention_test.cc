// KvDecode / KvPrefill against an in-test scalar oracle (every earlier key kept in a plain vector,
// the mask applied at read time, reference::Dot / Softmax / Pow4 in double), for every mask kind,
// with pools of 1 and 3 threads: batched decode at different positions, prefill == decode steps
// (outputs and cache contents), prefill in unaligned pieces, decode after prefill, long caches
// that take the split (flash-decoding) path.
#include "kernels/cpu/kv_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <ostream>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include <absl/types/span.h>
#include <gtest/gtest.h>

#include "kernels/attention_mask.h"
#include "kernels/backend.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/reference/ops.h"

namespace ps::kernels::cpu {
namespace {

namespace ref = ::ps::kernels::reference;

// fp32 sums and the polynomial exp against double: well inside 1e-5 relative for these sizes.
constexpr double kRtol = 1e-5;
constexpr double kAtol = 1e-6;  // outputs of O(1); covers entries that cancel to ~0

struct MaskCase {
  std::string name;
  KvWeighting weighting;
  KeyMask mask;
  bool ring;
};

// Names the case in ctest and failure messages instead of a byte dump.
void PrintTo(const MaskCase& mask_case, std::ostream* os) { *os << mask_case.name; }

std::vector<MaskCase> MaskCases() {
  KeyMask causal;
  KeyMask window;
  window.kind = KeyMask::Kind::kWindow;
  window.window = 3;
  KeyMask strided;
  strided.kind = KeyMask::Kind::kStrided;
  strided.window = 3;
  strided.stride = 4;
  KeyMask long_stride;  // longer than two prefill tiles: whole key tiles are hidden and skipped
  long_stride.kind = KeyMask::Kind::kStrided;
  long_stride.window = 5;
  long_stride.stride = 200;
  KeyMask fixed;
  fixed.kind = KeyMask::Kind::kFixed;
  fixed.chunk = 4;
  fixed.summary = 2;
  return {{"CausalSoftmax", KvWeighting::kSoftmax, causal, false},
          {"CausalPolynomial", KvWeighting::kPolynomial, causal, false},
          {"WindowRing", KvWeighting::kSoftmax, window, true},
          {"Strided", KvWeighting::kSoftmax, strided, false},
          {"StridedPolynomial", KvWeighting::kPolynomial, strided, false},
          {"StridedLong", KvWeighting::kSoftmax, long_stride, false},
          {"Fixed", KvWeighting::kSoftmax, fixed, false}};
}

// A sequence's cache in test-owned memory.
struct Cache {
  Cache(const KvAttentionShape& shape)
      : keys(static_cast<size_t>(shape.capacity * shape.heads * shape.head_dim)),
        values(keys.size()),
        positions(static_cast<size_t>(shape.capacity)) {}
  KvSlotState Slot(bool ring) {
    return KvSlotState{keys.data(), values.data(), ring ? nullptr : positions.data(), &count};
  }
  std::vector<float> keys;
  std::vector<float> values;
  std::vector<int64_t> positions;
  int64_t count = 0;
};

// Every token of a sequence: q, k, v rows [H, h] per position.
struct Tokens {
  Tokens(int64_t num, int64_t row, uint32_t seed) : q(num * row), k(num * row), v(num * row) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& x : q) x = normal(rng);
    for (float& x : k) x = normal(rng);
    for (float& x : v) x = normal(rng);
  }
  std::vector<float> q, k, v;
};

class KvAttentionTest : public ::testing::TestWithParam<std::tuple<MaskCase, int>> {
 protected:
  KvAttentionTest() : pool_(std::get<1>(GetParam())) {}

  const MaskCase& mask_case() const { return std::get<0>(GetParam()); }

  KvAttentionShape Shape(int64_t head_dim, int64_t max_context) const {
    KvAttentionShape shape;
    shape.heads = 2;
    shape.head_dim = head_dim;
    shape.weighting = mask_case().weighting;
    shape.mask = mask_case().mask;
    shape.ring = mask_case().ring;
    shape.capacity = shape.ring ? shape.mask.window : shape.mask.MaxKept(max_context);
    return shape;
  }

  // The oracle: output of query t over every key j <= t it sees (tokens 0..t), [H, h].
  std::vector<float> Oracle(const KvAttentionShape& shape, const Tokens& tok, int64_t t) const {
    const int64_t H = shape.heads;
    const int64_t h = shape.head_dim;
    const absl::Span<const float> q(tok.q), k(tok.k), v(tok.v);
    std::vector<float> out(static_cast<size_t>(H * h));
    for (int64_t head = 0; head < H; ++head) {
      const absl::Span<const float> qh = q.subspan((t * H + head) * h, h);
      std::vector<int64_t> seen;
      for (int64_t j = 0; j <= t; ++j) {
        if (shape.mask.Visible(t, j)) seen.push_back(j);
      }
      std::vector<double> acc(static_cast<size_t>(h), 0.0);
      double denominator = 0.0;
      if (shape.weighting == KvWeighting::kPolynomial) {
        denominator = 1.0;
        for (int64_t j : seen) {
          const double w = ref::Pow4(ref::Dot(qh, k.subspan((j * H + head) * h, h)));
          denominator += w;
          for (int64_t i = 0; i < h; ++i) acc[i] += w * v[(j * H + head) * h + i];
        }
      } else {
        std::vector<float> scores;
        for (int64_t j : seen) {
          scores.push_back(static_cast<float>(ref::Dot(qh, k.subspan((j * H + head) * h, h)) /
                                              std::sqrt(static_cast<double>(h))));
        }
        ref::Softmax(absl::Span<float>(scores));
        denominator = 1.0;
        for (size_t s = 0; s < seen.size(); ++s) {
          for (int64_t i = 0; i < h; ++i)
            acc[i] += scores[s] * double{v[(seen[s] * H + head) * h + i]};
        }
      }
      for (int64_t i = 0; i < h; ++i) out[head * h + i] = static_cast<float>(acc[i] / denominator);
    }
    return out;
  }

  void WideHeadsAndLongCaches(int64_t head_dim);

  ThreadPool pool_;
};

void ExpectNear(absl::Span<const float> got, absl::Span<const float> want,
                const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_NEAR(got[i], want[i], kAtol + kRtol * std::abs(want[i])) << what << " element " << i;
  }
}

// The cache after position t must hold exactly the keys t or a later query sees (brute force), in
// position order (list) or at row p % w (ring), bit for bit.
void ExpectCacheHolds(const KvAttentionShape& shape, Cache& cache, const Tokens& tok, int64_t t,
                      const std::string& what) {
  const int64_t row = shape.heads * shape.head_dim;
  if (shape.ring) {
    ASSERT_EQ(cache.count, t + 1) << what;
    const int64_t w = shape.capacity;
    for (int64_t p = std::max<int64_t>(0, t - w + 1); p <= t; ++p) {
      for (int64_t i = 0; i < row; ++i) {
        ASSERT_EQ(cache.keys[(p % w) * row + i], tok.k[p * row + i]) << what << " p " << p;
        ASSERT_EQ(cache.values[(p % w) * row + i], tok.v[p * row + i]) << what << " p " << p;
      }
    }
    return;
  }
  std::vector<int64_t> kept;
  for (int64_t j = 0; j <= t; ++j) {
    bool reachable = false;
    // A key no query within window + stride (+ chunk) of t sees is never seen again.
    const int64_t horizon = shape.mask.window + shape.mask.stride + shape.mask.chunk + 1;
    for (int64_t later = t; later < t + horizon && !reachable; ++later) {
      reachable = shape.mask.Visible(later, j);
    }
    if (reachable) kept.push_back(j);
  }
  ASSERT_EQ(cache.count, static_cast<int64_t>(kept.size())) << what;
  ASSERT_LE(cache.count, shape.capacity) << what;
  for (size_t r = 0; r < kept.size(); ++r) {
    ASSERT_EQ(cache.positions[r], kept[r]) << what << " row " << r;
    for (int64_t i = 0; i < row; ++i) {
      ASSERT_EQ(cache.keys[r * row + i], tok.k[kept[r] * row + i]) << what << " row " << r;
      ASSERT_EQ(cache.values[r * row + i], tok.v[kept[r] * row + i]) << what << " row " << r;
    }
  }
}

// Decodes position t of one sequence alone; returns the output row.
std::vector<float> DecodeOne(ThreadPool& pool, const KvAttentionShape& shape, Cache& cache,
                             const Tokens& tok, int64_t t) {
  const int64_t row = shape.heads * shape.head_dim;
  std::vector<float> out(static_cast<size_t>(row));
  const int64_t positions[] = {t};
  const KvSlotState slots[] = {cache.Slot(shape.ring)};
  KvDecode(pool, shape, positions, slots, tok.q.data() + t * row, tok.k.data() + t * row,
           tok.v.data() + t * row, out.data());
  return out;
}

TEST_P(KvAttentionTest, BatchedDecodeMatchesOracle) {
  constexpr int64_t kSteps = 20;
  const int64_t offsets[] = {0, 5, 11};
  const KvAttentionShape shape = Shape(8, 64);
  const int64_t row = shape.heads * shape.head_dim;
  std::vector<Tokens> tokens;
  std::vector<Cache> caches;
  for (int b = 0; b < 3; ++b) {
    tokens.emplace_back(offsets[b] + kSteps, row, 100 + b);
    caches.emplace_back(shape);
  }
  // Bring sequences 1 and 2 to their starting positions one by one.
  for (int b = 1; b < 3; ++b) {
    for (int64_t t = 0; t < offsets[b]; ++t) {
      const std::vector<float> out = DecodeOne(pool_, shape, caches[b], tokens[b], t);
      ExpectNear(out, Oracle(shape, tokens[b], t), "warm-up t " + std::to_string(t));
    }
  }
  for (int64_t step = 0; step < kSteps; ++step) {
    std::vector<int64_t> positions;
    std::vector<KvSlotState> slots;
    std::vector<float> q, k, v;
    for (int b = 0; b < 3; ++b) {
      const int64_t t = offsets[b] + step;
      positions.push_back(t);
      slots.push_back(caches[b].Slot(shape.ring));
      const auto first = [&](const std::vector<float>& x) { return x.begin() + t * row; };
      q.insert(q.end(), first(tokens[b].q), first(tokens[b].q) + row);
      k.insert(k.end(), first(tokens[b].k), first(tokens[b].k) + row);
      v.insert(v.end(), first(tokens[b].v), first(tokens[b].v) + row);
    }
    std::vector<float> out(static_cast<size_t>(3 * row));
    KvDecode(pool_, shape, positions, slots, q.data(), k.data(), v.data(), out.data());
    for (int b = 0; b < 3; ++b) {
      const std::string what = "step " + std::to_string(step) + " sequence " + std::to_string(b);
      ExpectNear(absl::Span<const float>(out).subspan(b * row, row),
                 Oracle(shape, tokens[b], positions[b]), what);
      ExpectCacheHolds(shape, caches[b], tokens[b], positions[b], what);
    }
  }
}

TEST_P(KvAttentionTest, PrefillEqualsDecodeSteps) {
  const KvAttentionShape shape = Shape(8, 256);
  const int64_t row = shape.heads * shape.head_dim;
  for (int64_t n : {1, 7, 33, 150}) {
    const Tokens tok(n + 5, row, 7 + static_cast<uint32_t>(n));
    Cache decoded(shape);
    std::vector<float> want;
    for (int64_t t = 0; t < n; ++t) {
      const std::vector<float> out = DecodeOne(pool_, shape, decoded, tok, t);
      want.insert(want.end(), out.begin(), out.end());
    }
    Cache prefilled(shape);
    std::vector<float> got(static_cast<size_t>(n * row));
    KvPrefill(pool_, shape, 0, n, prefilled.Slot(shape.ring), tok.q.data(), tok.k.data(),
              tok.v.data(), got.data());
    const std::string what = "n " + std::to_string(n);
    ExpectNear(got, want, what);
    for (int64_t t = 0; t < n; ++t) {
      ExpectNear(absl::Span<const float>(got).subspan(t * row, row), Oracle(shape, tok, t),
                 what + " oracle t " + std::to_string(t));
    }
    ExpectCacheHolds(shape, prefilled, tok, n - 1, what);
    ExpectCacheHolds(shape, decoded, tok, n - 1, what);
    // Decode continues identically after either.
    for (int64_t t = n; t < n + 5; ++t) {
      const std::vector<float> after_prefill = DecodeOne(pool_, shape, prefilled, tok, t);
      const std::vector<float> after_decode = DecodeOne(pool_, shape, decoded, tok, t);
      ExpectNear(after_prefill, after_decode, what + " decode t " + std::to_string(t));
      ExpectNear(after_prefill, Oracle(shape, tok, t), what + " oracle t " + std::to_string(t));
      ExpectCacheHolds(shape, prefilled, tok, t, what + " decode t " + std::to_string(t));
    }
  }
}

TEST_P(KvAttentionTest, PrefillInPiecesEqualsOnePiece) {
  constexpr int64_t kN = 150;
  const int64_t splits[] = {0, 1, 14, 47, 111, kN};  // unaligned with the 32 / 64 tiles
  const KvAttentionShape shape = Shape(8, 256);
  const int64_t row = shape.heads * shape.head_dim;
  const Tokens tok(kN, row, 31);
  Cache whole(shape);
  std::vector<float> want(static_cast<size_t>(kN * row));
  KvPrefill(pool_, shape, 0, kN, whole.Slot(shape.ring), tok.q.data(), tok.k.data(), tok.v.data(),
            want.data());
  Cache pieces(shape);
  std::vector<float> got(static_cast<size_t>(kN * row));
  for (size_t p = 0; p + 1 < std::size(splits); ++p) {
    const int64_t start = splits[p];
    const int64_t n = splits[p + 1] - start;
    KvPrefill(pool_, shape, start, n, pieces.Slot(shape.ring), tok.q.data() + start * row,
              tok.k.data() + start * row, tok.v.data() + start * row, got.data() + start * row);
    ExpectCacheHolds(shape, pieces, tok, start + n - 1, "after piece " + std::to_string(p));
  }
  ExpectNear(got, want, "pieces");
  ASSERT_EQ(pieces.count, whole.count);
  EXPECT_EQ(pieces.positions, whole.positions);
  EXPECT_EQ(pieces.keys, whole.keys);
  EXPECT_EQ(pieces.values, whole.values);
}

// h 64 (and 24: a 16-wide block plus a scalar tail) with caches long enough (700 keys) that a
// decode step splits them over the pool.
TEST_P(KvAttentionTest, WideHeadsAndLongCaches) {
  for (int64_t head_dim : {64, 24}) {
    SCOPED_TRACE(head_dim);
    WideHeadsAndLongCaches(head_dim);
  }
}

void KvAttentionTest::WideHeadsAndLongCaches(int64_t head_dim) {
  constexpr int64_t kN = 700;
  const KvAttentionShape shape = Shape(head_dim, 1024);
  const int64_t row = shape.heads * shape.head_dim;
  Tokens tok(kN + 3, row, 5);
  if (shape.weighting == KvWeighting::kPolynomial) {
    // Keep (q.k)^4 in a sane range: q and k of norm ~1.
    for (float& x : tok.q) x /= std::sqrt(static_cast<float>(head_dim));
    for (float& x : tok.k) x /= std::sqrt(static_cast<float>(head_dim));
  }
  Cache cache(shape);
  std::vector<float> out(static_cast<size_t>(kN * row));
  KvPrefill(pool_, shape, 0, kN, cache.Slot(shape.ring), tok.q.data(), tok.k.data(), tok.v.data(),
            out.data());
  for (int64_t t = 0; t < kN; ++t) {
    ExpectNear(absl::Span<const float>(out).subspan(t * row, row), Oracle(shape, tok, t),
               "prefill t " + std::to_string(t));
  }
  ExpectCacheHolds(shape, cache, tok, kN - 1, "prefill");
  for (int64_t t = kN; t < kN + 3; ++t) {
    ExpectNear(DecodeOne(pool_, shape, cache, tok, t), Oracle(shape, tok, t),
               "decode t " + std::to_string(t));
  }
}

std::string CaseName(const ::testing::TestParamInfo<std::tuple<MaskCase, int>>& param) {
  return std::get<0>(param.param).name + "Threads" + std::to_string(std::get<1>(param.param));
}

INSTANTIATE_TEST_SUITE_P(Masks, KvAttentionTest,
                         ::testing::Combine(::testing::ValuesIn(MaskCases()),
                                            ::testing::Values(1, 3)),
                         CaseName);

}  // namespace
}  // namespace ps::kernels::cpu
