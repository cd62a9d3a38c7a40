// kernels/cpu/lowp_linear.h: every kernel path this CPU runs against the scalar oracle
// (kernels/reference MatVec on the dequantised weights, in double) at awkward shapes (n, k not
// multiples of the vector width, m = 1 and m > 1, tile +- 1), and the formats' error against the
// fp32 weights within the rounding each format promises. Also: the fp32 path of the CPU backend
// is unchanged bit for bit, and bad weights are refused.
//
// Tolerances, per output element y[i, j], with S = sum_kk |x[i, kk] * wq[j, kk]| (+ |y0| when
// accumulating), wq the dequantised weight:
//   * path vs oracle (same weights): fp32 accumulation of k products, (k + 4) * 2^-24 * S (the
//     classic gamma_k bound on a length-k sum, plus the int8 scale's product, the oracle's own
//     rounding of q * scale to a float, and the accumulate's rounding); the vdpbf16ps path adds
//     2^-16 * S, its split of x into hi + lo bf16 terms.
//   * bf16 vs fp32 weights: rounding to nearest bf16 moves each weight by <= 2^-8 relative, so
//     y moves by <= 2^-8 * sum |x w|, plus the accumulation bound.
//   * int8 vs fp32 weights: each weight moves by <= scale[j] / 2 (half a quantisation step,
//     scale[j] = max |w[j, :]| / 127), so y moves by <= scale[j] / 2 * sum |x|, plus accumulation.
#include "kernels/cpu/lowp_linear.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <absl/strings/str_cat.h>
#include <gtest/gtest.h>

#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/dense.h"
#include "kernels/reference/ops.h"
#include "kernels/weight_quant.h"
#include "tests/testing/status_matchers.h"

