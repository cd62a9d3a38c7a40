// The CUDA backend op by op against the CPU backend (the oracle, itself tested against
// kernels/reference/), on random inputs at awkward shapes (odd widths, size 1, block boundaries
// +-1, long caches that split). Every test skips itself (GTEST_SKIP) when no CUDA device is
// visible, so the same binary passes on CPU-only CI and checks the kernels on a GPU machine.
// CountKept and DecodeAttendedRows (host/device closed forms used by the KV kernels) are tested
// on the CPU always.
//
// Tolerances: |gpu - cpu| <= atol + rtol |cpu|, with atol relative to the largest |cpu| of the
// compared tensor:
//   * fp32 ops (everything but Linear): the kernels sum in a different order than the CPU
//     (warp trees, split partials); sums of up to P (h+1) terms differ by a few ulp of the
//     largest term: rtol 1e-4, atol 1e-4 of the max. A wrong fold, row or weight is O(1) off.
//   * Linear, bf16 operands: x and W rounded to 8 significant bits (relative 2^-9 each), fp32
//     accumulation: error ~ 2^-8 |x| |w| sqrt(k); atol 2e-2 of the max, rtol 2e-2.
//   * Linear, fp32 mode (cublasSgemm): rtol/atol 1e-4.
#include "kernels/cuda/cuda_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <absl/strings/match.h>
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

constexpr double kRtol = 1e-4;
constexpr double kAtolOfMax = 1e-4;

// Largest violation of |got - want| <= atol_of_max * max|want| + rtol |want|; <= 1 passes.
void ExpectNear(const std::vector<float>& got, const std::vector<float>& want,
                const std::string& what, double rtol = kRtol, double atol_of_max = kAtolOfMax) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double max_abs = 0.0;
  for (float w : want) max_abs = std::max(max_abs, std::fabs(double{w}));
  const double atol = atol_of_max * std::max(max_abs, 1e-30);
  size_t bad = 0, first = 0;
  double worst = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(double{got[i]} - want[i]);
    const double allowed = atol + rtol * std::fabs(double{want[i]});
    if (!(err <= allowed)) {
      if (bad++ == 0) first = i;
      worst = std::max(worst, err / allowed);
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " off, first at " << first
                     << " got " << got[first] << " want " << want[first] << ", worst " << worst
                     << "x the tolerance";
}

class CudaBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
    auto backend = CudaBackend::Create();
    ASSERT_TRUE(backend.ok()) << backend.status();
    gpu_ = *std::move(backend);
  }

  // A GPU copy of host floats.
  DeviceBuffer Up(const std::vector<float>& host) {
    auto buffer = gpu_->Allocate(static_cast<int64_t>(std::max<size_t>(1, host.size()) * 4));
    EXPECT_TRUE(buffer.ok());
    gpu_->CopyFromHost(host.data(), static_cast<int64_t>(host.size() * 4), buffer->data());
    return *std::move(buffer);
  }
  DeviceBuffer UpBytes(const void* host, size_t bytes) {
    auto buffer = gpu_->Allocate(static_cast<int64_t>(std::max<size_t>(1, bytes)));
    EXPECT_TRUE(buffer.ok());
    gpu_->CopyFromHost(host, static_cast<int64_t>(bytes), buffer->data());
    return *std::move(buffer);
  }
  std::vector<float> Down(const DeviceBuffer& buffer, size_t n) {
    std::vector<float> host(n);
    gpu_->CopyToHost(buffer.data(), static_cast<int64_t>(n * 4), host.data());
    EXPECT_TRUE(gpu_->status().ok()) << gpu_->status();
    return host;
  }
  void DownBytes(const DeviceBuffer& buffer, void* host, size_t bytes) {
    gpu_->CopyToHost(buffer.data(), static_cast<int64_t>(bytes), host);
    EXPECT_TRUE(gpu_->status().ok()) << gpu_->status();
  }

  cpu::CpuBackend cpu_{2};
  std::unique_ptr<CudaBackend> gpu_;
};

