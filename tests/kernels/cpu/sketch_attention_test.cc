// Tests of the CPU polysketch kernels (kernels/cpu/sketch_attention.h): SketchDecode against a
// scalar oracle built from reference::SketchUpdate / SketchReadout / Pow4 / Dot (the same steps as
// ReferenceModel::AttendSketch, on the slot layout), and SketchPrefill against SketchDecode: one
// piece, several pieces at unaligned split points, and decode continuing after a prefill.
#include "kernels/cpu/sketch_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_join.h>
#include <absl/types/span.h>
#include <gtest/gtest.h>

#include "kernels/backend.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/packed_index.h"
#include "kernels/reference/ops.h"

namespace ps::kernels::cpu {
namespace {

namespace ref = ::ps::kernels::reference;

// fp32 kernels against a double-accumulating oracle (and prefill's GEMM order against decode's
// row order): sums of up to P * (h + 1) products rounded in fp32 differ by a few ulps of the
// largest term, so the tolerance is relative to the largest magnitude of the compared tensor
// (atol) plus relative to the element (rtol). A wrong fold, a missing token or a wrong weight
// changes values by O(1) of that scale.
constexpr double kRtol = 1e-5;
constexpr double kAtolOfMax = 1e-5;

// Host copy of one sequence's state for one layer, in the SketchSlotState layout.
struct State {
  std::vector<float> sketch, sketched, keys, values;
  int64_t pending = 0;  // local_exact: rows of the previous block not yet folded into sketch

