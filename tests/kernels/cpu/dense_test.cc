// kernels/cpu/dense.h against the scalar oracle kernels/reference/ops.h, at awkward shapes (sizes
// 1, odd, tile +- 1) and with pools of 1 and 3 threads. Tolerances are atol + rtol * |ref|.
#include "kernels/cpu/dense.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/reference/ops.h"

namespace ps::kernels::cpu {
namespace {

namespace ref = ::ps::kernels::reference;

std::vector<float> Random(int64_t size, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(size));
  for (float& x : v) x = dist(rng);
  return v;
}

// Number of elements with |got - want| > atol + rtol |want|; reports the first few.
int CountMismatches(const std::vector<float>& got, const std::vector<float>& want, double atol,
                    double rtol, const std::string& what) {
  EXPECT_EQ(got.size(), want.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    const double err = std::abs(static_cast<double>(got[i]) - want[i]);
    if (!(err <= atol + rtol * std::abs(static_cast<double>(want[i])))) {
      if (++bad <= 5) {
        ADD_FAILURE() << what << " [" << i << "]: got " << got[i] << " want " << want[i];
      }
    }
  }
  return bad;
}

// ---- Linear -------------------------------------------------------------------------------------

class LinearTest : public ::testing::TestWithParam<int> {};

TEST_P(LinearTest, MatchesMatVecAtAwkwardShapes) {
  ThreadPool pool(GetParam());
  const int64_t ms[] = {1, 2, 3, 7, 8, 12, 13, 33, 513};
  const int64_t ns[] = {1, 5, 17, 32, 63, 129};
  const int64_t ks[] = {1, 5, 17, 63, 129, 300};
  uint32_t seed = 1;
  for (int64_t n : ns) {
    for (int64_t k : ks) {
      const std::vector<float> w = Random(n * k, seed++);
      const auto packed = CpuLinearWeight::Create(w, n, k);
      ASSERT_EQ(packed->out_features(), n);
      ASSERT_EQ(packed->in_features(), k);
      for (int64_t m : ms) {
        const std::vector<float> x = Random(m * k, seed++);
        const std::vector<float> y0 = Random(m * n, seed++);
        for (bool accumulate : {false, true}) {
          std::vector<float> want(m * n);
          // |ref| can be near 0 by cancellation: the absolute part scales with the size of the
          // terms (sqrt(k) for unit normals) times fp32 epsilon-ish per-term rounding.
          const double atol = 2e-6 * std::sqrt(static_cast<double>(k));
          for (int64_t i = 0; i < m; ++i) {
            ref::MatVec(w, absl::MakeConstSpan(x.data() + i * k, k), want.data() + i * n);
            if (accumulate) {
              for (int64_t j = 0; j < n; ++j) {
                want[i * n + j] =
                    static_cast<float>(static_cast<double>(want[i * n + j]) + y0[i * n + j]);
              }
            }
          }
          std::vector<float> got = y0;
          Linear(pool, x.data(), m, *packed, got.data(), accumulate);
          const std::string what = "m=" + std::to_string(m) + " n=" + std::to_string(n) +
                                   " k=" + std::to_string(k) + " acc=" + std::to_string(accumulate);
          ASSERT_EQ(CountMismatches(got, want, atol, 1e-5, what), 0) << what;
        }
      }
    }
  }
}

TEST_P(LinearTest, ModelShapes) {
  ThreadPool pool(GetParam());
  const int64_t shapes[][2] = {{576, 192}, {256, 64}, {32, 256}, {2304, 768}, {768, 2048}};
  uint32_t seed = 100;
  for (const auto& shape : shapes) {
    const int64_t n = shape[0];
    const int64_t k = shape[1];
    const std::vector<float> w = Random(n * k, seed++, 0.05f);
    const auto packed = CpuLinearWeight::Create(w, n, k);
    for (int64_t m : {1, 32, 130}) {
      const std::vector<float> x = Random(m * k, seed++);
      std::vector<float> want(m * n);
      for (int64_t i = 0; i < m; ++i) {
        ref::MatVec(w, absl::MakeConstSpan(x.data() + i * k, k), want.data() + i * n);
      }
      std::vector<float> got(m * n, 1e30f);  // overwritten, not added to
      Linear(pool, x.data(), m, *packed, got.data(), /*accumulate=*/false);
      const std::string what = "m=" + std::to_string(m) + " n=" + std::to_string(n);
      // fp32 accumulation over k terms of size ~0.05: atol ~ 0.05 sqrt(k) 2^-23 * a few.
      ASSERT_EQ(CountMismatches(got, want, 1e-7 * std::sqrt(static_cast<double>(k)), 1e-5, what),
                0);
    }
  }
}

TEST(LinearEdgeTest, ZeroRowsDoesNothing) {
  ThreadPool pool(2);
  const std::vector<float> w = Random(5 * 3, 7);
  const auto packed = CpuLinearWeight::Create(w, 5, 3);
  float y = 42.0f;
  Linear(pool, nullptr, 0, *packed, &y, false);
  EXPECT_EQ(y, 42.0f);
}

INSTANTIATE_TEST_SUITE_P(Threads, LinearTest, ::testing::Values(1, 3));

// ---- LayerNorm ----------------------------------------------------------------------------------

class DenseOpsTest : public ::testing::TestWithParam<int> {};

TEST_P(DenseOpsTest, LayerNormMatchesReference) {
  ThreadPool pool(GetParam());
  for (int64_t n : {1, 5, 31, 32, 33, 192, 768}) {
    for (int64_t rows : {1, 3, 64}) {
      // A large offset makes a naive fp32 one-pass variance fail.
      std::vector<float> x = Random(rows * n, 11 + n);
      for (float& v : x) v = 3.0f * v + 100.0f;
      const std::vector<float> gamma = Random(n, 12);
      const std::vector<float> beta = Random(n, 13);
      std::vector<float> want(rows * n);
      for (int64_t i = 0; i < rows; ++i) {
        ref::LayerNorm(absl::MakeConstSpan(x.data() + i * n, n), gamma, beta, 1e-5,
                       want.data() + i * n);
      }
      std::vector<float> got(rows * n);
      LayerNorm(pool, x.data(), rows, n, gamma.data(), beta.data(), 1e-5f, got.data());
      const std::string what = "n=" + std::to_string(n) + " rows=" + std::to_string(rows);
      // Both compute in double and round once; only FMA contraction may differ (1 ulp).
      EXPECT_EQ(CountMismatches(got, want, 1e-6, 1e-6, what), 0);
      // In place.
      std::vector<float> inplace = x;
      LayerNorm(pool, inplace.data(), rows, n, gamma.data(), beta.data(), 1e-5f, inplace.data());
      EXPECT_EQ(CountMismatches(inplace, want, 1e-6, 1e-6, what + " in place"), 0);
    }
  }
}

// ---- Embed, SplitQkvRope, Rope ------------------------------------------------------------------

TEST_P(DenseOpsTest, EmbedMatchesSinusoidal) {
  ThreadPool pool(GetParam());
  const int64_t V = 7;
  for (int64_t d : {2, 6, 192}) {
    const std::vector<float> table = Random(V * d, 21);
    const std::vector<int32_t> tokens = {3, 0, 6, 3, 1};
    const std::vector<int64_t> positions = {0, 1, 1000, 70000, 123456};
    std::vector<float> want(tokens.size() * d);
    std::vector<double> pe(d);
    for (size_t i = 0; i < tokens.size(); ++i) {
      ref::Sinusoidal(positions[i], d, pe.data());
      for (int64_t j = 0; j < d; ++j) {
        want[i * d + j] = static_cast<float>(table[tokens[i] * d + j] + pe[j]);
      }
    }
    std::vector<float> got(want.size());
    Embed(pool, table.data(), d, tokens, positions, /*sinusoidal=*/true, got.data());
    // Same double computation rounded once: exact.
    EXPECT_EQ(CountMismatches(got, want, 0.0, 0.0, "d=" + std::to_string(d)), 0);
    // Without the absolute encoding ("rope", "local_rope" models): the table rows, exactly.
    std::vector<float> rows(want.size());
    for (size_t i = 0; i < tokens.size(); ++i) {
      std::copy_n(table.data() + tokens[i] * d, d, rows.data() + i * d);
    }
    Embed(pool, table.data(), d, tokens, positions, /*sinusoidal=*/false, got.data());
    EXPECT_EQ(CountMismatches(got, rows, 0.0, 0.0, "no pe, d=" + std::to_string(d)), 0);
  }
}

TEST_P(DenseOpsTest, SplitQkvRopeMatchesReference) {
  ThreadPool pool(GetParam());
  for (const auto& [H, h] : std::vector<std::pair<int64_t, int64_t>>{{1, 2}, {3, 64}, {12, 16}}) {
    const int64_t D = H * h;
    const std::vector<int64_t> positions = {0, 1, 17, 1000, 70000};
    const int64_t m = static_cast<int64_t>(positions.size());
    const std::vector<float> qkv = Random(m * 3 * D, 31);
    std::vector<float> want_q(m * D), want_k(m * D), want_v(m * D);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t head = 0; head < H; ++head) {
        const float* row = qkv.data() + i * 3 * D;
        ref::Rope(absl::MakeConstSpan(row + head * h, h), positions[i],
                  want_q.data() + i * D + head * h);
        ref::Rope(absl::MakeConstSpan(row + D + head * h, h), positions[i],
                  want_k.data() + i * D + head * h);
        for (int64_t j = 0; j < h; ++j) want_v[i * D + head * h + j] = row[2 * D + head * h + j];
      }
    }
    std::vector<float> q(m * D), k(m * D), v(m * D);
    SplitQkvRope(pool, qkv.data(), H, h, positions, /*rope=*/true, q.data(), k.data(), v.data());
    const std::string what = "H=" + std::to_string(H) + " h=" + std::to_string(h);
    // Same double computation; FMA contraction of the two products may move the last bit.
    EXPECT_EQ(CountMismatches(q, want_q, 1e-7, 2e-7, what + " q"), 0);
    EXPECT_EQ(CountMismatches(k, want_k, 1e-7, 2e-7, what + " k"), 0);
    EXPECT_EQ(CountMismatches(v, want_v, 0.0, 0.0, what + " v"), 0);