TEST(CountKeptTest, MatchesCountingKeptKeys) {
  std::vector<KeyMask> masks;
  masks.push_back(KeyMask{});
  for (int64_t w : {1, 3, 8}) masks.push_back({.kind = KeyMask::Kind::kWindow, .window = w});
  for (int64_t w : {1, 4}) {
    for (int64_t s : {1, 3, 5}) {
      masks.push_back({.kind = KeyMask::Kind::kStrided, .window = w, .stride = s});
    }
  }
  for (int64_t c : {1, 4, 7}) {
    for (int64_t k = 1; k <= c; k += 2) {
      masks.push_back({.kind = KeyMask::Kind::kFixed, .chunk = c, .summary = k});
    }
  }
  for (const KeyMask& mask : masks) {
    for (int64_t i = 0; i < 40; ++i) {
      int64_t count = 0;
      for (int64_t j_end = 0; j_end <= i + 3; ++j_end) {
        ASSERT_EQ(CountKept(mask, i, j_end), count)
            << "kind " << static_cast<int>(mask.kind) << " i " << i << " j_end " << j_end;
        if (mask.Kept(i, j_end)) ++count;
      }
      // The rows a cache holds after position i: what it keeps of [0, i].
      EXPECT_EQ(CountKept(mask, i, i + 1), mask.KeptAfter(i + 1));
      // The rows a decode query at i walks: every one it sees, and no other.
      int64_t seen = 0;
      for (int64_t j = 0; j <= i; ++j) seen += mask.Visible(i, j) ? 1 : 0;
      EXPECT_EQ(DecodeAttendedRows(mask, false, mask.MaxKept(100), i), seen)
          << "kind " << static_cast<int>(mask.kind) << " i " << i;
    }
  }
}

TEST_F(CudaBackendTest, AllocateZeroesAndCopiesRoundTrip) {
  auto buffer = gpu_->Allocate(1000);
  ASSERT_TRUE(buffer.ok());
  std::vector<float> zeros = Down(*buffer, 250);
  EXPECT_TRUE(std::all_of(zeros.begin(), zeros.end(), [](float x) { return x == 0.0f; }));
  const std::vector<float> x = Random(250, 1);
  gpu_->CopyFromHost(x.data(), 1000, buffer->data());
  auto other = gpu_->Allocate(1000);
  ASSERT_TRUE(other.ok());
  gpu_->Copy(buffer->data(), 1000, other->data());
  EXPECT_EQ(Down(*other, 250), x);
  gpu_->Zero(other->f32() + 10, 40);
  std::vector<float> want = x;
  std::fill(want.begin() + 10, want.begin() + 20, 0.0f);
  EXPECT_EQ(Down(*other, 250), want);
  EXPECT_EQ(gpu_->Allocate(int64_t{1} << 50).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(gpu_->Synchronize().ok());
}

// A KV shape the kernels cannot run is refused by CheckShape (Model::Create calls it); an op
// that meets one anyway leaves its output unwritten and reports a passing failure through
// TakeStatus, once, without making the backend fail for good.
TEST_F(CudaBackendTest, ReportsUnrunnableShapesAndFailuresThroughTakeStatus) {
  KvAttentionShape shape{.heads = 1,
                         .head_dim = 264,
                         .weighting = KvWeighting::kSoftmax,
                         .mask = KeyMask{},
                         .ring = false,
                         .capacity = 4};
  EXPECT_EQ(gpu_->CheckShape(shape).code(), absl::StatusCode::kUnimplemented);
  EXPECT_TRUE(
      absl::StrContains(gpu_->CheckShape(shape).message(), "support head_dim up to 256, got 264"))
      << gpu_->CheckShape(shape);
  shape.head_dim = 256;
  EXPECT_TRUE(gpu_->CheckShape(shape).ok());
  EXPECT_TRUE(gpu_->TakeStatus().ok());
  shape.head_dim = 264;
  const int64_t positions[1] = {0};
  const KvSlotState slots[1] = {};
  gpu_->KvDecode(shape, positions, slots, nullptr, nullptr, nullptr, nullptr);
  const absl::Status status = gpu_->TakeStatus();
  EXPECT_EQ(status.code(), absl::StatusCode::kUnimplemented) << status;
  EXPECT_FALSE(gpu_->failed());
  EXPECT_TRUE(gpu_->TakeStatus().ok());  // reported once
  EXPECT_TRUE(gpu_->status().ok());      // not the sticky status
}

// bf16 and int8 weight formats are the CPU backend's (issue 19): refused at the check and at
// PrepareLinear, naming the backend and the format; fp32 is accepted.
TEST_F(CudaBackendTest, RefusesTheCpuOnlyWeightFormats) {
  EXPECT_TRUE(gpu_->CheckWeightDtype(WeightDtype::kFp32).ok());
  const std::vector<float> w = Random(6, 1);
  for (const WeightDtype dtype : {WeightDtype::kBf16, WeightDtype::kInt8}) {
    const absl::Status check = gpu_->CheckWeightDtype(dtype);
    EXPECT_EQ(check.code(), absl::StatusCode::kUnimplemented);
    EXPECT_NE(
        check.message().find(absl::StrCat("the cuda backend has no ", WeightDtypeName(dtype))),
        absl::string_view::npos)
        << check;
    EXPECT_EQ(gpu_->PrepareLinear(w, 2, 3, dtype).status().code(),
              absl::StatusCode::kUnimplemented);
  }
}

// fp16 KV caches are a CPU-backend feature so far: the cuda backend refuses them at load, naming
// the flag, and an op that meets one anyway writes nothing and reports it.
TEST_F(CudaBackendTest, RefusesFp16KvCachesNamingTheFlag) {
  KvAttentionShape shape{.heads = 1,
                         .head_dim = 64,
                         .weighting = KvWeighting::kSoftmax,
                         .mask = KeyMask{},
                         .ring = false,
                         .capacity = 4,
                         .cache_dtype = KvCacheDtype::kFp16};
  const absl::Status refused = gpu_->CheckShape(shape);
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnimplemented);
  EXPECT_TRUE(absl::StrContains(refused.message(), "--kv_cache_dtype fp32")) << refused;
  const int64_t positions[1] = {0};
  const KvSlotState slots[1] = {};
  gpu_->KvDecode(shape, positions, slots, nullptr, nullptr, nullptr, nullptr);
  EXPECT_EQ(gpu_->TakeStatus().code(), absl::StatusCode::kUnimplemented);
  EXPECT_FALSE(gpu_->failed());
  shape.cache_dtype = KvCacheDtype::kFp32;
  EXPECT_TRUE(gpu_->CheckShape(shape).ok());
}