  explicit State(const SketchAttentionShape& shape) {
    const int64_t head_state = PackedSymmetricRows(shape.sketch_size) * (shape.head_dim + 1);
    sketch.assign(shape.heads * head_state, 0.0f);
    if (shape.local_exact) {
      sketched.assign(shape.heads * shape.block_size * shape.sketch_size, 0.0f);
      keys.assign(shape.heads * shape.block_size * shape.head_dim, 0.0f);
      values.assign(keys.size(), 0.0f);
    }
  }
  SketchSlotState Slot() {
    SketchSlotState slot;
    slot.sketch = sketch.data();
    if (!sketched.empty()) {
      slot.local_sketch = sketched.data();
      slot.local_keys = keys.data();
      slot.local_values = values.data();
      slot.local_pending = &pending;
    }
    return slot;
  }
};

// Inputs of `rows` tokens: psi_q, psi_k [rows, H, r]; v, q_local, k_local [rows, H, h].
struct Inputs {
  std::vector<float> psi_q, psi_k, v, q_local, k_local;
};

Inputs RandomInputs(const SketchAttentionShape& shape, int64_t rows, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto fill = [&](int64_t count) {
    std::vector<float> x(count);
    for (float& e : x) e = normal(rng);
    return x;
  };
  const int64_t H = shape.heads;
  Inputs in;
  in.psi_q = fill(rows * H * shape.sketch_size);
  in.psi_k = fill(rows * H * shape.sketch_size);
  in.v = fill(rows * H * shape.head_dim);
  // q~, k~ are LayerNorm outputs: unit-scale entries.
  in.q_local = fill(rows * H * shape.head_dim);
  in.k_local = fill(rows * H * shape.head_dim);
  return in;
}

// Pointers to row `row` of every input buffer (q_local/k_local null for plain shapes).
struct RowPtrs {
  const float *psi_q, *psi_k, *v, *q_local, *k_local;
};
RowPtrs Row(const SketchAttentionShape& shape, const Inputs& in, int64_t row) {
  const int64_t rH = shape.heads * shape.sketch_size;
  const int64_t hH = shape.heads * shape.head_dim;
  return {in.psi_q.data() + row * rH, in.psi_k.data() + row * rH, in.v.data() + row * hH,
          shape.local_exact ? in.q_local.data() + row * hH : nullptr,
          shape.local_exact ? in.k_local.data() + row * hH : nullptr};
}

// S_cur of the block in the buffer: sum over buffer rows j < m of phi(psi(k_j)) [v_j; 1]
// (reference::SketchUpdate per row, in order), [H, P, h+1].
std::vector<float> BlockSum(const SketchAttentionShape& shape, const State& st, int64_t m) {
  const int64_t H = shape.heads, h = shape.head_dim, r = shape.sketch_size, b = shape.block_size;
  const int64_t head_state = PackedSymmetricRows(r) * (h + 1);
  std::vector<float> sum(st.sketch.size(), 0.0f);
  for (int64_t head = 0; head < H; ++head) {
    for (int64_t j = 0; j < m; ++j) {
      ref::SketchUpdate(absl::MakeConstSpan(st.sketched).subspan((head * b + j) * r, r),
                        absl::MakeConstSpan(st.values).subspan((head * b + j) * h, h),
                        absl::Span<float>(sum).subspan(head * head_state, head_state));
    }
  }
  return sum;
}

// The oracle: one decode step of one sequence at position t (AttendSketch on the slot layout,
// with the current block as buffer rows that are folded into S at the next block start).
// Row pointers are [H, r] / [H, h]; out [H, h].
void OracleStep(const SketchAttentionShape& shape, int64_t t, State& st, const RowPtrs& x,
                float* out) {
  const int64_t H = shape.heads, h = shape.head_dim, r = shape.sketch_size, b = shape.block_size;
  const int64_t cols = h + 1;
  const int64_t head_state = PackedSymmetricRows(r) * cols;
  const bool local = shape.local_exact;
  if (local && t % b == 0 && t > 0) {
    const std::vector<float> block = BlockSum(shape, st, b);
    for (size_t i = 0; i < st.sketch.size(); ++i) st.sketch[i] += block[i];
  }
  for (int64_t head = 0; head < H; ++head) {
    const absl::Span<const float> psi_q(x.psi_q + head * r, r);
    const absl::Span<const float> psi_k(x.psi_k + head * r, r);
    const absl::Span<const float> v(x.v + head * h, h);
    if (local) {
      std::copy(psi_k.begin(), psi_k.end(), st.sketched.begin() + (head * b + t % b) * r);
    } else {
      ref::SketchUpdate(psi_k, v,
                        absl::Span<float>(st.sketch).subspan(head * head_state, head_state));
    }
    std::vector<double> u(cols);
    ref::SketchReadout(psi_q,
                       absl::Span<const float>(st.sketch).subspan(head * head_state, head_state),
                       absl::Span<double>(u));
    if (local) {
      const int64_t m = t % b;
      float* keys = st.keys.data() + head * b * h;
      float* values = st.values.data() + head * b * h;
      std::copy(x.k_local + head * h, x.k_local + (head + 1) * h, keys + m * h);
      std::copy(v.begin(), v.end(), values + m * h);
      const absl::Span<const float> q(x.q_local + head * h, h);
      for (int64_t j = 0; j <= m; ++j) {
        const double w = ref::Pow4(ref::Dot(q, absl::Span<const float>(keys + j * h, h)));
        for (int64_t d = 0; d < h; ++d) u[d] += w * values[j * h + d];
        u[h] += w;
      }
    }
    for (int64_t d = 0; d < h; ++d) out[head * h + d] = static_cast<float>(u[d] / (1.0 + u[h]));
  }
}

// Checks |got - want| <= kAtolOfMax * max|want| + kRtol * |want| elementwise; reports the first
// violation. Returns whether all are within tolerance.
::testing::AssertionResult Close(absl::Span<const float> got, absl::Span<const float> want,
                                 double scale = 1.0) {
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure() << "size " << got.size() << " vs " << want.size();
  }
  double max_abs = 0.0;
  for (float w : want) max_abs = std::max(max_abs, std::fabs(static_cast<double>(w)));
  double worst = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - want[i]);
    const double tol = scale * (kAtolOfMax * max_abs + kRtol * std::fabs(want[i]));
    worst = std::max(worst, err / std::max(tol, 1e-300));
    if (!(err <= tol)) {  // also catches NaN
      return ::testing::AssertionFailure()
             << "element " << i << ": got " << got[i] << ", want " << want[i] << " (err " << err
             << ", tol " << tol << ", max|want| " << max_abs << ")";
    }
  }
  return ::testing::AssertionSuccess() << "worst err/tol " << worst;
}