    // Without RoPE ("local_rope" models): q, k, v are the three thirds of each row, in order.
    std::vector<float> plain_q(m * D), plain_k(m * D);
    for (int64_t i = 0; i < m; ++i) {
      std::copy_n(qkv.data() + i * 3 * D, D, plain_q.data() + i * D);
      std::copy_n(qkv.data() + i * 3 * D + D, D, plain_k.data() + i * D);
    }
    std::fill(v.begin(), v.end(), 0.0f);
    SplitQkvRope(pool, qkv.data(), H, h, positions, /*rope=*/false, q.data(), k.data(), v.data());
    EXPECT_EQ(CountMismatches(q, plain_q, 0.0, 0.0, what + " unrotated q"), 0);
    EXPECT_EQ(CountMismatches(k, plain_k, 0.0, 0.0, what + " unrotated k"), 0);
    EXPECT_EQ(CountMismatches(v, want_v, 0.0, 0.0, what + " v without rope"), 0);

    // Rope of the unrotated rows equals the fused rotation of SplitQkvRope (same arithmetic).
    std::vector<float> rq(m * D), rk(m * D);
    Rope(pool, plain_q.data(), H, h, positions, rq.data());
    Rope(pool, plain_k.data(), H, h, positions, rk.data());
    EXPECT_EQ(CountMismatches(rq, want_q, 1e-7, 2e-7, what + " Rope q"), 0);
    EXPECT_EQ(CountMismatches(rk, want_k, 1e-7, 2e-7, what + " Rope k"), 0);
  }
}

