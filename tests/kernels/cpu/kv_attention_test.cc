// KvDecode / KvPrefill against an in-test scalar oracle (every earlier key kept in a plain vector,
// the mask applied at read time, reference::Dot / Softmax / Pow4 in double), for every mask kind,
// with pools of 1 and 3 threads: batched decode at different positions, prefill == decode steps
// (outputs and cache contents), prefill in unaligned pieces, decode after prefill, long caches
// that take the split (flash-decoding) path. Every case runs with fp32 and fp16 caches: with fp16,
// the tokens' k and v are made binary16-exact first, so the same oracle and tolerances apply and
// the cache must hold them bit for bit; Fp16CacheStaysWithinTheRoundingBound then feeds unrounded
// k and v and bounds the difference from the fp32 oracle.
#include "kernels/cpu/kv_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <ostream>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <absl/types/span.h>
#include <gtest/gtest.h>

#include "base/half.h"
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

// A sequence's cache in test-owned memory, in the shape's dtype (the other pair stays empty).
struct Cache {
  Cache(const KvAttentionShape& shape) : positions(static_cast<size_t>(shape.capacity)) {
    const auto size = static_cast<size_t>(shape.capacity * shape.heads * shape.head_dim);
    if (shape.cache_dtype == KvCacheDtype::kFp16) {
      keys16.resize(size);
      values16.resize(size);
    } else {
      keys.resize(size);
      values.resize(size);
    }
  }
  KvSlotState Slot(bool ring) {
    KvSlotState slot{keys.empty() ? nullptr : keys.data(), values.empty() ? nullptr : values.data(),
                     ring ? nullptr : positions.data(), &count};
    if (!keys16.empty()) {
      slot.keys_f16 = keys16.data();
      slot.values_f16 = values16.data();
    }
    return slot;
  }
  // Element i of the keys / values as float, whatever the dtype.
  float Key(int64_t i) const { return keys16.empty() ? keys[i] : HalfBitsToFloat(keys16[i]); }
  float Value(int64_t i) const {
    return values16.empty() ? values[i] : HalfBitsToFloat(values16[i]);
  }
  std::vector<float> keys;
  std::vector<float> values;
  std::vector<uint16_t> keys16;
  std::vector<uint16_t> values16;
  std::vector<int64_t> positions;
  int64_t count = 0;
};

float RoundToHalf(float x) { return HalfBitsToFloat(FloatToHalfBits(x)); }

// Every token of a sequence: q, k, v rows [H, h] per position. `half_exact`: k and v rounded to
// binary16 values (what an fp16 cache stores), so that an fp16 cache loses nothing of them.
struct Tokens {
  Tokens(int64_t num, int64_t row, uint32_t seed, bool half_exact = false)
      : q(num * row), k(num * row), v(num * row) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& x : q) x = normal(rng);
    for (float& x : k) x = normal(rng);
    for (float& x : v) x = normal(rng);
    if (half_exact) {
      for (float& x : k) x = RoundToHalf(x);
      for (float& x : v) x = RoundToHalf(x);
    }
  }
  std::vector<float> q, k, v;
};

class KvAttentionTest : public ::testing::TestWithParam<std::tuple<MaskCase, int, KvCacheDtype>> {
 protected:
  KvAttentionTest() : pool_(std::get<1>(GetParam())) {}

  const MaskCase& mask_case() const { return std::get<0>(GetParam()); }
  KvCacheDtype dtype() const { return std::get<2>(GetParam()); }
  bool half() const { return dtype() == KvCacheDtype::kFp16; }