// S with the rows a lazy decode left pending folded in: the S of an eager fold, which is what the
// oracle and a prefill leave.
std::vector<float> FoldedSketch(const SketchAttentionShape& shape, const State& st) {
  std::vector<float> s = st.sketch;
  if (!shape.local_exact || st.pending == 0) return s;
  const int64_t H = shape.heads, h = shape.head_dim, r = shape.sketch_size, b = shape.block_size;
  const int64_t head_state = PackedSymmetricRows(r) * (h + 1);
  for (int64_t head = 0; head < H; ++head) {
    for (int64_t j = b - st.pending; j < b; ++j) {
      ref::SketchUpdate(absl::MakeConstSpan(st.sketched).subspan((head * b + j) * r, r),
                        absl::MakeConstSpan(st.values).subspan((head * b + j) * h, h),
                        absl::Span<float>(s).subspan(head * head_state, head_state));
    }
  }
  return s;
}

// Compares every state array. Decode and prefill both write buffer row t % b for every token t
// and fold the same blocks, so S (with any pending rows folded in) and the whole buffers (stale
// rows of an earlier block included) must agree individually.
void ExpectStatesEqual(const SketchAttentionShape& shape, const State& got, const State& want,
                       const std::string& what) {
  EXPECT_TRUE(Close(FoldedSketch(shape, got), FoldedSketch(shape, want))) << what << ": sketch";
  if (shape.local_exact) {
    EXPECT_TRUE(Close(got.sketched, want.sketched)) << what << ": local sketched keys";
    EXPECT_TRUE(Close(got.keys, want.keys)) << what << ": local keys";
    EXPECT_TRUE(Close(got.values, want.values)) << what << ": local values";
  }
}

SketchAttentionShape Shape(bool local, int64_t H, int64_t h, int64_t r, int64_t b) {
  SketchAttentionShape shape;
  shape.heads = H;
  shape.head_dim = h;
  shape.sketch_size = r;
  shape.local_exact = local;
  shape.block_size = b;
  return shape;
}

std::string Name(const SketchAttentionShape& shape, int threads) {
  return absl::StrCat(shape.local_exact ? "local_exact" : "plain", " H=", shape.heads,
                      " h=", shape.head_dim, " r=", shape.sketch_size, " b=", shape.block_size,
                      " threads=", threads);
}

// Decode of tokens [from, to) of `in` (row = position) one call per token, batch 1.
void DecodeRange(ThreadPool& pool, const SketchAttentionShape& shape, const Inputs& in,
                 int64_t from, int64_t to, State& st, std::vector<float>& out) {
  const int64_t hH = shape.heads * shape.head_dim;
  const SketchSlotState slot = st.Slot();
  for (int64_t t = from; t < to; ++t) {
    const RowPtrs x = Row(shape, in, t);
    const int64_t position = t;
    SketchDecode(pool, shape, absl::MakeConstSpan(&position, 1), absl::MakeConstSpan(&slot, 1),
                 x.psi_q, x.psi_k, x.v, x.q_local, x.k_local, out.data() + t * hH);
  }
}

// Prefill of tokens [from, to) of `in` in one call.
void PrefillRange(ThreadPool& pool, const SketchAttentionShape& shape, const Inputs& in,
                  int64_t from, int64_t to, State& st, std::vector<float>& out) {
  const int64_t hH = shape.heads * shape.head_dim;
  const RowPtrs x = Row(shape, in, from);
  SketchPrefill(pool, shape, from, to - from, st.Slot(), x.psi_q, x.psi_k, x.v, x.q_local,
                x.k_local, out.data() + from * hH);
}

// --- SketchDecode against the oracle -----------------------------------------------------------