TEST_F(CudaBackendTest, LinearMatchesCpuInBf16AndFp32) {
  auto fp32 = CudaBackend::Create({.device = 0, .gemm = GemmPrecision::kFp32});
  ASSERT_TRUE(fp32.ok());
  for (const auto& [m, n, k] : std::vector<std::array<int64_t, 3>>{
           {1, 1, 1}, {1, 67, 33}, {5, 96, 130}, {37, 300, 64}, {130, 257, 771}}) {
    SCOPED_TRACE(absl::StrCat("m ", m, " n ", n, " k ", k));
    const std::vector<float> w = Random(n * k, 2), x = Random(m * k, 3), y0 = Random(m * n, 4);
    for (bool accumulate : {false, true}) {
      auto cw = cpu_.PrepareLinear(w, n, k, WeightDtype::kFp32);
      ASSERT_TRUE(cw.ok());
      std::vector<float> want = y0;
      cpu_.Linear(x.data(), m, **cw, want.data(), accumulate);
      for (CudaBackend* backend : {gpu_.get(), fp32->get()}) {
        const bool bf16 = backend == gpu_.get();
        auto gw = backend->PrepareLinear(w, n, k, WeightDtype::kFp32);
        ASSERT_TRUE(gw.ok());
        auto xd = backend->Allocate(m * k * 4), yd = backend->Allocate(m * n * 4);
        backend->CopyFromHost(x.data(), m * k * 4, xd->data());
        backend->CopyFromHost(y0.data(), m * n * 4, yd->data());
        backend->Linear(xd->f32(), m, **gw, yd->f32(), accumulate);
        std::vector<float> got(m * n);
        backend->CopyToHost(yd->data(), m * n * 4, got.data());
        ASSERT_TRUE(backend->status().ok()) << backend->status();
        ExpectNear(got, want, bf16 ? "bf16" : "fp32", bf16 ? 2e-2 : 1e-4, bf16 ? 2e-2 : 1e-4);
      }
    }
  }
}

