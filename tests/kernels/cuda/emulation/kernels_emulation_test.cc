// The CUDA kernels of kernels/cuda/*.cu, run by the SIMT emulator (simt_emulator.h) on the CPU,
// against the CPU backend: every launcher of kernels/cuda/kernels.h on awkward shapes, so that the
// kernels' logic is exercised in CI, where no GPU exists. The work splits (decode splits, KV rows)
// are chosen here the way CudaBackend chooses them, with extra split counts. Same tolerances as
// tests/kernels/cuda/cuda_backend_test.cc (fp32, different summation order): 1e-4 of the largest
// magnitude plus 1e-4 relative; caches are compared exactly.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <absl/strings/str_cat.h>
#include <gtest/gtest.h>

#include "kernels/attention_mask.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cuda/kernels.h"
#include "kernels/packed_index.h"
#include "tests/kernels/cuda/sketch_test_util.h"

namespace ps::kernels::cuda {
namespace {

using test::HostSketchState;
using test::MakeHostSketchState;
using test::Random;
using test::SketchInputs;

void ExpectNear(const std::vector<float>& got, const std::vector<float>& want,
                const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double max_abs = 0.0;
  for (float w : want) max_abs = std::max(max_abs, std::fabs(double{w}));
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(double{got[i]} - want[i]);
    if (!(err <= 1e-4 * max_abs + 1e-4 * std::fabs(double{want[i]}))) {
      if (bad++ == 0) first = i;
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " off, first at " << first
                     << " got " << got[first] << " want " << want[first];
}

class KernelsEmulationTest : public ::testing::Test {
 protected:
  cpu::CpuBackend cpu_{2};
};

TEST_F(KernelsEmulationTest, DenseKernels) {
  const int64_t rows = 5, n = 70;
  const std::vector<float> x = Random(rows * n, 1, 3.0f), g = Random(n, 2), b = Random(n, 3);
  std::vector<float> want(rows * n), got = x;
  cpu_.LayerNorm(x.data(), rows, n, g.data(), b.data(), 1e-5f, want.data());
  LaunchLayerNorm(got.data(), rows, n, g.data(), b.data(), 1e-5f, got.data(), nullptr);
  ExpectNear(got, want, "LayerNorm");

  want = x;
  got = x;
  cpu_.Gelu(want.data(), rows * n);
  LaunchGelu(got.data(), rows * n, nullptr);
  ExpectNear(got, want, "Gelu");

  std::vector<float> gated(rows * n / 2), gated_emu(rows * n / 2);
  cpu_.GeluGate(x.data(), rows, n / 2, gated.data());
  LaunchGeluGate(x.data(), rows, n / 2, gated_emu.data(), nullptr);
  ExpectNear(gated_emu, gated, "GeluGate");

  const std::vector<float> y = Random(rows * n, 4);
  cpu_.Multiply(x.data(), y.data(), rows * n, want.data());
  LaunchMultiply(x.data(), y.data(), rows * n, got.data(), nullptr);
  ExpectNear(got, want, "Multiply");
  cpu_.SketchCombine(x.data(), y.data(), rows, n, want.data());
  LaunchSketchCombine(x.data(), y.data(), rows * n, n, got.data(), nullptr);
  ExpectNear(got, want, "SketchCombine");
  want = x;
  got = x;
  cpu_.AddBias(want.data(), rows, n, b.data());
  LaunchAddBias(got.data(), rows, n, b.data(), nullptr);
  ExpectNear(got, want, "AddBias");

  const int64_t d = 10, H = 3, h = 6;
  const std::vector<float> table = Random(7 * d, 5);
  const std::vector<int32_t> tokens = {0, 6, 3};
  const std::vector<int64_t> positions = {0, 5, 70000};
  for (const bool sinusoidal : {true, false}) {
    std::vector<float> e(3 * d), e_emu(3 * d);
    cpu_.Embed(table.data(), d, tokens, positions, sinusoidal, e.data());
    // Without the encoding the kernel must not read positions: pass none.
    LaunchEmbed(table.data(), d, tokens.data(), sinusoidal ? positions.data() : nullptr, 3,
                sinusoidal, e_emu.data(), nullptr);
    ExpectNear(e_emu, e, sinusoidal ? "Embed" : "Embed without pe");
  }
  const std::vector<float> qkv = Random(3 * 3 * H * h, 6);
  for (const bool rope : {true, false}) {
    const std::string what = rope ? "" : " without rope";
    std::vector<float> q(3 * H * h), k(q.size()), v(q.size()), qe(q.size()), ke(q.size()),
        ve(q.size());
    cpu_.SplitQkvRope(qkv.data(), H, h, positions, rope, q.data(), k.data(), v.data());
    LaunchSplitQkvRope(qkv.data(), 3, H, h, rope ? positions.data() : nullptr, rope, qe.data(),
                       ke.data(), ve.data(), nullptr);
    ExpectNear(qe, q, "q" + what);
    ExpectNear(ke, k, "k" + what);
    ExpectNear(ve, v, "v" + what);
    if (rope) continue;
    std::vector<float> rk(k.size()), rk_emu(k.size());
    cpu_.Rope(k.data(), H, h, positions, rk.data());
    LaunchRope(ke.data(), 3, H, h, positions.data(), rk_emu.data(), nullptr);
    ExpectNear(rk_emu, rk, "Rope");
  }

  const std::vector<float> small = {1.0f, -2.5f, 3.0e-3f, 65536.5f};
  std::vector<uint16_t> bf(small.size());
  LaunchF32ToBf16(small.data(), 4, bf.data(), nullptr);
  EXPECT_EQ(bf[0], 0x3f80);  // 1.0
  EXPECT_EQ(bf[1], 0xc020);  // -2.5
}

struct SketchState : HostSketchState {
  SketchSlotPtrs Ptrs() {
    const SketchSlotState x = Slot();
    return {x.sketch, x.local_sketch, x.local_keys, x.local_values, x.local_pending};
  }
};

class SketchEmulationTest : public KernelsEmulationTest {
 protected:
  SketchState MakeState(const SketchAttentionShape& sh, int64_t start, uint32_t seed) {
    SketchState st;
    static_cast<HostSketchState&>(st) = MakeHostSketchState(cpu_, sh, start, seed);
    return st;
  }
};

SketchDims DimsOf(const SketchAttentionShape& s) {
  return {s.heads, s.head_dim, s.sketch_size, s.local_exact, s.block_size};
}

const std::vector<SketchAttentionShape>& SketchShapes() {
  static const std::vector<SketchAttentionShape> shapes = {
      {.heads = 2, .head_dim = 10, .sketch_size = 5, .local_exact = false, .block_size = 0},
      {.heads = 2, .head_dim = 10, .sketch_size = 5, .local_exact = true, .block_size = 7},
      {.heads = 1, .head_dim = 40, .sketch_size = 9, .local_exact = true, .block_size = 4},
  };
  return shapes;
}

TEST_F(SketchEmulationTest, DecodeMatchesCpu) {
  for (const SketchAttentionShape& sh : SketchShapes()) {
    const int64_t b = sh.block_size > 0 ? sh.block_size : 7;
    const std::vector<int64_t> positions = {0, b - 1, b, 2 * b + 1};
    const int64_t B = static_cast<int64_t>(positions.size());
    const int64_t P = PackedSymmetricRows(sh.sketch_size);
    for (int64_t splits : {int64_t{1}, int64_t{3}, P}) {
      SCOPED_TRACE(absl::StrCat("local ", sh.local_exact, " h ", sh.head_dim, " splits ", splits));
      std::vector<SketchState> cpu_states, emu_states;
      for (int64_t i = 0; i < B; ++i) {
        cpu_states.push_back(MakeState(sh, positions[i], 10 + i));
        emu_states.push_back(cpu_states.back());
      }
      SketchInputs in(sh, B, 30);
      const bool l = sh.local_exact;
      std::vector<SketchSlotState> slots;
      std::vector<SketchSlotPtrs> ptrs;
      for (int64_t i = 0; i < B; ++i) {
        slots.push_back(cpu_states[i].Slot());
        ptrs.push_back(emu_states[i].Ptrs());
      }
      std::vector<float> want(B * sh.heads * sh.head_dim), got(want.size());
      cpu_.SketchDecode(sh, positions, slots, in.psi_q.data(), in.psi_k.data(), in.v.data(),
                        l ? in.ql.data() : nullptr, l ? in.kl.data() : nullptr, want.data());
      std::vector<float> partial(B * sh.heads * splits * (sh.head_dim + 1));
      LaunchSketchDecode(DimsOf(sh), B, positions.data(), ptrs.data(), in.psi_q.data(),
                         in.psi_k.data(), in.v.data(), l ? in.ql.data() : nullptr,
                         l ? in.kl.data() : nullptr, got.data(), splits, partial.data(), nullptr);
      ExpectNear(got, want, "decode output");
      for (int64_t i = 0; i < B; ++i) {
        ExpectNear(emu_states[i].s, test::FoldedS(sh, cpu_states[i]), "S");
        ExpectNear(emu_states[i].sketched, cpu_states[i].sketched, "sketched keys");
        ExpectNear(emu_states[i].keys, cpu_states[i].keys, "keys");
        ExpectNear(emu_states[i].values, cpu_states[i].values, "values");
      }
    }
  }
}

TEST_F(SketchEmulationTest, PrefillMatchesCpu) {
  for (const SketchAttentionShape& sh : SketchShapes()) {
    const int64_t b = sh.block_size > 0 ? sh.block_size : 7;
    for (const auto& [start, n] : std::vector<std::pair<int64_t, int64_t>>{
             {0, 1}, {0, 2 * b + 3}, {b - 1, 2}, {b, b}, {3, 40}}) {
      SCOPED_TRACE(absl::StrCat("local ", sh.local_exact, " start ", start, " n ", n));
      SketchState cpu_state = MakeState(sh, start, 50);
      SketchState emu_state = cpu_state;
      SketchInputs in(sh, n, 60);
      const bool l = sh.local_exact;
      std::vector<float> want(n * sh.heads * sh.head_dim), got(want.size());
      cpu_.SketchPrefill(sh, start, n, cpu_state.Slot(), in.psi_q.data(), in.psi_k.data(),
                         in.v.data(), l ? in.ql.data() : nullptr, l ? in.kl.data() : nullptr,
                         want.data());
      LaunchSketchPrefill(DimsOf(sh), start, n, emu_state.Ptrs(), in.psi_q.data(), in.psi_k.data(),
                          in.v.data(), l ? in.ql.data() : nullptr, l ? in.kl.data() : nullptr,
                          got.data(), nullptr);
      ExpectNear(got, want, "prefill output");
      ExpectNear(emu_state.s, cpu_state.s, "S");
      ExpectNear(emu_state.sketched, cpu_state.sketched, "sketched keys");
      ExpectNear(emu_state.keys, cpu_state.keys, "keys");
      ExpectNear(emu_state.values, cpu_state.values, "values");
    }
  }
}

// A state the CPU left with rows pending (its lazy fold; a session restored on a GPU server):
// the GPU's next decode step or prefill folds them all, and outputs and S match the CPU's, whose
// own steps fold them over the next steps. Blocks of 20: 12 rows pending after position 20.
TEST_F(SketchEmulationTest, RowsTheCpuLeftPendingAreFoldedByDecodeAndPrefill) {
  const SketchAttentionShape sh{
      .heads = 2, .head_dim = 10, .sketch_size = 5, .local_exact = true, .block_size = 20};
  const int64_t hH = sh.heads * sh.head_dim;
  for (bool prefill : {false, true}) {
    SCOPED_TRACE(prefill ? "prefill" : "decode");
    SketchState cpu_state;
    static_cast<HostSketchState&>(cpu_state) =
        test::MakeLazyHostSketchState(cpu_, sh, /*start=*/21, /*decoded=*/3, 70);
    ASSERT_EQ(cpu_state.pending, 12);
    SketchState emu_state = cpu_state;
    // Positions 21 and 22: the CPU folds 8 and then 4 rows, the GPU all 12 at once.
    SketchInputs in(sh, 2, 80);
    std::vector<float> want(2 * hH), got(2 * hH);
    if (prefill) {
      cpu_.SketchPrefill(sh, 21, 2, cpu_state.Slot(), in.psi_q.data(), in.psi_k.data(), in.v.data(),
                         in.ql.data(), in.kl.data(), want.data());
      LaunchSketchPrefill(DimsOf(sh), 21, 2, emu_state.Ptrs(), in.psi_q.data(), in.psi_k.data(),
                          in.v.data(), in.ql.data(), in.kl.data(), got.data(), nullptr);
    } else {
      for (int64_t i = 0; i < 2; ++i) {
        const int64_t position = 21 + i;
        const SketchSlotState slot = cpu_state.Slot();
        const SketchSlotPtrs ptrs = emu_state.Ptrs();
        const int64_t rH = sh.heads * sh.sketch_size;
        cpu_.SketchDecode(sh, {&position, 1}, {&slot, 1}, in.psi_q.data() + i * rH,
                          in.psi_k.data() + i * rH, in.v.data() + i * hH, in.ql.data() + i * hH,
                          in.kl.data() + i * hH, want.data() + i * hH);
        std::vector<float> partial(sh.heads * (sh.head_dim + 1));
        LaunchSketchDecode(DimsOf(sh), 1, &position, &ptrs, in.psi_q.data() + i * rH,
                           in.psi_k.data() + i * rH, in.v.data() + i * hH, in.ql.data() + i * hH,
                           in.kl.data() + i * hH, got.data() + i * hH, 1, partial.data(), nullptr);
        EXPECT_EQ(emu_state.pending, 0) << "the GPU folds every pending row in one step";
      }
    }
    EXPECT_EQ(cpu_state.pending, 0);
    EXPECT_EQ(emu_state.pending, 0);
    ExpectNear(got, want, "outputs");
    ExpectNear(emu_state.s, cpu_state.s, "S");
    ExpectNear(emu_state.sketched, cpu_state.sketched, "sketched keys");
  }
}

// --- KV ------------------------------------------------------------------------------------------

struct KvState : test::HostKvState {
  KvSlotPtrs Ptrs() { return {keys.data(), values.data(), positions.data(), &count}; }
};

std::vector<KvAttentionShape> KvShapes() {
  auto list = [](KvWeighting wt, KeyMask mask, int64_t h) {
    return KvAttentionShape{.heads = 2,
                            .head_dim = h,
                            .weighting = wt,
                            .mask = mask,
                            .ring = false,
                            .capacity = mask.MaxKept(400)};
  };
  return {
      list(KvWeighting::kSoftmax, {}, 10),
      list(KvWeighting::kPolynomial, {}, 6),
      list(KvWeighting::kSoftmax, {}, 40),
      {.heads = 2,
       .head_dim = 6,
       .weighting = KvWeighting::kSoftmax,
       .mask = {.kind = KeyMask::Kind::kWindow, .window = 5},
       .ring = true,
       .capacity = 5},
      list(KvWeighting::kSoftmax, {.kind = KeyMask::Kind::kStrided, .window = 4, .stride = 3}, 8),
      list(KvWeighting::kPolynomial, {.kind = KeyMask::Kind::kStrided, .window = 2, .stride = 5},
           6),
      list(KvWeighting::kSoftmax, {.kind = KeyMask::Kind::kFixed, .chunk = 6, .summary = 2}, 8),
  };
}

KvDims DimsOf(const KvAttentionShape& s) {
  return {s.heads, s.head_dim, s.weighting == KvWeighting::kPolynomial, s.mask, s.ring, s.capacity};
}

class KvEmulationTest : public KernelsEmulationTest {
 protected:
  KvState MakeState(const KvAttentionShape& sh, int64_t start, uint32_t seed) {
    KvState st;
    static_cast<test::HostKvState&>(st) = test::MakeHostKvState(cpu_, sh, start, seed);
    return st;
  }
  void ExpectSameCache(const KvAttentionShape& sh, const KvState& got, const KvState& want) {
    EXPECT_EQ(got.count, want.count);
    const int64_t row = sh.heads * sh.head_dim;
    const int64_t rows = sh.ring ? std::min(want.count, sh.capacity) : want.count;
    EXPECT_TRUE(std::equal(want.keys.begin(), want.keys.begin() + rows * row, got.keys.begin()));
    EXPECT_TRUE(
        std::equal(want.values.begin(), want.values.begin() + rows * row, got.values.begin()));
    if (!sh.ring) {
      EXPECT_TRUE(
          std::equal(want.positions.begin(), want.positions.begin() + rows, got.positions.begin()));
    }
  }
};

TEST_F(KvEmulationTest, DecodeMatchesCpu) {
  for (const KvAttentionShape& sh : KvShapes()) {
    const std::vector<int64_t> positions = {0, 5, 6, 13, 300};
    const int64_t B = static_cast<int64_t>(positions.size());
    const int64_t row = sh.heads * sh.head_dim;
    for (int64_t splits : {int64_t{1}, int64_t{3}}) {
      SCOPED_TRACE(absl::StrCat("mask ", static_cast<int>(sh.mask.kind), " ring ", sh.ring, " h ",
                                sh.head_dim, " splits ", splits));
      std::vector<KvState> cpu_states, emu_states;
      for (int64_t i = 0; i < B; ++i) {
        cpu_states.push_back(MakeState(sh, positions[i], 70 + i));
        emu_states.push_back(cpu_states.back());
      }
      // CudaBackend::KvDecode's planning: rows kept before and attended after, from positions.
      std::vector<int64_t> rows(2 * B);
      int64_t max_rows = 1;
      for (int64_t i = 0; i < B; ++i) {
        const int64_t t = positions[i];
        rows[i] = sh.ring ? std::min(t, sh.capacity) : sh.mask.KeptAfter(t);
        rows[B + i] = DecodeAttendedRows(sh.mask, sh.ring, sh.capacity, t);
        max_rows = std::max(max_rows, rows[B + i]);
      }
      const int64_t per_split = (max_rows + splits - 1) / splits;
      const std::vector<float> q = Random(B * row, 90), k = Random(B * row, 91),
                               v = Random(B * row, 92);
      std::vector<KvSlotState> slots;
      std::vector<KvSlotPtrs> ptrs;
      for (int64_t i = 0; i < B; ++i) {
        slots.push_back(cpu_states[i].Slot());
        ptrs.push_back(emu_states[i].Ptrs());
      }
      std::vector<float> want(B * row), got(B * row),
          partial(B * sh.heads * splits * (sh.head_dim + 2));
      cpu_.KvDecode(sh, positions, slots, q.data(), k.data(), v.data(), want.data());
      LaunchKvDecode(DimsOf(sh), B, positions.data(), ptrs.data(), rows.data(), rows.data() + B,
                     q.data(), k.data(), v.data(), got.data(), splits, per_split, partial.data(),
                     nullptr);
      ExpectNear(got, want, "decode output");
      for (int64_t i = 0; i < B; ++i) ExpectSameCache(sh, emu_states[i], cpu_states[i]);
    }
  }
}

TEST_F(KvEmulationTest, PrefillMatchesCpu) {
  for (const KvAttentionShape& sh : KvShapes()) {
    for (const auto& [start, n] :
         std::vector<std::pair<int64_t, int64_t>>{{0, 1}, {0, 37}, {5, 1}, {6, 13}, {17, 70}}) {
      SCOPED_TRACE(absl::StrCat("mask ", static_cast<int>(sh.mask.kind), " ring ", sh.ring,
                                " start ", start, " n ", n));
      const int64_t row = sh.heads * sh.head_dim;
      KvState cpu_state = MakeState(sh, start, 100);
      KvState emu_state = cpu_state;
      const std::vector<float> q = Random(n * row, 110), k = Random(n * row, 111),
                               v = Random(n * row, 112);
      std::vector<float> want(n * row), got(n * row);
      cpu_.KvPrefill(sh, start, n, cpu_state.Slot(), q.data(), k.data(), v.data(), want.data());
      const int64_t old_rows = sh.ring ? std::min(start, sh.capacity) : sh.mask.KeptAfter(start);
      LaunchKvPrefill(DimsOf(sh), start, n, emu_state.Ptrs(), old_rows,
                      CountKept(sh.mask, start + n - 1, start), q.data(), k.data(), v.data(),
                      got.data(), nullptr);
      ExpectNear(got, want, "prefill output");
      ExpectSameCache(sh, emu_state, cpu_state);
    }
  }
}

}  // namespace
}  // namespace ps::kernels::cuda
