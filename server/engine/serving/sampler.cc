// Sampler: penalties, greedy / temperature / top-k / top-p / min-p and the seeded draw. The
// contract and the order of operations are in sampler.h.
#include "server/engine/serving/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/str_cat.h>
#include <absl/types/span.h>

#include "base/status_macros.h"

namespace ps::engine {
namespace {

// Comparisons written so that NaN fails them (a NaN is outside every range).
absl::Status CheckClosed(const char* field, double value, double lo, double hi) {
  if (value >= lo && value <= hi) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(field, " = ", value, " is outside [", lo, ", ", hi, "]"));
}

absl::Status CheckLeftOpen(const char* field, double value, double lo, double hi) {
  if (value > lo && value <= hi) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(field, " = ", value, " is outside (", lo, ", ", hi, "]"));
}

// A penalty must not turn a finite logit into +-inf (a huge logit / small penalty would, and
// inf - inf is NaN later): saturate at the largest float instead.
float ClampFinite(float logit) {
  constexpr float kMax = std::numeric_limits<float>::max();
  return std::clamp(logit, -kMax, kMax);
}

}  // namespace

absl::Status SamplingParams::Validate(int64_t vocab_size) const {
  if (vocab_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("vocab_size = ", vocab_size, " must be >= 1"));
  }
  absl::Status status;
  status.Update(CheckClosed("temperature", temperature, 0, 100));
  status.Update(CheckClosed("top_k", top_k, 0, static_cast<double>(vocab_size)));
  status.Update(CheckLeftOpen("top_p", top_p, 0, 1));
  status.Update(CheckClosed("min_p", min_p, 0, 1));
  status.Update(CheckLeftOpen("repetition_penalty", repetition_penalty, 0, 10));
  status.Update(CheckClosed("presence_penalty", presence_penalty, -2, 2));
  status.Update(CheckClosed("frequency_penalty", frequency_penalty, -2, 2));
  status.Update(CheckClosed("top_logprobs", top_logprobs, 0, kMaxTopLogprobs));
  return status;  // Update keeps the first error
}

Sampler::Sampler(const SamplingParams& params, int64_t vocab_size)
    : params_(params),
      vocab_size_(vocab_size),
      rng_(params.seed),
      seen_(vocab_size, 0),
      output_counts_(vocab_size, 0) {}

absl::StatusOr<Sampler> Sampler::Create(const SamplingParams& params, int64_t vocab_size,
                                        absl::Span<const int32_t> prompt_ids) {
  if (absl::Status status = params.Validate(vocab_size); !status.ok()) return status;
  Sampler sampler(params, vocab_size);
  for (size_t i = 0; i < prompt_ids.size(); ++i) {
    const int32_t id = prompt_ids[i];
    if (id < 0 || id >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "prompt_ids[", i, "] = ", id, " is outside the vocabulary [0, ", vocab_size, ")"));
    }
    if (!sampler.seen_[id]) {
      sampler.seen_[id] = 1;
      sampler.seen_ids_.push_back(id);
    }
  }
  return sampler;
}

absl::Status Sampler::Accept(int32_t token_id) {
  if (token_id < 0 || token_id >= vocab_size_) {
    return absl::InvalidArgumentError(
        absl::StrCat("token_id = ", token_id, " is outside the vocabulary [0, ", vocab_size_, ")"));
  }
  if (!seen_[token_id]) {
    seen_[token_id] = 1;
    seen_ids_.push_back(token_id);
  }
  if (output_counts_[token_id]++ == 0) output_ids_.push_back(token_id);
  ++num_generated_;
  return absl::OkStatus();
}

void Sampler::ApplyPenalties(absl::Span<const float> logits) {
  penalized_.assign(logits.begin(), logits.end());
  if (params_.repetition_penalty != 1.0f) {
    const float penalty = params_.repetition_penalty;
    for (int32_t id : seen_ids_) {
      float& logit = penalized_[id];
      if (std::isfinite(logit)) logit = ClampFinite(logit > 0 ? logit / penalty : logit * penalty);
    }
  }
  if (params_.presence_penalty != 0.0f || params_.frequency_penalty != 0.0f) {
    for (int32_t id : output_ids_) {
      float& logit = penalized_[id];
      if (!std::isfinite(logit)) continue;
      logit =
          ClampFinite(logit - (params_.presence_penalty +
                               params_.frequency_penalty * static_cast<float>(output_counts_[id])));
    }
  }
}

int32_t Sampler::Greedy() const {
  // Strict > keeps the first (lowest) id among equal maxima.
  int32_t best = 0;
  for (int32_t id = 1; id < vocab_size_; ++id) {
    if (penalized_[id] > penalized_[best]) best = id;
  }
  return best;
}