TEST_F(CudaBackendTest, ElementwiseOpsMatchCpu) {
  for (const auto& [rows, n] :
       std::vector<std::pair<int64_t, int64_t>>{{1, 2}, {3, 10}, {37, 64}, {5, 770}}) {
    SCOPED_TRACE(absl::StrCat("rows ", rows, " n ", n));
    const std::vector<float> x = Random(rows * n, 5, 3.0f), g = Random(n, 6), b = Random(n, 7);
    std::vector<float> want(rows * n);
    cpu_.LayerNorm(x.data(), rows, n, g.data(), b.data(), 1e-5f, want.data());
    DeviceBuffer xd = Up(x), gd = Up(g), bd = Up(b);
    gpu_->LayerNorm(xd.f32(), rows, n, gd.f32(), bd.f32(), 1e-5f, xd.f32());  // in place
    ExpectNear(Down(xd, rows * n), want, "LayerNorm");

    std::vector<float> gelu = x;
    cpu_.Gelu(gelu.data(), rows * n);
    DeviceBuffer gelu_d = Up(x);
    gpu_->Gelu(gelu_d.f32(), rows * n);
    ExpectNear(Down(gelu_d, rows * n), gelu, "Gelu");

    const std::vector<float> y = Random(rows * n, 8);
    std::vector<float> prod(rows * n);
    cpu_.Multiply(x.data(), y.data(), rows * n, prod.data());
    DeviceBuffer yd = Up(y), pd = Up(x);
    gpu_->Multiply(pd.f32(), yd.f32(), rows * n, pd.f32());  // out aliases a
    ExpectNear(Down(pd, rows * n), prod, "Multiply");

    std::vector<float> psi(rows * n);
    cpu_.SketchCombine(x.data(), y.data(), rows, n, psi.data());
    DeviceBuffer x2 = Up(x);
    gpu_->SketchCombine(x2.f32(), yd.f32(), rows, n, x2.f32());
    ExpectNear(Down(x2, rows * n), psi, "SketchCombine");

    std::vector<float> biased = x;
    cpu_.AddBias(biased.data(), rows, n, b.data());
    DeviceBuffer x3 = Up(x);
    gpu_->AddBias(x3.f32(), rows, n, bd.f32());
    ExpectNear(Down(x3, rows * n), biased, "AddBias");

    if (n % 2 == 0) {
      const std::vector<float> up = Random(rows * n, 9, 4.0f);  // [rows, 2F], F = n / 2
      std::vector<float> gated(rows * n / 2);
      cpu_.GeluGate(up.data(), rows, n / 2, gated.data());
      DeviceBuffer upd = Up(up), gd2 = Up(std::vector<float>(rows * n / 2));
      gpu_->GeluGate(upd.f32(), rows, n / 2, gd2.f32());
      ExpectNear(Down(gd2, rows * n / 2), gated, "GeluGate");
    }
  }
}

TEST_F(CudaBackendTest, EmbedAndSplitQkvRopeMatchCpu) {
  const int64_t V = 11, d = 24, H = 3, h = 8;
  const std::vector<float> table = Random(V * d, 10);
  const std::vector<int32_t> tokens = {0, 10, 3, 3, 7};
  const std::vector<int64_t> positions = {0, 1, 4095, 100000, 7};
  DeviceBuffer td = Up(table);
  for (const bool sinusoidal : {true, false}) {
    const std::string what = sinusoidal ? "Embed" : "Embed without pe";
    std::vector<float> want(tokens.size() * d);
    cpu_.Embed(table.data(), d, tokens, positions, sinusoidal, want.data());
    DeviceBuffer xd = Up(std::vector<float>(want.size()));
    gpu_->Embed(td.f32(), d, tokens, positions, sinusoidal, xd.f32());
    ExpectNear(Down(xd, want.size()), want, what);
  }

  const int64_t m = static_cast<int64_t>(positions.size()), D = H * h;
  const std::vector<float> qkv = Random(m * 3 * D, 11);
  DeviceBuffer qkvd = Up(qkv);
  for (const bool rope : {true, false}) {
    const std::string what = rope ? "" : " without rope";
    std::vector<float> q(m * D), k(m * D), v(m * D);
    cpu_.SplitQkvRope(qkv.data(), H, h, positions, rope, q.data(), k.data(), v.data());
    DeviceBuffer qd = Up(std::vector<float>(q.size())), kd = Up(std::vector<float>(k.size())),
                 vd = Up(std::vector<float>(v.size()));
    gpu_->SplitQkvRope(qkvd.f32(), H, h, positions, rope, qd.f32(), kd.f32(), vd.f32());
    ExpectNear(Down(qd, q.size()), q, "q" + what);
    ExpectNear(Down(kd, k.size()), k, "k" + what);
    ExpectNear(Down(vd, v.size()), v, "v" + what);
    if (rope) continue;
    // Rope of the unrotated q: the local block's input under "local_rope".
    std::vector<float> rq(q.size());
    cpu_.Rope(q.data(), H, h, positions, rq.data());
    DeviceBuffer rqd = Up(std::vector<float>(q.size()));
    gpu_->Rope(qd.f32(), H, h, positions, rqd.f32());
    ExpectNear(Down(rqd, rq.size()), rq, "Rope");
  }
}