// ---- GELU and elementwise -----------------------------------------------------------------------

// fp32 exp and one division against the double reference: a few ulp relative. In the negative
// tail gelu(x) ~ x exp(2u) is tiny and carries the fp32 rounding of the exponent 2u (relative
// error |2u| 2^-24, |2u| up to ~90), and the double reference flushes 1 + tanh(u) to 0 below
// u ~ -19: an absolute 1e-8 there (values far below anything the next layer resolves).
constexpr double kGeluRtol = 1e-6;
constexpr double kGeluAtol = 1e-8;

TEST_P(DenseOpsTest, GeluGateMatchesReference) {
  ThreadPool pool(GetParam());
  for (int64_t f : {1, 7, 16, 17, 512}) {
    for (int64_t m : {1, 5, 70}) {
      std::vector<float> up = Random(m * 2 * f, 41 + f, 3.0f);
      up[0] = -12.0f;  // deep negative tail
      if (f > 1) up[f + 1] = 20.0f;
      std::vector<float> want(m * f);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < f; ++j) {
          want[i * f + j] = static_cast<float>(static_cast<double>(up[i * 2 * f + j]) *
                                               ref::GeluTanh(up[i * 2 * f + f + j]));
        }
      }
      std::vector<float> got(m * f);
      GeluGate(pool, up.data(), m, f, got.data());
      const std::string what = "f=" + std::to_string(f) + " m=" + std::to_string(m);
      EXPECT_EQ(CountMismatches(got, want, kGeluAtol, kGeluRtol, what), 0);
    }
  }
}