int32_t Sampler::Draw() {
  const absl::Span<const float> logits = penalized_;
  // Higher logit first, then lower id: a strict total order, so nth_element and sort give the
  // same kept set on every standard library.
  const auto better = [&logits](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  candidates_.resize(vocab_size_);
  std::iota(candidates_.begin(), candidates_.end(), 0);

  if (params_.top_k > 0 && params_.top_k < vocab_size_) {
    const auto kth = candidates_.begin() + (params_.top_k - 1);
    std::nth_element(candidates_.begin(), kth, candidates_.end(), better);
    candidates_.resize(params_.top_k);
  }
  const bool use_top_p = params_.top_p < 1.0f;
  if (use_top_p) std::sort(candidates_.begin(), candidates_.end(), better);

  float max_logit = -std::numeric_limits<float>::infinity();
  for (int32_t id : candidates_) max_logit = std::max(max_logit, logits[id]);

  // Weights relative to the best candidate (whose weight is exactly 1); -inf logits get 0.
  const double inv_temperature = 1.0 / static_cast<double>(params_.temperature);
  weights_.resize(candidates_.size());
  double total = 0;
  for (size_t i = 0; i < candidates_.size(); ++i) {
    weights_[i] =
        std::exp((static_cast<double>(logits[candidates_[i]]) - max_logit) * inv_temperature);
    total += weights_[i];
  }

  if (use_top_p) {
    // Keep token i (most likely first) while the mass strictly before it is below top_p: the
    // smallest prefix reaching top_p, as vLLM's "drop the tail whose cumsum <= 1 - p".
    const double threshold = static_cast<double>(params_.top_p) * total;
    double before = 0;
    size_t keep = 0;
    while (keep < candidates_.size() && before < threshold) before += weights_[keep++];
    candidates_.resize(keep);
    weights_.resize(keep);
  }
  if (params_.min_p > 0.0f) {
    // p_i >= min_p * p_max  <=>  weight_i >= min_p, as the best candidate's weight is 1; the
    // best one therefore always stays.
    size_t out = 0;
    for (size_t i = 0; i < candidates_.size(); ++i) {
      if (weights_[i] >= params_.min_p) {
        candidates_[out] = candidates_[i];
        weights_[out++] = weights_[i];
      }
    }
    candidates_.resize(out);
    weights_.resize(out);
  }

  total = 0;
  for (double w : weights_) total += w;
  // Top 53 bits -> a double in [0, 1), the same on every platform.
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53;
  const double target = u * total;
  double cumulative = 0;
  int32_t last_positive = candidates_.front();
  for (size_t i = 0; i < candidates_.size(); ++i) {
    if (weights_[i] <= 0) continue;
    cumulative += weights_[i];
    last_positive = candidates_[i];
    if (cumulative > target) return candidates_[i];
  }
  return last_positive;  // rounding left target at the very top of the range
}

std::vector<TokenLogprob> TopLogprobs(absl::Span<const float> logits, double log_normalizer,
                                      int64_t n, std::vector<int32_t>* scratch) {
  const auto better = [&logits](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  const auto V = static_cast<int64_t>(logits.size());
  n = std::clamp<int64_t>(n, 0, V);
  scratch->resize(static_cast<size_t>(V));
  std::iota(scratch->begin(), scratch->end(), 0);
  std::partial_sort(scratch->begin(), scratch->begin() + n, scratch->end(), better);
  std::vector<TokenLogprob> top(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const int32_t id = (*scratch)[static_cast<size_t>(i)];
    top[static_cast<size_t>(i)] = {
        id, static_cast<float>(static_cast<double>(logits[id]) - log_normalizer)};
  }
  return top;
}

namespace {

// The largest logit; Internal for a NaN or +inf logit, or when every logit is -inf.
absl::StatusOr<float> CheckedMaxLogit(absl::Span<const float> logits) {
  float max_logit = -std::numeric_limits<float>::infinity();
  for (size_t id = 0; id < logits.size(); ++id) {
    const float logit = logits[id];
    if (std::isnan(logit) || logit == std::numeric_limits<float>::infinity()) {
      return absl::InternalError(
          absl::StrCat("model produced logits[", id, "] = ", logit, " (NaN or +inf)"));
    }
    max_logit = std::max(max_logit, logit);
  }
  if (max_logit == -std::numeric_limits<float>::infinity()) {
    return absl::InternalError("model produced -inf for every logit: no token can be sampled");
  }
  return max_logit;
}

}  // namespace

absl::StatusOr<double> LogNormalizer(absl::Span<const float> logits) {
  if (logits.empty()) return absl::InvalidArgumentError("logits: empty");
  PS_ASSIGN_OR_RETURN(const float max_logit, CheckedMaxLogit(logits));
  double sum = 0;
  for (float logit : logits) sum += std::exp(static_cast<double>(logit) - max_logit);
  return max_logit + std::log(sum);
}

absl::StatusOr<SampleResult> Sampler::Sample(absl::Span<const float> logits) {
  if (static_cast<int64_t>(logits.size()) != vocab_size_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "logits has ", logits.size(), " entries, expected vocab_size = ", vocab_size_));
  }
  PS_RETURN_IF_ERROR(CheckedMaxLogit(logits).status());

  ApplyPenalties(logits);
  SampleResult result;
  result.token_id = params_.temperature == 0.0f ? Greedy() : Draw();

  if (params_.logprobs) {
    // log_softmax of the raw logits.
    PS_ASSIGN_OR_RETURN(const double log_normalizer, LogNormalizer(logits));
    result.logprob = static_cast<float>(logits[result.token_id] - log_normalizer);
    if (params_.top_logprobs > 0) {
      result.top_logprobs = TopLogprobs(logits, log_normalizer, params_.top_logprobs, &candidates_);
    }
  }
  return result;
}

}  // namespace ps::engine