namespace ps::kernels::cpu {
namespace {

namespace ref = ::ps::kernels::reference;
using ::ps::test::IsOk;
using ::ps::test::StatusIs;

std::vector<float> Random(int64_t size, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(size));
  for (float& x : v) x = dist(rng);
  return v;
}

// The weights the packed format means, [n, k] fp32 (exact: bf16 and q * scale are floats).
std::vector<float> Dequantize(const std::vector<float>& w, int64_t n, int64_t k,
                              WeightDtype dtype) {
  std::vector<float> out(w.size());
  for (int64_t j = 0; j < n; ++j) {
    const float* row = w.data() + j * k;
    const float scale = Int8RowScale(row, k);
    for (int64_t i = 0; i < k; ++i) {
      out[j * k + i] = dtype == WeightDtype::kBf16
                           ? RoundToBf16(row[i])
                           : static_cast<float>(QuantizeInt8(row[i], scale)) * scale;
    }
  }
  return out;
}

// y [m, n] = x W^T (+ y0) in double via the oracle, and S = sum |x w| (+ |y0|) per element.
void Oracle(const std::vector<float>& x, const std::vector<float>& w, const std::vector<float>& y0,
            int64_t m, int64_t n, int64_t k, bool accumulate, std::vector<double>* y,
            std::vector<double>* s) {
  y->assign(static_cast<size_t>(m * n), 0.0);
  s->assign(static_cast<size_t>(m * n), 0.0);
  std::vector<float> row(static_cast<size_t>(n));
  for (int64_t i = 0; i < m; ++i) {
    ref::MatVec(w, absl::MakeConstSpan(x.data() + i * k, static_cast<size_t>(k)), row.data());
    for (int64_t j = 0; j < n; ++j) {
      double sum_abs = 0.0;
      for (int64_t kk = 0; kk < k; ++kk) sum_abs += std::abs(double{x[i * k + kk]} * w[j * k + kk]);
      (*y)[i * n + j] = row[j] + (accumulate ? y0[i * n + j] : 0.0);
      (*s)[i * n + j] = sum_abs + (accumulate ? std::abs(double{y0[i * n + j]}) : 0.0);
    }
  }
}

class LowpLinearTest : public ::testing::TestWithParam<int> {};  // pool threads

TEST_P(LowpLinearTest, EveryPathMatchesTheScalarOracleAtAwkwardShapes) {
  ThreadPool pool(GetParam());
  const int64_t ms[] = {1, 2, 3, 4, 5, 8, 9, 17, 130};
  const int64_t ns[] = {1, 15, 16, 17, 33, 100};
  const int64_t ks[] = {1, 2, 3, 15, 16, 17, 64, 301};
  uint32_t seed = 1;
  int checked = 0;
  for (const WeightDtype dtype : {WeightDtype::kBf16, WeightDtype::kInt8}) {
    for (int64_t n : ns) {
      for (int64_t k : ks) {
        const std::vector<float> w = Random(n * k, seed++);
        PS_ASSERT_OK_AND_ASSIGN(auto packed, CpuLowpLinearWeight::Create(w, n, k, dtype));
        ASSERT_EQ(packed->dtype(), dtype);
        const std::vector<float> wq = Dequantize(w, n, k, dtype);
        for (int64_t m : ms) {
          const std::vector<float> x = Random(m * k, seed++);
          const std::vector<float> y0 = Random(m * n, seed++);
          for (bool accumulate : {false, true}) {
            std::vector<double> want, s;
            Oracle(x, wq, y0, m, n, k, accumulate, &want, &s);
            for (const LowpIsa isa : SupportedLowpIsas()) {
              std::vector<float> got = y0;
              LinearLowp(pool, x.data(), m, *packed, got.data(), accumulate, isa);
              const bool split_x = isa == LowpIsa::kAvx512Bf16 && dtype == WeightDtype::kBf16;
              int bad = 0;
              for (size_t e = 0; e < got.size(); ++e) {
                const double tol = (static_cast<double>(k) + 4.0) * std::ldexp(1.0, -24) * s[e] +
                                   (split_x ? std::ldexp(1.0, -16) * s[e] : 0.0);
                if (!(std::abs(got[e] - want[e]) <= tol) && ++bad <= 3) {
                  ADD_FAILURE() << WeightDtypeName(dtype) << " " << LowpIsaName(isa) << " m=" << m
                                << " n=" << n << " k=" << k << " acc=" << accumulate << " [" << e
                                << "]: got " << got[e] << " want " << want[e] << " tol " << tol;
                }
              }
              ++checked;
            }
          }
        }
      }
    }
  }
  std::string paths;
  for (const LowpIsa isa : SupportedLowpIsas()) absl::StrAppend(&paths, " ", LowpIsaName(isa));
  std::cout << "[ paths ]" << paths << " (" << checked << " cases)\n";
}

TEST_P(LowpLinearTest, FormatsStayWithinTheirRoundingOfTheFp32Weights) {
  ThreadPool pool(GetParam());
  const int64_t m = 7, n = 45, k = 203;
  const std::vector<float> w = Random(n * k, 11, 0.05f);
  const std::vector<float> x = Random(m * k, 12);
  std::vector<double> want, s;
  Oracle(x, w, {}, m, n, k, false, &want, &s);
  for (const WeightDtype dtype : {WeightDtype::kBf16, WeightDtype::kInt8}) {
    PS_ASSERT_OK_AND_ASSIGN(auto packed, CpuLowpLinearWeight::Create(w, n, k, dtype));
    for (const LowpIsa isa : SupportedLowpIsas()) {
      std::vector<float> got(static_cast<size_t>(m * n));
      LinearLowp(pool, x.data(), m, *packed, got.data(), false, isa);
      double worst_ratio = 0.0;  // error / bound: how much of the bound the format uses
      for (int64_t i = 0; i < m; ++i) {
        double sum_abs_x = 0.0;
        for (int64_t kk = 0; kk < k; ++kk) sum_abs_x += std::abs(x[i * k + kk]);
        for (int64_t j = 0; j < n; ++j) {
          const size_t e = static_cast<size_t>(i * n + j);
          const double accumulation =
              (k + 2.0) * std::ldexp(1.0, -24) * s[e] * 1.01 + std::ldexp(1.0, -16) * s[e];
          const double format = dtype == WeightDtype::kBf16
                                    ? std::ldexp(1.0, -8) * s[e]
                                    : Int8RowScale(w.data() + j * k, k) / 2.0 * sum_abs_x;
          const double err = std::abs(got[e] - want[e]);
          EXPECT_LE(err, format + accumulation)
              << WeightDtypeName(dtype) << " " << LowpIsaName(isa) << " [" << i << ", " << j << "]";
          worst_ratio = std::max(worst_ratio, err / (format + accumulation));
        }
      }
      // The bounds are worst cases; real errors are random-signed and far smaller. A format
      // that ignored its weights entirely would sit at ratio ~ 1 / (2^-8) or more.
      EXPECT_LT(worst_ratio, 0.5) << WeightDtypeName(dtype) << " " << LowpIsaName(isa);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Threads, LowpLinearTest, ::testing::Values(1, 3));

TEST(LowpLinearWeightTest, PacksFewerBytes) {
  const int64_t n = 33, k = 65;
  const std::vector<float> w = Random(n * k, 3);
  PS_ASSERT_OK_AND_ASSIGN(auto bf16, CpuLowpLinearWeight::Create(w, n, k, WeightDtype::kBf16));
  PS_ASSERT_OK_AND_ASSIGN(auto int8, CpuLowpLinearWeight::Create(w, n, k, WeightDtype::kInt8));
  // 3 panels of 16 features; bf16 k padded to 66; int8 adds a 4-byte scale per padded row.
  EXPECT_EQ(bf16->bytes(), 3 * 16 * 66 * 2);
  EXPECT_EQ(int8->bytes(), 3 * 16 * 65 + 3 * 16 * 4);
}

TEST(LowpLinearWeightTest, RefusesBadWeights) {
  std::vector<float> w = Random(6, 4);
  EXPECT_THAT(CpuLowpLinearWeight::Create(w, 2, 4, WeightDtype::kBf16).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "is not [2, 4]"));
  EXPECT_THAT(CpuLowpLinearWeight::Create(w, 2, 3, WeightDtype::kFp32).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "fp32"));
  w[4] = std::numeric_limits<float>::infinity();
  EXPECT_THAT(CpuLowpLinearWeight::Create(w, 2, 3, WeightDtype::kInt8).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "element [1, 1] is inf"));
  w[4] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THAT(CpuLowpLinearWeight::Create(w, 2, 3, WeightDtype::kInt8).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "not finite"));
  // bf16 keeps non-finite values as they are (as the fp32 path does).
  EXPECT_TRUE(CpuLowpLinearWeight::Create(w, 2, 3, WeightDtype::kBf16).ok());
}