// B = 3 sequences at different positions share every call; steps cross several block starts.
void CheckDecode(const SketchAttentionShape& shape, int threads, int64_t steps,
                 std::vector<int64_t> first) {
  SCOPED_TRACE(Name(shape, threads));
  ThreadPool pool(threads);
  std::mt19937 rng(1234);
  const int64_t B = static_cast<int64_t>(first.size());
  const int64_t hH = shape.heads * shape.head_dim;
  std::vector<State> fast, oracle;
  std::vector<float> scratch(hH);
  // Bring each sequence to its first position with oracle steps on both copies.
  for (int64_t i = 0; i < B; ++i) {
    fast.emplace_back(shape);
    oracle.emplace_back(shape);
    const Inputs prefix = RandomInputs(shape, first[i], rng);
    for (int64_t t = 0; t < first[i]; ++t) {
      OracleStep(shape, t, fast[i], Row(shape, prefix, t), scratch.data());
      OracleStep(shape, t, oracle[i], Row(shape, prefix, t), scratch.data());
    }
  }
  std::vector<SketchSlotState> slots;
  for (State& st : fast) slots.push_back(st.Slot());
  std::vector<float> out(B * hH), want(B * hH);
  for (int64_t step = 0; step < steps; ++step) {
    const Inputs in = RandomInputs(shape, B, rng);
    std::vector<int64_t> positions(B);
    for (int64_t i = 0; i < B; ++i) positions[i] = first[i] + step;
    const RowPtrs x = Row(shape, in, 0);
    SketchDecode(pool, shape, positions, slots, x.psi_q, x.psi_k, x.v, x.q_local, x.k_local,
                 out.data());
    for (int64_t i = 0; i < B; ++i) {
      OracleStep(shape, positions[i], oracle[i], Row(shape, in, i), want.data() + i * hH);
    }
    for (int64_t i = 0; i < B; ++i) {
      ASSERT_TRUE(Close(absl::MakeConstSpan(out).subspan(i * hH, hH),
                        absl::MakeConstSpan(want).subspan(i * hH, hH)))
          << "sequence " << i << " position " << positions[i];
    }
  }
  for (int64_t i = 0; i < B; ++i) {
    ExpectStatesEqual(shape, fast[i], oracle[i], absl::StrCat("sequence ", i));
  }
}

TEST(SketchDecodeTest, MatchesOracleSmallShapes) {
  for (bool local : {false, true}) {
    for (int64_t r : {4, 5}) {
      for (int threads : {1, 3}) {
        // Positions 0, 3 and 9 at the first step; 14 steps cross block starts 4, 8, 12, 16, 20.
        CheckDecode(Shape(local, 2, 8, r, 4), threads, 14, {0, 3, 9});
      }
    }
  }
}

TEST(SketchDecodeTest, MatchesOracleGpt2HeadShape) {
  // h = 64 takes the compiled 65-column path; batch 1 on 3 threads splits a head's rows.
  for (bool local : {false, true}) {
    CheckDecode(Shape(local, 2, 64, 32, 16), 3, 7, {13});
    CheckDecode(Shape(local, 2, 64, 32, 16), 3, 5, {0, 14, 31});
  }
}

