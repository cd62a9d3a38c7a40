// Scalar reference ops: the loops of algorithm.md written as directly as possible. Speed is not a
// goal; matching train/model.py (which computes in float64) to fp32 rounding is.
#include "kernels/reference/ops.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

#include "base/check.h"

namespace ps::kernels::reference {

void LayerNorm(absl::Span<const float> x, absl::Span<const float> weight,
               absl::Span<const float> bias, double eps, float* y) {
  const size_t n = x.size();
  PS_DCHECK(weight.size() == n && bias.size() == n);
  double mean = 0.0;
  for (float xi : x) mean += xi;
  mean /= static_cast<double>(n);
  double var = 0.0;
  for (float xi : x) var += (xi - mean) * (xi - mean);
  var /= static_cast<double>(n);
  const double inv_std = 1.0 / std::sqrt(var + eps);
  for (size_t i = 0; i < n; ++i) {
    y[i] = static_cast<float>((x[i] - mean) * inv_std * weight[i] + bias[i]);
  }
}

double GeluTanh(double x) {
  const double kSqrt2OverPi = 0.7978845608028654;  // sqrt(2 / pi)
  return 0.5 * x * (1.0 + std::tanh(kSqrt2OverPi * (x + 0.044715 * x * x * x)));
}

double Dot(absl::Span<const float> a, absl::Span<const float> b) {
  PS_DCHECK(a.size() == b.size());
  double sum = 0.0;
  for (size_t i = 0; i < a.size(); ++i) sum += static_cast<double>(a[i]) * b[i];
  return sum;
}

void MatVec(absl::Span<const float> w, absl::Span<const float> x, float* y) {
  const size_t in = x.size();
  PS_DCHECK(in > 0 && w.size() % in == 0);
  const size_t out = w.size() / in;
  for (size_t o = 0; o < out; ++o) y[o] = static_cast<float>(Dot(w.subspan(o * in, in), x));
}

void Rope(absl::Span<const float> x, int64_t t, float* y) {
  const size_t h = x.size();
  PS_DCHECK(h % 2 == 0);
  const size_t half = h / 2;
  for (size_t i = 0; i < half; ++i) {
    const double theta = std::pow(10000.0, -2.0 * static_cast<double>(i) / static_cast<double>(h));
    const double angle = static_cast<double>(t) * theta;
    const double c = std::cos(angle);
    const double s = std::sin(angle);
    const double even = x[2 * i];
    const double odd = x[2 * i + 1];
    y[i] = static_cast<float>(even * c - odd * s);
    y[half + i] = static_cast<float>(odd * c + even * s);
  }
}

void Sinusoidal(int64_t t, int64_t D, double* pe) {
  PS_DCHECK(D % 2 == 0);
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const double freq = std::pow(10000.0, -static_cast<double>(i) / static_cast<double>(half));
    const double angle = static_cast<double>(t) * freq;
    pe[2 * i] = std::sin(angle);
    pe[2 * i + 1] = std::cos(angle);
  }
}

void Softmax(absl::Span<float> x) {
  double max = -std::numeric_limits<double>::infinity();
  for (float xi : x) max = std::max(max, static_cast<double>(xi));
  PS_DCHECK(std::isfinite(max));
  std::vector<double> e(x.size());
  double sum = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    e[i] = std::exp(static_cast<double>(x[i]) - max);  // exp(-inf) == 0
    sum += e[i];
  }
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(e[i] / sum);
}

void RandomSketchPsi(absl::Span<const float> x, absl::Span<const float> norm_weight,
                     absl::Span<const float> norm_bias, double eps, absl::Span<const float> s1,
                     absl::Span<const float> s2, float* psi) {
  const size_t h = x.size();
  PS_DCHECK(s1.size() == s2.size() && s1.size() % h == 0);
  const size_t r = s1.size() / h;
  std::vector<float> xn(h);
  LayerNorm(x, norm_weight, norm_bias, eps, xn.data());
  for (size_t a = 0; a < r; ++a) {
    double p1 = 0.0;
    double p2 = 0.0;
    for (size_t i = 0; i < h; ++i) {
      p1 += static_cast<double>(xn[i]) * s1[i * r + a];
      p2 += static_cast<double>(xn[i]) * s2[i * r + a];
    }
    psi[a] = static_cast<float>(p1 * p2);
  }
}

namespace {

// One level: LN -> Linear(in, 8r) -> GELU(tanh) -> Linear(8r, r). x: [in] -> y: [r].
std::vector<float> SketchLevelForward(absl::Span<const float> x, const LearnedSketchLevel& level,
                                      double eps) {
  std::vector<float> xn(x.size());
  LayerNorm(x, level.norm_weight, level.norm_bias, eps, xn.data());
  std::vector<float> hidden(level.up.size() / x.size());  // [8r]
  MatVec(level.up, xn, hidden.data());
  for (float& v : hidden) v = static_cast<float>(GeluTanh(v));
  std::vector<float> y(level.down.size() / hidden.size());  // [r]
  MatVec(level.down, hidden, y.data());
  return y;
}

std::vector<float> Branch(absl::Span<const float> x, const LearnedSketchLevel (&levels)[2],
                          double eps) {
  const std::vector<float> first = SketchLevelForward(x, levels[0], eps);
  return SketchLevelForward(first, levels[1], eps);
}

}  // namespace

void LearnedSketchPsi(absl::Span<const float> x, const LearnedSketchWeights& weights, double eps,
                      float* psi) {
  const std::vector<float> f1 = Branch(x, weights.f1, eps);
  const std::vector<float> f2 = Branch(x, weights.f2, eps);
  const double sqrt_r = std::sqrt(static_cast<double>(f1.size()));
  for (size_t a = 0; a < f1.size(); ++a) {
    psi[a] = static_cast<float>(sqrt_r * std::tanh(static_cast<double>(f1[a]) * f2[a] / sqrt_r));
  }
}

void SketchUpdate(absl::Span<const float> psi, absl::Span<const float> v, absl::Span<float> s) {
  const int64_t r = static_cast<int64_t>(psi.size());
  const size_t cols = v.size() + 1;  // h + 1
  PS_DCHECK(s.size() == static_cast<size_t>(PackedSymmetricRows(r)) * cols);
  for (int64_t a = 0; a < r; ++a) {
    for (int64_t c = a; c < r; ++c) {
      const double w = static_cast<double>(psi[a]) * psi[c];
      float* row = s.data() + PackedSymmetricIndex(a, c, r) * cols;
      for (size_t j = 0; j < v.size(); ++j) row[j] = static_cast<float>(row[j] + w * v[j]);
      row[v.size()] = static_cast<float>(row[v.size()] + w);
    }
  }
}

void SketchReadout(absl::Span<const float> psi, absl::Span<const float> s, absl::Span<double> u) {
  const int64_t r = static_cast<int64_t>(psi.size());
  const size_t cols = u.size();  // h + 1
  PS_DCHECK(s.size() == static_cast<size_t>(PackedSymmetricRows(r)) * cols);
  for (double& x : u) x = 0.0;
  for (int64_t a = 0; a < r; ++a) {
    for (int64_t c = a; c < r; ++c) {
      // Off-diagonal rows stand for both (a, c) and (c, a).
      const double w = (a == c ? 1.0 : 2.0) * static_cast<double>(psi[a]) * psi[c];
      const float* row = s.data() + PackedSymmetricIndex(a, c, r) * cols;
      for (size_t j = 0; j < cols; ++j) u[j] += w * row[j];
    }
  }
}

}  // namespace ps::kernels::reference