TEST(WeightQuantTest, RoundingRules) {
  // Ties to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> 1; 1 + 3 * 2^-8 -> 1 + 2^-6.
  EXPECT_EQ(RoundToBf16(1.0f + std::ldexp(1.0f, -8)), 1.0f);
  EXPECT_EQ(RoundToBf16(1.0f + 3 * std::ldexp(1.0f, -8)), 1.0f + std::ldexp(1.0f, -6));
  EXPECT_EQ(RoundToBf16(-2.5f), -2.5f);
  EXPECT_TRUE(std::isnan(RoundToBf16(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_EQ(RoundToBf16(std::numeric_limits<float>::infinity()),
            std::numeric_limits<float>::infinity());
  const float row[4] = {0.5f, -1.27f, 0.0f, 0.01f};
  const float scale = Int8RowScale(row, 4);
  EXPECT_FLOAT_EQ(scale, 0.01f);
  EXPECT_EQ(QuantizeInt8(-1.27f, scale), -127);
  EXPECT_EQ(QuantizeInt8(0.5f, scale), 50);
  EXPECT_EQ(QuantizeInt8(0.004f, scale), 0);
  const float zeros[3] = {};
  EXPECT_EQ(Int8RowScale(zeros, 3), 0.0f);
  EXPECT_EQ(QuantizeInt8(0.0f, 0.0f), 0);
}

// The CPU backend's fp32 weights take exactly the path they took before issue 19.
TEST(CpuBackendWeightsTest, Fp32PathIsUnchangedBitForBit) {
  CpuBackend backend(2);
  for (const auto& [m, n, k] : std::vector<std::array<int64_t, 3>>{{1, 67, 33}, {13, 129, 300}}) {
    const std::vector<float> w = Random(n * k, 5), x = Random(m * k, 6);
    PS_ASSERT_OK_AND_ASSIGN(auto prepared, backend.PrepareLinear(w, n, k, WeightDtype::kFp32));
    EXPECT_EQ(prepared->dtype(), WeightDtype::kFp32);
    std::vector<float> got(static_cast<size_t>(m * n)), want(got.size());
    backend.Linear(x.data(), m, *prepared, got.data(), false);
    Linear(backend.pool(), x.data(), m, *CpuLinearWeight::Create(w, n, k), want.data(), false);
    EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0);
  }
}

// The backend routes bf16 and int8 weights to LinearLowp on its best path.
TEST(CpuBackendWeightsTest, LowPrecisionWeightsRunOnTheBestPath) {
  CpuBackend backend(2);
  EXPECT_EQ(backend.lowp_isa(), BestLowpIsa());
  const int64_t m = 3, n = 40, k = 50;
  const std::vector<float> w = Random(n * k, 7), x = Random(m * k, 8);
  for (const WeightDtype dtype : {WeightDtype::kBf16, WeightDtype::kInt8}) {
    EXPECT_THAT(backend.CheckWeightDtype(dtype), IsOk());
    PS_ASSERT_OK_AND_ASSIGN(auto prepared, backend.PrepareLinear(w, n, k, dtype));
    ASSERT_EQ(prepared->dtype(), dtype);
    std::vector<float> got(static_cast<size_t>(m * n)), want(got.size());
    backend.Linear(x.data(), m, *prepared, got.data(), false);
    PS_ASSERT_OK_AND_ASSIGN(auto packed, CpuLowpLinearWeight::Create(w, n, k, dtype));
    LinearLowp(backend.pool(), x.data(), m, *packed, want.data(), false, BestLowpIsa());
    EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0);
  }
}

}  // namespace
}  // namespace ps::kernels::cpu