TEST(SketchDecodeTest, EmptyBatchIsANoOp) {
  ThreadPool pool(2);
  const SketchAttentionShape shape = Shape(false, 2, 8, 4, 4);
  SketchDecode(pool, shape, {}, {}, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
}

// --- SketchPrefill against SketchDecode --------------------------------------------------------

// Prefill of [0, n) against n decode steps: outputs and states (fold points coincide).
void CheckPrefillFromZero(const SketchAttentionShape& shape, int threads, int64_t n) {
  SCOPED_TRACE(absl::StrCat(Name(shape, threads), " n=", n));
  ThreadPool pool(threads);
  std::mt19937 rng(99 + n);
  const Inputs in = RandomInputs(shape, n, rng);
  const int64_t hH = shape.heads * shape.head_dim;
  State prefilled(shape), decoded(shape);
  std::vector<float> got(n * hH), want(n * hH);
  PrefillRange(pool, shape, in, 0, n, prefilled, got);
  DecodeRange(pool, shape, in, 0, n, decoded, want);
  for (int64_t t = 0; t < n; ++t) {
    ASSERT_TRUE(Close(absl::MakeConstSpan(got).subspan(t * hH, hH),
                      absl::MakeConstSpan(want).subspan(t * hH, hH)))
        << "position " << t;
  }
  ExpectStatesEqual(shape, prefilled, decoded, "after prefill");
}

TEST(SketchPrefillTest, FromZeroMatchesDecode) {
  for (bool local : {false, true}) {
    for (int64_t r : {4, 5}) {
      for (int threads : {1, 3}) {
        for (int64_t n : {1, 3, 4, 5, 8, 9, 13}) {
          CheckPrefillFromZero(Shape(local, 2, 8, r, 4), threads, n);
        }
      }
    }
  }
}

TEST(SketchPrefillTest, PlainDefaultTileMatchesDecode) {
  // block_size 0: tiles of 256; 300 tokens cross one tile boundary.
  CheckPrefillFromZero(Shape(false, 2, 8, 4, 0), 3, 300);
}

TEST(SketchPrefillTest, Gpt2HeadShapeMatchesDecode) {
  for (bool local : {false, true}) CheckPrefillFromZero(Shape(local, 2, 64, 32, 16), 3, 37);
}

// Prefill in pieces split at `splits` (then decode `extra` more tokens) against one prefill of the
// same tokens and against decode only.
void CheckPieces(const SketchAttentionShape& shape, int threads, int64_t n,
                 const std::vector<int64_t>& splits, int64_t extra) {
  SCOPED_TRACE(absl::StrCat(Name(shape, threads), " n=", n, " splits=", absl::StrJoin(splits, ","),
                            " extra=", extra));
  ThreadPool pool(threads);
  std::mt19937 rng(7 + n + 31 * splits.size());
  const int64_t total = n + extra;
  const Inputs in = RandomInputs(shape, total, rng);
  const int64_t hH = shape.heads * shape.head_dim;
  State pieces(shape), one(shape), decoded(shape);
  std::vector<float> got(total * hH), one_out(total * hH), want(total * hH);
  int64_t from = 0;
  for (int64_t split : splits) {
    PrefillRange(pool, shape, in, from, split, pieces, got);
    from = split;
  }
  PrefillRange(pool, shape, in, from, n, pieces, got);
  PrefillRange(pool, shape, in, 0, n, one, one_out);
  ExpectStatesEqual(shape, pieces, one, "pieces vs one piece");
  DecodeRange(pool, shape, in, n, total, pieces, got);
  DecodeRange(pool, shape, in, n, total, one, one_out);
  DecodeRange(pool, shape, in, 0, total, decoded, want);
  for (int64_t t = 0; t < total; ++t) {
    const auto w = absl::MakeConstSpan(want).subspan(t * hH, hH);
    ASSERT_TRUE(Close(absl::MakeConstSpan(got).subspan(t * hH, hH), w)) << "pieces, position " << t;
    ASSERT_TRUE(Close(absl::MakeConstSpan(one_out).subspan(t * hH, hH), w))
        << "one piece, position " << t;
  }
  ExpectStatesEqual(shape, pieces, decoded, "pieces then decode vs decode only");
  ExpectStatesEqual(shape, one, decoded, "one piece then decode vs decode only");
}

TEST(SketchPrefillTest, PiecesAndDecodeAfterPrefillMatchDecode) {
  for (bool local : {false, true}) {
    for (int64_t r : {4, 5}) {
      for (int threads : {1, 3}) {
        const SketchAttentionShape shape = Shape(local, 2, 8, r, 4);
        CheckPieces(shape, threads, 13, {3}, 3);
        CheckPieces(shape, threads, 13, {3, 6}, 5);
        CheckPieces(shape, threads, 13, {1, 2, 7}, 2);
        CheckPieces(shape, threads, 12, {5, 8}, 4);  // ends at a block end, split at one too
        CheckPieces(shape, threads, 8, {4}, 1);      // aligned pieces, ends at a block end
        CheckPieces(shape, threads, 7, {6}, 6);
        CheckPieces(shape, threads, 4, {}, 9);
        CheckPieces(shape, threads, 9, {}, 4);
      }
    }
  }
}

TEST(SketchPrefillTest, Gpt2HeadShapePieces) {
  for (bool local : {false, true}) {
    CheckPieces(Shape(local, 2, 64, 32, 16), 3, 37, {5, 21}, 12);
    CheckPieces(Shape(local, 2, 64, 32, 16), 3, 32, {16}, 3);
  }
}

// Decode to `start`, prefill n tokens, then decode to a further block start, against decode only,
// for every start and n up to two blocks past a boundary (aligned and not). With b 4 (at most
// kDecodeFoldKeys) a decode step folds a whole block at its start, from the buffer, with the code
// prefill uses, so S must be bitwise equal, not only close; the outputs (readout in another order)
// within tolerance. LazyFold* below cover larger blocks.
TEST(SketchPrefillTest, LocalExactPrefillFromAnyStartIsDecode) {
  constexpr int64_t b = 4;
  for (int64_t r : {3, 32}) {
    const SketchAttentionShape shape = Shape(true, 2, r == 32 ? 64 : 8, r, b);
    ThreadPool pool(3);
    const int64_t hH = shape.heads * shape.head_dim;
    for (int64_t start = 0; start <= 2 * b + 1; ++start) {
      for (int64_t n = 1; n <= 2 * b + 1; ++n) {
        SCOPED_TRACE(absl::StrCat(Name(shape, 3), " start=", start, " n=", n));
        std::mt19937 rng(static_cast<unsigned>(1000 + 37 * start + n));
        const int64_t after = (start + n) / b * b + 2 * b + 1;  // past the next block start
        const Inputs in = RandomInputs(shape, after, rng);
        State mixed(shape), decoded(shape);
        std::vector<float> got(after * hH), want(after * hH);
        DecodeRange(pool, shape, in, 0, start, mixed, got);
        PrefillRange(pool, shape, in, start, start + n, mixed, got);
        DecodeRange(pool, shape, in, 0, start + n, decoded, want);
        ASSERT_EQ(mixed.sketch, decoded.sketch) << "S after the prefill";
        ASSERT_EQ(mixed.sketched, decoded.sketched);
        DecodeRange(pool, shape, in, start + n, after, mixed, got);
        DecodeRange(pool, shape, in, start + n, after, decoded, want);
        ASSERT_EQ(mixed.sketch, decoded.sketch) << "S after decoding on";
        for (int64_t t = start; t < after; ++t) {
          ASSERT_TRUE(Close(absl::MakeConstSpan(got).subspan(t * hH, hH),
                            absl::MakeConstSpan(want).subspan(t * hH, hH)))
              << "position " << t;
        }
        ExpectStatesEqual(shape, mixed, decoded, "decode, prefill, decode vs decode");
      }
    }
  }
}

// --- The lazy fold: a local_exact block folded over its successor's first steps -----------------

// Blocks larger than the 8 keys a decode step folds: the completed block is pending after its
// successor's first step and folded 8 rows per step; every output matches the eager oracle.
TEST(SketchDecodeTest, LazyFoldSpreadsABlockOverTheFirstStepsOfTheNext) {
  constexpr int64_t b = 64;
  for (int64_t h : {64, 8}) {  // the compiled 65-column path and the generic one
    const SketchAttentionShape shape = Shape(true, 2, h, h == 64 ? 32 : 5, b);
    for (int threads : {1, 3}) {
      SCOPED_TRACE(Name(shape, threads));
      ThreadPool pool(threads);
      std::mt19937 rng(4321);
      const int64_t steps = 3 * b + 5;
      const Inputs in = RandomInputs(shape, steps, rng);
      const int64_t hH = shape.heads * shape.head_dim;
      State fast(shape), oracle(shape);
      const SketchSlotState slot = fast.Slot();
      std::vector<float> out(hH), want(hH);
      for (int64_t t = 0; t < steps; ++t) {
        const RowPtrs x = Row(shape, in, t);
        SketchDecode(pool, shape, absl::MakeConstSpan(&t, 1), absl::MakeConstSpan(&slot, 1),
                     x.psi_q, x.psi_k, x.v, x.q_local, x.k_local, out.data());
        OracleStep(shape, t, oracle, x, want.data());
        ASSERT_TRUE(Close(out, want)) << "position " << t;
        const int64_t m = t % b;
        const int64_t expect_pending = t < b ? 0 : std::max<int64_t>(0, b - 8 * (m + 1));
        ASSERT_EQ(fast.pending, expect_pending) << "position " << t;
        ASSERT_LT(m, b - fast.pending) << "the token's row must not be pending";
        ExpectStatesEqual(shape, fast, oracle, absl::StrCat("position ", t));
      }
    }
  }
}

// Sequences at different stages of their folds share one call: each keeps its own plan.
TEST(SketchDecodeTest, LazyFoldBatchAtDifferentStages) {
  CheckDecode(Shape(true, 2, 64, 32, 32), 3, 40, {0, 30, 33, 38, 64});
  CheckDecode(Shape(true, 3, 8, 4, 24), 2, 30, {23, 24, 26, 47});
}

// A prefill that starts while rows are pending folds them first and leaves none; outputs and
// the folded state equal decode only, and decoding on after the prefill folds the next blocks
// lazily again.
TEST(SketchPrefillTest, LazyFoldPendingRowsBeforeAPrefill) {
  constexpr int64_t b = 32;
  const SketchAttentionShape shape = Shape(true, 2, 64, 32, b);
  ThreadPool pool(3);
  const int64_t hH = shape.heads * shape.head_dim;
  for (int64_t start : {b + 1, b + 2, 2 * b + 1, 2 * b + 3}) {
    for (int64_t n : {int64_t{1}, int64_t{2}, b - 3, b, 2 * b + 7}) {
      SCOPED_TRACE(absl::StrCat("start=", start, " n=", n));
      std::mt19937 rng(static_cast<unsigned>(77 + 13 * start + n));
      const int64_t after = (start + n) / b * b + b + 2;  // past the next block start
      const Inputs in = RandomInputs(shape, after, rng);
      State mixed(shape), decoded(shape);
      std::vector<float> got(after * hH), want(after * hH);
      DecodeRange(pool, shape, in, 0, start, mixed, got);
      ASSERT_GT(mixed.pending, 0) << "the case this test is for";
      PrefillRange(pool, shape, in, start, start + n, mixed, got);
      EXPECT_EQ(mixed.pending, 0);
      DecodeRange(pool, shape, in, 0, start + n, decoded, want);
      ExpectStatesEqual(shape, mixed, decoded, "after the prefill");
      DecodeRange(pool, shape, in, start + n, after, mixed, got);
      DecodeRange(pool, shape, in, start + n, after, decoded, want);
      EXPECT_EQ(mixed.pending, decoded.pending);
      EXPECT_GT(decoded.pending, 0) << "decoding on folds lazily again";
      for (int64_t t = start; t < after; ++t) {
        ASSERT_TRUE(Close(absl::MakeConstSpan(got).subspan(t * hH, hH),
                          absl::MakeConstSpan(want).subspan(t * hH, hH)))
            << "position " << t;
      }
      ExpectStatesEqual(shape, mixed, decoded, "decode, prefill, decode vs decode");
    }
  }
}

TEST(SketchPrefillTest, EmptyPrefillIsANoOp) {
  ThreadPool pool(2);
  const SketchAttentionShape shape = Shape(true, 2, 8, 4, 4);
  State st(shape);
  SketchPrefill(pool, shape, 5, 0, st.Slot(), nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
  for (float x : st.sketch) ASSERT_EQ(x, 0.0f);
}

}  // namespace
}  // namespace ps::kernels::cpu