TEST_P(DenseOpsTest, GeluMatchesReference) {
  ThreadPool pool(GetParam());
  for (int64_t n : {1, 15, 16, 17, 100000}) {
    std::vector<float> x = Random(n, 51, 4.0f);
    x[0] = n > 1 ? -9.0f : 0.3f;
    std::vector<float> want(n);
    for (int64_t i = 0; i < n; ++i) want[i] = static_cast<float>(ref::GeluTanh(x[i]));
    Gelu(pool, x.data(), n);
    EXPECT_EQ(CountMismatches(x, want, kGeluAtol, kGeluRtol, "n=" + std::to_string(n)), 0);
  }
}

TEST_P(DenseOpsTest, MultiplyAndAliases) {
  ThreadPool pool(GetParam());
  for (int64_t n : {1, 33, 200000}) {
    const std::vector<float> a = Random(n, 61);
    const std::vector<float> b = Random(n, 62);
    std::vector<float> want(n);
    for (int64_t i = 0; i < n; ++i) want[i] = a[i] * b[i];
    std::vector<float> got(n);
    Multiply(pool, a.data(), b.data(), n, got.data());
    EXPECT_EQ(CountMismatches(got, want, 0.0, 0.0, "out"), 0);
    std::vector<float> alias = a;
    Multiply(pool, alias.data(), b.data(), n, alias.data());
    EXPECT_EQ(CountMismatches(alias, want, 0.0, 0.0, "out == a"), 0);
  }
}

TEST_P(DenseOpsTest, SketchCombineMatchesFormula) {
  ThreadPool pool(GetParam());
  for (const auto& [rows, r] :
       std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {3, 32}, {96, 64}}) {
    const std::vector<float> f1 = Random(rows * r, 71, 3.0f);
    const std::vector<float> f2 = Random(rows * r, 72, 3.0f);
    std::vector<float> want(rows * r);
    const double sqrt_r = std::sqrt(static_cast<double>(r));
    for (int64_t i = 0; i < rows * r; ++i) {
      want[i] = static_cast<float>(sqrt_r * std::tanh(static_cast<double>(f1[i]) * f2[i] / sqrt_r));
    }
    std::vector<float> got(rows * r);
    SketchCombine(pool, f1.data(), f2.data(), rows, r, got.data());
    EXPECT_EQ(CountMismatches(got, want, 0.0, 0.0, "psi"), 0);
    std::vector<float> alias = f2;
    SketchCombine(pool, f1.data(), alias.data(), rows, r, alias.data());
    EXPECT_EQ(CountMismatches(alias, want, 0.0, 0.0, "psi == f2"), 0);
  }
}

TEST_P(DenseOpsTest, AddBias) {
  ThreadPool pool(GetParam());
  for (const auto& [m, n] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {5, 17}, {512, 256}}) {
    const std::vector<float> y0 = Random(m * n, 81);
    const std::vector<float> bias = Random(n, 82);
    std::vector<float> want(m * n);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) want[i * n + j] = y0[i * n + j] + bias[j];
    }
    std::vector<float> got = y0;
    AddBias(pool, got.data(), m, n, bias.data());
    EXPECT_EQ(CountMismatches(got, want, 0.0, 0.0, "m=" + std::to_string(m)), 0);
  }
}

INSTANTIATE_TEST_SUITE_P(Threads, DenseOpsTest, ::testing::Values(1, 3));

}  // namespace
}  // namespace ps::kernels::cpu