// --- polysketch ----------------------------------------------------------------------------------

struct SketchCase {
  SketchAttentionShape shape;
  std::string name;
};

std::vector<SketchCase> SketchCases() {
  return {
      {{.heads = 3, .head_dim = 10, .sketch_size = 5, .local_exact = false, .block_size = 0},
       "plain_odd"},
      {{.heads = 3, .head_dim = 10, .sketch_size = 5, .local_exact = true, .block_size = 7},
       "local_odd"},
      {{.heads = 2, .head_dim = 64, .sketch_size = 32, .local_exact = true, .block_size = 16},
       "local_gpt2_head"},
      {{.heads = 1, .head_dim = 64, .sketch_size = 32, .local_exact = false, .block_size = 64},
       "plain_r32"},
  };
}

// One sequence's polysketch state on both backends.
// A host state (the CPU backend's) and its mirror on the GPU.
struct SketchState : HostSketchState {
  DeviceBuffer ds, dsketched, dkeys, dvalues, dpending;
  SketchSlotState CpuSlot() { return Slot(); }
  SketchSlotState GpuSlot() {
    return {ds.f32(), sketched.empty() ? nullptr : dsketched.f32(),
            keys.empty() ? nullptr : dkeys.f32(), values.empty() ? nullptr : dvalues.f32(),
            sketched.empty() ? nullptr : static_cast<int64_t*>(dpending.data())};
  }
};

class CudaSketchTest : public CudaBackendTest {
 protected:
  // A state holding `start` random tokens, built by the CPU backend, mirrored to the GPU.
  SketchState MakeState(const SketchAttentionShape& sh, int64_t start, uint32_t seed) {
    SketchState st;
    static_cast<HostSketchState&>(st) = MakeHostSketchState(cpu_, sh, start, seed);
    Mirror(sh, st);
    return st;
  }
  // The GPU copy of st's host arrays.
  void Mirror(const SketchAttentionShape& sh, SketchState& st) {
    st.ds = Up(st.s);
    if (sh.local_exact) {
      st.dsketched = Up(st.sketched);
      st.dkeys = Up(st.keys);
      st.dvalues = Up(st.values);
      st.dpending = UpBytes(&st.pending, sizeof(st.pending));
    }
  }
  int64_t GpuPending(const SketchState& st) {
    int64_t pending = -1;
    DownBytes(st.dpending, &pending, sizeof(pending));
    return pending;
  }
  // The GPU state against the host one; S with any rows the CPU left pending folded in (the GPU
  // folds them all at once).
  void ExpectSameState(const SketchAttentionShape& sh, SketchState& st, const std::string& what) {
    ExpectNear(Down(st.ds, st.s.size()), test::FoldedS(sh, st), what + " S");
    if (!st.sketched.empty()) {
      ExpectNear(Down(st.dsketched, st.sketched.size()), st.sketched, what + " sketched keys");
      ExpectNear(Down(st.dkeys, st.keys.size()), st.keys, what + " local keys");
      ExpectNear(Down(st.dvalues, st.values.size()), st.values, what + " local values");
    }
  }
};

