// The scalar reference ops against their definitions (algorithm.md sections 1, 2, 4): each test
// recomputes the op from its formula in the most direct way and compares.
#include "kernels/reference/ops.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "base/check.h"

namespace ps::kernels::reference {
namespace {

std::vector<float> RandomVector(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

// The ops' size preconditions are PS_DCHECKs (base/check.h): where the build has them on (the
// sanitizer and fuzz builds), a caller that breaks one stops there instead of reading past a
// buffer.
TEST(OpsDeathTest, ABrokenSizePreconditionAbortsWhereChecksAreOn) {
  if constexpr (!kDcheckIsOn) {
    SUCCEED() << "PS_DCHECK is off in this build";
  } else {
    GTEST_FLAG_SET(death_test_style, "threadsafe");
    const std::vector<float> a(4, 1.0f), b(3, 1.0f);
    EXPECT_DEATH(Dot(a, b), "PS_DCHECK failed: a.size\\(\\) == b.size\\(\\)");
  }
}

TEST(OpsTest, LayerNormHasZeroMeanUnitVarianceBeforeTheAffine) {
  const std::vector<float> x = RandomVector(37, 1, 3.0f);
  const std::vector<float> ones(37, 1.0f), zeros(37, 0.0f);
  std::vector<float> y(37);
  LayerNorm(x, ones, zeros, 1e-5, y.data());
  double mean = 0.0, var = 0.0;
  for (float v : y) mean += v;
  mean /= 37;
  for (float v : y) var += (v - mean) * (v - mean);
  var /= 37;
  EXPECT_NEAR(mean, 0.0, 1e-6);  // fp32 outputs
  // eps = 1e-5 against a variance of ~9 shrinks the result by ~5.6e-7 relative; fp32 rounding.
  EXPECT_NEAR(var, 1.0, 1e-5);

  // The affine part: y = n * w + b elementwise.
  const std::vector<float> w = RandomVector(37, 2), b = RandomVector(37, 3);
  std::vector<float> z(37);
  LayerNorm(x, w, b, 1e-5, z.data());
  for (size_t i = 0; i < 37; ++i) EXPECT_NEAR(z[i], y[i] * w[i] + b[i], 1e-5) << i;
}

TEST(OpsTest, RopeAtPositionZeroIsTheDeinterleavePermutation) {
  const std::vector<float> x = {1, 2, 3, 4, 5, 6, 7, 8};
  std::vector<float> y(8);
  Rope(x, 0, y.data());
  EXPECT_THAT(y, ::testing::ElementsAre(1, 3, 5, 7, 2, 4, 6, 8));
}

TEST(OpsTest, RopePreservesTheNormAndRotatesEachPair) {
  const std::vector<float> x = RandomVector(16, 4);
  std::vector<float> y(16);
  for (int64_t t : {1, 7, 1000, 123456}) {
    Rope(x, t, y.data());
    double nx = 0.0, ny = 0.0;
    for (size_t i = 0; i < 16; ++i) {
      nx += double{x[i]} * x[i];
      ny += double{y[i]} * y[i];
    }
    EXPECT_NEAR(ny, nx, 1e-5 * nx) << "t=" << t;  // fp32 rounding of each output
    // Pair i is rotated by t * 10000^(-2i/h).
    for (size_t i = 0; i < 8; ++i) {
      const double angle = static_cast<double>(t) * std::pow(10000.0, -2.0 * i / 16.0);
      const double want0 = x[2 * i] * std::cos(angle) - x[2 * i + 1] * std::sin(angle);
      const double want1 = x[2 * i + 1] * std::cos(angle) + x[2 * i] * std::sin(angle);
      EXPECT_NEAR(y[i], want0, 1e-6) << "t=" << t << " i=" << i;
      EXPECT_NEAR(y[8 + i], want1, 1e-6) << "t=" << t << " i=" << i;
    }
  }
}

TEST(OpsTest, RopeDotProductDependsOnlyOnTheOffset) {
  const std::vector<float> q = RandomVector(16, 5), k = RandomVector(16, 6);
  std::vector<float> qa(16), ka(16), qb(16), kb(16);
  Rope(q, 10, qa.data());
  Rope(k, 3, ka.data());
  Rope(q, 107, qb.data());
  Rope(k, 100, kb.data());
  EXPECT_NEAR(Dot(qa, ka), Dot(qb, kb), 1e-4);  // fp32 rotations of unit-scale vectors
}

TEST(OpsTest, SinusoidalMatchesTheFormula) {
  std::vector<double> pe(6);
  Sinusoidal(5, 6, pe.data());
  for (int i = 0; i < 3; ++i) {
    const double angle = 5.0 * std::pow(10000.0, -i / 3.0);
    EXPECT_DOUBLE_EQ(pe[2 * i], std::sin(angle));
    EXPECT_DOUBLE_EQ(pe[2 * i + 1], std::cos(angle));
  }
}

TEST(OpsTest, MatVecIsRowMajorOutIn) {
  const std::vector<float> w = {1, 2, 3, 4, 5, 6};  // [2, 3]
  const std::vector<float> x = {1, 10, 100};
  std::vector<float> y(2);
  MatVec(w, x, y.data());
  EXPECT_THAT(y, ::testing::ElementsAre(321, 654));
}

TEST(OpsTest, Pow4IsExact) {
  EXPECT_EQ(Pow4(3.0), 81.0);
  EXPECT_EQ(Pow4(-2.0f), 16.0f);
  EXPECT_EQ(Pow4(0.5), 0.0625);
  const double x = 1.1;
  EXPECT_EQ(Pow4(x), (x * x) * (x * x));
}

TEST(OpsTest, GeluTanhMatchesTheFormula) {
  for (double x : {-3.0, -1.0, -0.1, 0.0, 0.5, 2.0, 10.0}) {
    const double want =
        0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
    EXPECT_NEAR(GeluTanh(x), want, 1e-15 * std::max(1.0, std::fabs(want))) << x;
  }
  EXPECT_EQ(GeluTanh(0.0), 0.0);
}

TEST(OpsTest, SoftmaxSumsToOneAndIgnoresMinusInfinity) {
  const float kInf = std::numeric_limits<float>::infinity();
  std::vector<float> x = {1.0f, -kInf, 3.0f, 1000.0f, -kInf};
  Softmax(absl::Span<float>(x));
  EXPECT_EQ(x[1], 0.0f);
  EXPECT_EQ(x[4], 0.0f);
  EXPECT_NEAR(x[0] + x[2] + x[3], 1.0, 1e-6);
  EXPECT_NEAR(x[3], 1.0, 1e-6);  // no overflow from the large entry

  std::vector<float> y = {0.0f, std::log(3.0f)};
  Softmax(absl::Span<float>(y));
  EXPECT_NEAR(y[0], 0.25, 1e-7);
  EXPECT_NEAR(y[1], 0.75, 1e-7);
}

TEST(OpsTest, RandomSketchPsiIsTheProductOfTwoProjectionsOfTheNormalisedInput) {
  const size_t h = 6, r = 3;
  const std::vector<float> x = RandomVector(h, 7), w = RandomVector(h, 8), b = RandomVector(h, 9);
  const std::vector<float> s1 = RandomVector(h * r, 10), s2 = RandomVector(h * r, 11);
  std::vector<float> xn(h), psi(r);
  LayerNorm(x, w, b, 1e-5, xn.data());
  RandomSketchPsi(x, w, b, 1e-5, s1, s2, psi.data());
  for (size_t a = 0; a < r; ++a) {
    double p1 = 0.0, p2 = 0.0;
    for (size_t i = 0; i < h; ++i) {
      p1 += double{xn[i]} * s1[i * r + a];
      p2 += double{xn[i]} * s2[i * r + a];
    }
    EXPECT_NEAR(psi[a], p1 * p2, 1e-5 * std::max(1.0, std::fabs(p1 * p2))) << a;
  }
}

TEST(OpsTest, LearnedSketchPsiIsBoundedBySqrtR) {
  const size_t h = 4, r = 2;
  std::vector<std::vector<float>> store;
  auto level = [&](size_t in, uint32_t seed) {
    store.push_back(std::vector<float>(in, 1.0f));
    store.push_back(std::vector<float>(in, 0.0f));
    store.push_back(RandomVector(8 * r * in, seed, 3.0f));
    store.push_back(RandomVector(r * 8 * r, seed + 1, 3.0f));
    const size_t n = store.size();
    return LearnedSketchLevel{store[n - 4], store[n - 3], store[n - 2], store[n - 1]};
  };
  store.reserve(16);
  LearnedSketchWeights weights{{level(h, 20), level(r, 22)}, {level(h, 24), level(r, 26)}};
  const std::vector<float> x = RandomVector(h, 12);
  std::vector<float> psi(r);
  LearnedSketchPsi(x, weights, 1e-5, psi.data());
  for (float p : psi) {
    EXPECT_LE(std::fabs(p), std::sqrt(2.0f) + 1e-6f);
    EXPECT_TRUE(std::isfinite(p));
  }
}

TEST(OpsTest, PackedReadoutEqualsTheUnpackedDoubleSum) {
  for (int64_t r : {1, 3, 8}) {
    SCOPED_TRACE(r);
    const size_t h = 5;
    // Unpacked S[a, c, :] = sum over tokens of psi_k[a] psi_k[c] [v; 1].
    std::vector<double> full(r * r * (h + 1), 0.0);
    std::vector<float> packed(PackedSymmetricRows(r) * (h + 1), 0.0f);
    for (uint32_t token = 0; token < 4; ++token) {
      const std::vector<float> psi = RandomVector(r, 100 + token), v = RandomVector(h, 200 + token);
      SketchUpdate(psi, v, absl::Span<float>(packed));
      for (int64_t a = 0; a < r; ++a) {
        for (int64_t c = 0; c < r; ++c) {
          for (size_t j = 0; j <= h; ++j) {
            full[(a * r + c) * (h + 1) + j] += double{psi[a]} * psi[c] * (j < h ? v[j] : 1.0);
          }
        }
      }
    }
    const std::vector<float> psi_q = RandomVector(r, 300);
    std::vector<double> u(h + 1);
    SketchReadout(psi_q, packed, absl::Span<double>(u));
    for (size_t j = 0; j <= h; ++j) {
      double want = 0.0, magnitude = 0.0;
      for (int64_t a = 0; a < r; ++a) {
        for (int64_t c = 0; c < r; ++c) {
          const double term = double{psi_q[a]} * psi_q[c] * full[(a * r + c) * (h + 1) + j];
          want += term;
          magnitude += std::fabs(term);
        }
      }
      // The packed state is fp32: each element carries ~4 roundings of 6e-8 relative.
      EXPECT_NEAR(u[j], want, 1e-6 * std::max(1.0, magnitude)) << "j=" << j;
    }
  }
}

}  // namespace
}  // namespace ps::kernels::reference