  KvAttentionShape Shape(int64_t head_dim, int64_t max_context) const {
    KvAttentionShape shape;
    shape.heads = 2;
    shape.head_dim = head_dim;
    shape.weighting = mask_case().weighting;
    shape.mask = mask_case().mask;
    shape.ring = mask_case().ring;
    shape.capacity = shape.ring ? shape.mask.window : shape.mask.MaxKept(max_context);
    shape.cache_dtype = dtype();
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
        ASSERT_EQ(cache.Key((p % w) * row + i), tok.k[p * row + i]) << what << " p " << p;
        ASSERT_EQ(cache.Value((p % w) * row + i), tok.v[p * row + i]) << what << " p " << p;
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
      ASSERT_EQ(cache.Key(r * row + i), tok.k[kept[r] * row + i]) << what << " row " << r;
      ASSERT_EQ(cache.Value(r * row + i), tok.v[kept[r] * row + i]) << what << " row " << r;
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
    tokens.emplace_back(offsets[b] + kSteps, row, 100 + b, half());
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
    const Tokens tok(n + 5, row, 7 + static_cast<uint32_t>(n), half());
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
  const Tokens tok(kN, row, 31, half());
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
  EXPECT_EQ(pieces.keys16, whole.keys16);
  EXPECT_EQ(pieces.values16, whole.values16);
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
  if (half()) {
    for (float& x : tok.k) x = RoundToHalf(x);
    for (float& x : tok.v) x = RoundToHalf(x);
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

// Every decode path this CPU has (KvDecodePath), token by token from an empty cache, against the
// oracle and against each other: head widths the fused AVX-512 loops take (16 to 128; 64 is the
// GPT-2-small head) and one they leave to the portable loops (24); 150 steps cross two 64-key
// tiles and end inside a partial one, and with 3 threads the longer caches take the split path.
TEST_P(KvAttentionTest, EveryDecodePathMatchesTheOracle) {
  constexpr int64_t kN = 150;
  const std::vector<KvDecodePath> paths = SupportedKvDecodePaths();
  ASSERT_FALSE(paths.empty());
  EXPECT_EQ(paths.front(), KvDecodePath::kPortable);
  EXPECT_EQ(BestKvDecodePath(), paths.back());
  for (int64_t head_dim : {16, 24, 48, 64, 128}) {
    const KvAttentionShape shape = Shape(head_dim, 256);
    const int64_t row = shape.heads * shape.head_dim;
    Tokens tok(kN, row, 11 + static_cast<uint32_t>(head_dim), half());
    if (shape.weighting == KvWeighting::kPolynomial) {
      for (float& x : tok.q) x /= std::sqrt(static_cast<float>(head_dim));
      for (float& x : tok.k) x = half() ? RoundToHalf(x / 4.0f) : x / 4.0f;
    }
    std::vector<Cache> caches(paths.size(), Cache(shape));
    for (int64_t t = 0; t < kN; ++t) {
      const std::vector<float> want = Oracle(shape, tok, t);
      std::vector<std::vector<float>> got;
      for (size_t p = 0; p < paths.size(); ++p) {
        const std::string what = "h " + std::to_string(head_dim) + " path " +
                                 std::string(KvDecodePathName(paths[p])) + " t " +
                                 std::to_string(t);
        std::vector<float> out(static_cast<size_t>(row));
        const int64_t positions[] = {t};
        const KvSlotState slots[] = {caches[p].Slot(shape.ring)};
        KvDecode(pool_, shape, positions, slots, tok.q.data() + t * row, tok.k.data() + t * row,
                 tok.v.data() + t * row, out.data(), paths[p]);
        ExpectNear(out, want, what);
        ExpectCacheHolds(shape, caches[p], tok, t, what);
        got.push_back(std::move(out));
      }
      for (size_t p = 1; p < got.size(); ++p) ExpectNear(got[p], got[0], "paths agree");
    }
  }
}

// fp16 caches on k and v that are NOT binary16-exact, against the fp32 oracle: prefill then
// decode. Bound, per output row (first order in the rounding): each stored k and v element moves
// by at most u|x| with u = 2^-11 (round to nearest binary16; none of these values is subnormal or
// near overflow). A softmax score then moves by at most d = u * sum_i |q_i k_i| / sqrt(h), so
// every weight by a factor in [e^-2d, e^2d], and the output (a convex combination of value rows)
// by at most (e^2d - 1) max|v| + u max|v|, max over the keys the query sees; plus the fp32
// tolerance of the other tests. Polynomial weights (q.k)^4 have no such scale-free bound (their
// relative change grows without limit as q.k -> 0), so they are checked only against the
// half-exact oracle above.
TEST_P(KvAttentionTest, Fp16CacheStaysWithinTheRoundingBound) {
  if (!half() || mask_case().weighting != KvWeighting::kSoftmax) {
    GTEST_SKIP() << "fp16 caches with softmax weights only";
  }
  constexpr int64_t kN = 300;
  constexpr double kU = 1.0 / 2048.0;
  for (int64_t head_dim : {8, 64}) {
    SCOPED_TRACE(head_dim);
    const KvAttentionShape shape = Shape(head_dim, 512);
    const int64_t H = shape.heads, h = head_dim, row = H * h;
    const Tokens tok(kN + 4, row, 77);  // not rounded
    Cache cache(shape);
    std::vector<float> got(static_cast<size_t>(kN * row));
    KvPrefill(pool_, shape, 0, kN, cache.Slot(shape.ring), tok.q.data(), tok.k.data(), tok.v.data(),
              got.data());
    double worst_ratio = 0.0;  // largest |error| / bound seen, printed to show the bound's slack
    for (int64_t t = 0; t < kN + 4; ++t) {
      std::vector<float> out;
      if (t < kN) {
        out.assign(got.begin() + t * row, got.begin() + (t + 1) * row);
      } else {
        out = DecodeOne(pool_, shape, cache, tok, t);
      }
      const std::vector<float> want = Oracle(shape, tok, t);
      for (int64_t head = 0; head < H; ++head) {
        double d = 0.0, vmax = 0.0;
        for (int64_t j = 0; j <= t; ++j) {
          if (!shape.mask.Visible(t, j)) continue;
          double qk = 0.0;
          for (int64_t i = 0; i < h; ++i) {
            qk += std::abs(double{tok.q[(t * H + head) * h + i]} * tok.k[(j * H + head) * h + i]);
            vmax = std::max(vmax, std::abs(double{tok.v[(j * H + head) * h + i]}));
          }
          d = std::max(d, kU * qk / std::sqrt(static_cast<double>(h)));
        }
        const double bound = (std::exp(2 * d) - 1) * vmax + kU * vmax;
        for (int64_t i = 0; i < h; ++i) {
          const double w = want[head * h + i];
          const double error = std::abs(out[head * h + i] - w);
          ASSERT_LE(error, bound + kAtol + kRtol * std::abs(w))
              << "t " << t << " head " << head << " element " << i;
          worst_ratio = std::max(worst_ratio, error / bound);
        }
      }
    }
    std::cout << "[ fp16 ] " << mask_case().name << " h " << h << ": max error / bound "
              << worst_ratio << "\n";
  }
}

std::string CaseName(
    const ::testing::TestParamInfo<std::tuple<MaskCase, int, KvCacheDtype>>& param) {
  return std::get<0>(param.param).name + "Threads" + std::to_string(std::get<1>(param.param)) +
         (std::get<2>(param.param) == KvCacheDtype::kFp16 ? "Fp16" : "");
}

INSTANTIATE_TEST_SUITE_P(
    Masks, KvAttentionTest,
    ::testing::Combine(::testing::ValuesIn(MaskCases()), ::testing::Values(1, 3),
                       ::testing::Values(KvCacheDtype::kFp32, KvCacheDtype::kFp16)),
    CaseName);

}  // namespace
}  // namespace ps::kernels::cpu