TEST_F(CudaSketchTest, DecodeMatchesCpuAcrossBlockBoundaries) {
  for (const SketchCase& c : SketchCases()) {
    const SketchAttentionShape& sh = c.shape;
    const int64_t b = sh.block_size > 0 ? sh.block_size : 7;
    // Positions: empty state, mid-block, last of a block, first of the next (the fold), later.
    for (const std::vector<int64_t>& positions :
         std::vector<std::vector<int64_t>>{{0}, {b - 1, b, b + 1}, {3 * b, 2, 5 * b - 1, 1}}) {
      SCOPED_TRACE(absl::StrCat(c.name, " first position ", positions[0]));
      const int64_t B = static_cast<int64_t>(positions.size());
      std::vector<SketchState> states;
      for (int64_t i = 0; i < B; ++i) states.push_back(MakeState(sh, positions[i], 20 + i));
      SketchInputs in(sh, B, 40);
      std::vector<SketchSlotState> cpu_slots, gpu_slots;
      for (auto& st : states) {
        cpu_slots.push_back(st.CpuSlot());
        gpu_slots.push_back(st.GpuSlot());
      }
      std::vector<float> want(B * sh.heads * sh.head_dim);
      const bool l = sh.local_exact;
      cpu_.SketchDecode(sh, positions, cpu_slots, in.psi_q.data(), in.psi_k.data(), in.v.data(),
                        l ? in.ql.data() : nullptr, l ? in.kl.data() : nullptr, want.data());
      DeviceBuffer pq = Up(in.psi_q), pk = Up(in.psi_k), v = Up(in.v), ql = Up(in.ql),
                   kl = Up(in.kl), out = Up(std::vector<float>(want.size()));
      gpu_->SketchDecode(sh, positions, gpu_slots, pq.f32(), pk.f32(), v.f32(),
                         l ? ql.f32() : nullptr, l ? kl.f32() : nullptr, out.f32());
      ExpectNear(Down(out, want.size()), want, "decode output");
      for (int64_t i = 0; i < B; ++i) {
        ExpectSameState(sh, states[i], absl::StrCat("sequence ", i));
      }
    }
  }
}

TEST_F(CudaSketchTest, PrefillMatchesCpuFromAnyStart) {
  for (const SketchCase& c : SketchCases()) {
    const SketchAttentionShape& sh = c.shape;
    const int64_t b = sh.block_size > 0 ? sh.block_size : 7;
    for (const auto& [start, n] : std::vector<std::pair<int64_t, int64_t>>{
             {0, 1}, {0, 2 * b + 3}, {b - 1, 2}, {b, b}, {3, 300}}) {
      SCOPED_TRACE(absl::StrCat(c.name, " start ", start, " n ", n));
      SketchState st = MakeState(sh, start, 60);
      SketchInputs in(sh, n, 70);
      const bool l = sh.local_exact;
      std::vector<float> want(n * sh.heads * sh.head_dim);
      cpu_.SketchPrefill(sh, start, n, st.CpuSlot(), in.psi_q.data(), in.psi_k.data(), in.v.data(),
                         l ? in.ql.data() : nullptr, l ? in.kl.data() : nullptr, want.data());
      DeviceBuffer pq = Up(in.psi_q), pk = Up(in.psi_k), v = Up(in.v), ql = Up(in.ql),
                   kl = Up(in.kl), out = Up(std::vector<float>(want.size()));
      gpu_->SketchPrefill(sh, start, n, st.GpuSlot(), pq.f32(), pk.f32(), v.f32(),
                          l ? ql.f32() : nullptr, l ? kl.f32() : nullptr, out.f32());
      ExpectNear(Down(out, want.size()), want, "prefill output");
      ExpectSameState(sh, st, "prefill");
    }
  }
}

// A state the CPU left with rows pending (its lazy fold; a session moved from a CPU server): the
// GPU folds them all in its next decode step or at the start of a prefill, and matches the CPU,
// which folds them over its next steps. GPT-2 head shape, blocks of 64: 56 rows pending.
TEST_F(CudaSketchTest, RowsTheCpuLeftPendingAreFoldedByDecodeAndPrefill) {
  const SketchAttentionShape sh{
      .heads = 2, .head_dim = 64, .sketch_size = 32, .local_exact = true, .block_size = 64};
  const int64_t hH = sh.heads * sh.head_dim, rH = sh.heads * sh.sketch_size;
  for (bool prefill : {false, true}) {
    SCOPED_TRACE(prefill ? "prefill" : "decode");
    SketchState st;
    static_cast<HostSketchState&>(st) = test::MakeLazyHostSketchState(cpu_, sh, 65, 2, 90);
    ASSERT_EQ(st.pending, 56);
    Mirror(sh, st);
    const int64_t n = 9;  // the CPU's pending rows run out at position 71
    SketchInputs in(sh, n, 91);
    std::vector<float> want(n * hH);
    DeviceBuffer pq = Up(in.psi_q), pk = Up(in.psi_k), v = Up(in.v), ql = Up(in.ql), kl = Up(in.kl),
                 out = Up(std::vector<float>(want.size()));
    if (prefill) {
      cpu_.SketchPrefill(sh, 65, n, st.CpuSlot(), in.psi_q.data(), in.psi_k.data(), in.v.data(),
                         in.ql.data(), in.kl.data(), want.data());
      gpu_->SketchPrefill(sh, 65, n, st.GpuSlot(), pq.f32(), pk.f32(), v.f32(), ql.f32(), kl.f32(),
                          out.f32());
    } else {
      const SketchSlotState cpu_slot = st.CpuSlot(), gpu_slot = st.GpuSlot();
      for (int64_t i = 0; i < n; ++i) {
        const int64_t position = 65 + i;
        cpu_.SketchDecode(sh, {&position, 1}, {&cpu_slot, 1}, in.psi_q.data() + i * rH,
                          in.psi_k.data() + i * rH, in.v.data() + i * hH, in.ql.data() + i * hH,
                          in.kl.data() + i * hH, want.data() + i * hH);
        gpu_->SketchDecode(sh, {&position, 1}, {&gpu_slot, 1}, pq.f32() + i * rH, pk.f32() + i * rH,
                           v.f32() + i * hH, ql.f32() + i * hH, kl.f32() + i * hH,
                           out.f32() + i * hH);
        EXPECT_EQ(GpuPending(st), 0) << "position " << position;
      }
    }
    EXPECT_EQ(st.pending, 0);
    EXPECT_EQ(GpuPending(st), 0);
    ExpectNear(Down(out, want.size()), want, "outputs");
    ExpectSameState(sh, st, "after the pending rows");
  }
}

// --- KV caches -----------------------------------------------------------------------------------

struct KvCase {
  KvAttentionShape shape;
  std::string name;
};

std::vector<KvCase> KvCases(int64_t max_positions) {
  auto list = [&](KvWeighting wt, KeyMask mask, int64_t h) {
    return KvAttentionShape{.heads = 3,
                            .head_dim = h,
                            .weighting = wt,
                            .mask = mask,
                            .ring = false,
                            .capacity = mask.MaxKept(max_positions)};
  };
  return {
      {list(KvWeighting::kSoftmax, {}, 10), "softmax"},
      {list(KvWeighting::kSoftmax, {}, 64), "softmax_h64"},
      {list(KvWeighting::kPolynomial, {}, 10), "polynomial"},
      {{.heads = 2,
        .head_dim = 6,
        .weighting = KvWeighting::kSoftmax,
        .mask = {.kind = KeyMask::Kind::kWindow, .window = 5},
        .ring = true,
        .capacity = 5},
       "sliding_window"},
      {list(KvWeighting::kSoftmax, {.kind = KeyMask::Kind::kStrided, .window = 4, .stride = 3}, 8),
       "strided"},
      {list(KvWeighting::kSoftmax, {.kind = KeyMask::Kind::kFixed, .chunk = 6, .summary = 2}, 8),
       "fixed"},
  };
}

// One sequence's KV cache on both backends.
struct KvState : test::HostKvState {
  DeviceBuffer dkeys, dvalues, dpositions, dcount;
  KvSlotState CpuSlot() { return Slot(); }
  KvSlotState GpuSlot() {
    return {dkeys.f32(), dvalues.f32(), reinterpret_cast<int64_t*>(dpositions.data()),
            reinterpret_cast<int64_t*>(dcount.data())};
  }
};

class CudaKvTest : public CudaBackendTest {
 protected:
  KvState MakeState(const KvAttentionShape& sh, int64_t start, uint32_t seed) {
    KvState st;
    static_cast<test::HostKvState&>(st) = test::MakeHostKvState(cpu_, sh, start, seed);
    st.dkeys = Up(st.keys);
    st.dvalues = Up(st.values);
    st.dpositions = UpBytes(st.positions.data(), st.positions.size() * 8);
    st.dcount = UpBytes(&st.count, 8);
    return st;
  }
  void ExpectSameCache(const KvAttentionShape& sh, KvState& st, const std::string& what) {
    int64_t count = -1;
    DownBytes(st.dcount, &count, 8);
    EXPECT_EQ(count, st.count) << what;
    const int64_t row = sh.heads * sh.head_dim;
    const int64_t rows = sh.ring ? std::min(st.count, sh.capacity) : st.count;
    std::vector<float> keys = Down(st.dkeys, st.keys.size());
    std::vector<float> values = Down(st.dvalues, st.values.size());
    keys.resize(rows * row);
    values.resize(rows * row);
    // The cache contents are copies, so they must be equal exactly.
    EXPECT_EQ(keys, std::vector<float>(st.keys.begin(), st.keys.begin() + rows * row)) << what;
    EXPECT_EQ(values, std::vector<float>(st.values.begin(), st.values.begin() + rows * row))
        << what;
    if (!sh.ring) {
      std::vector<int64_t> positions(st.positions.size());
      DownBytes(st.dpositions, positions.data(), positions.size() * 8);
      positions.resize(rows);
      EXPECT_EQ(positions, std::vector<int64_t>(st.positions.begin(), st.positions.begin() + rows))
          << what;
    }
  }
};

TEST_F(CudaKvTest, DecodeMatchesCpuForEveryMaskAndLongCaches) {
  for (const KvCase& c : KvCases(2048)) {
    const KvAttentionShape& sh = c.shape;
    for (const std::vector<int64_t>& positions :
         std::vector<std::vector<int64_t>>{{0}, {1, 5, 6, 12}, {700}, {1500, 3, 13}}) {
      SCOPED_TRACE(absl::StrCat(c.name, " first position ", positions[0]));
      const int64_t B = static_cast<int64_t>(positions.size());
      const int64_t row = sh.heads * sh.head_dim;
      std::vector<KvState> states;
      for (int64_t i = 0; i < B; ++i) states.push_back(MakeState(sh, positions[i], 80 + i));
      const std::vector<float> q = Random(B * row, 90), k = Random(B * row, 91),
                               v = Random(B * row, 92);
      std::vector<KvSlotState> cpu_slots, gpu_slots;
      for (auto& st : states) {
        cpu_slots.push_back(st.CpuSlot());
        gpu_slots.push_back(st.GpuSlot());
      }
      std::vector<float> want(B * row);
      cpu_.KvDecode(sh, positions, cpu_slots, q.data(), k.data(), v.data(), want.data());
      DeviceBuffer qd = Up(q), kd = Up(k), vd = Up(v), out = Up(std::vector<float>(B * row));
      gpu_->KvDecode(sh, positions, gpu_slots, qd.f32(), kd.f32(), vd.f32(), out.f32());
      ExpectNear(Down(out, want.size()), want, "decode output");
      for (int64_t i = 0; i < B; ++i) ExpectSameCache(sh, states[i], absl::StrCat("sequence ", i));
    }
  }
}

// One test per KvCase: under the SIMT emulator each case but sliding_window takes about a minute
// (five minutes for the lot), so as separate ctest entries they run side by side.
class CudaKvPrefillTest : public CudaKvTest, public ::testing::WithParamInterface<size_t> {};

TEST_P(CudaKvPrefillTest, MatchesCpuFromAnyStart) {
  const KvCase c = KvCases(2048)[GetParam()];
  const KvAttentionShape& sh = c.shape;
  for (const auto& [start, n] : std::vector<std::pair<int64_t, int64_t>>{
           {0, 1}, {0, 37}, {5, 1}, {6, 13}, {17, 300}, {1000, 40}}) {
    SCOPED_TRACE(absl::StrCat(c.name, " start ", start, " n ", n));
    const int64_t row = sh.heads * sh.head_dim;
    KvState st = MakeState(sh, start, 100);
    const std::vector<float> q = Random(n * row, 110), k = Random(n * row, 111),
                             v = Random(n * row, 112);
    std::vector<float> want(n * row);
    cpu_.KvPrefill(sh, start, n, st.CpuSlot(), q.data(), k.data(), v.data(), want.data());
    DeviceBuffer qd = Up(q), kd = Up(k), vd = Up(v), out = Up(std::vector<float>(n * row));
    gpu_->KvPrefill(sh, start, n, st.GpuSlot(), qd.f32(), kd.f32(), vd.f32(), out.f32());
    ExpectNear(Down(out, want.size()), want, "prefill output");
    ExpectSameCache(sh, st, "prefill");
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaKvPrefillTest,
                         ::testing::Range<size_t>(0, KvCases(2048).size()),
                         [](const ::testing::TestParamInfo<size_t>& param_info) {
                           return KvCases(2048)[param_info.param].name;
                         });

}  // namespace
}  // namespace ps::kernels::cuda
