// Per-request token sampling: the request's sampling parameters (validated), and a Sampler that
// turns one step's logits into a token with vLLM's order of operations and a portable, seeded RNG,
// so the same request with the same seed gives the same tokens on any platform and compiler.
// Stop conditions live in stop_checker.h.
#ifndef POLYSKETCH_SERVER_ENGINE_SERVING_SAMPLER_H_
#define POLYSKETCH_SERVER_ENGINE_SERVING_SAMPLER_H_

#include <cstdint>
#include <random>
#include <vector>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/types/span.h>

namespace ps::engine {

// Maximum number of alternatives a request may ask for per token (OpenAI's limit).
inline constexpr int kMaxTopLogprobs = 20;

// The sampling fields of one request. Defaults turn every transform off (plain sampling at
// temperature 1). Semantics follow vLLM / OpenAI:
//   temperature         0 = greedy (argmax); else logits are divided by it. [0, 100]
//   top_k               keep the k highest logits; 0 = off. [0, vocab_size]
//   top_p               keep the smallest set of most likely tokens whose probability reaches
//                       top_p (always at least one); 1 = off. (0, 1]
//   min_p               keep tokens whose probability is at least min_p times the most likely
//                       token's; 0 = off. [0, 1]
//   repetition_penalty  HF / vLLM: for every token in the prompt or the output so far,
//                       logit > 0 ? logit / penalty : logit * penalty; 1 = off. (0, 10]
//   presence_penalty    OpenAI: over generated tokens only, logit -= presence * (count > 0). [-2,
//   2] frequency_penalty   OpenAI: over generated tokens only, logit -= frequency * count. [-2, 2]
//   seed                seeds the request's own RNG (see Sampler).
//   logprobs            report the chosen token's log-probability.
//   top_logprobs        also report the n most likely tokens with theirs. [0, 20]
struct SamplingParams {
  float temperature = 1.0f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  uint64_t seed = 0;
  bool logprobs = false;
  int32_t top_logprobs = 0;

  // OK when every field is in its range above (NaN and infinities are out of every range), else
  // InvalidArgument naming the first bad field, its value and the allowed range
  // ("top_p = 0 is outside (0, 1]"). InvalidArgument too when vocab_size < 1.
  [[nodiscard]] absl::Status Validate(int64_t vocab_size) const;
};

// One alternative token and its log-probability.
struct TokenLogprob {
  int32_t token_id = 0;
  float logprob = 0.0f;
};

// log(sum_i exp(logits[i])), accumulated in double: log_softmax(logits)[i] is logits[i] minus it.
// Internal when a logit is NaN or +inf, or every logit is -inf (a broken model); InvalidArgument
// when logits is empty.
[[nodiscard]] absl::StatusOr<double> LogNormalizer(absl::Span<const float> logits);

// The n most likely tokens of `logits` with log-probabilities logits[id] - log_normalizer, most
// likely first, ties broken by lower id (n is clamped to [0, logits.size()]). `scratch` is
// reused between calls (O(V log n), no allocation in the steady state beyond the result).
std::vector<TokenLogprob> TopLogprobs(absl::Span<const float> logits, double log_normalizer,
                                      int64_t n, std::vector<int32_t>* scratch);

// The outcome of one Sampler::Sample call.
struct SampleResult {
  int32_t token_id = 0;
  // Log-probability of token_id under the raw model distribution (see Sampler); 0 unless
  // SamplingParams::logprobs.
  float logprob = 0.0f;
  // The top_logprobs most likely tokens of the raw model distribution, most likely first, ties
  // broken by lower id; empty unless SamplingParams::logprobs and top_logprobs > 0.
  std::vector<TokenLogprob> top_logprobs;
};

// Chooses the tokens of one request. One object per request; not thread-safe (engine thread
// only). Movable and copyable (a copy continues the same random stream).
//
// Order of operations in Sample (vLLM's):
//   1. penalties: repetition (prompt + output), then presence and frequency (output only);
//   2. temperature == 0: greedy, the highest penalized logit, ties to the lowest id; done;
//   3. temperature, 4. top-k, 5. top-p, 6. min-p (on the distribution top-k/top-p left),
//   7. draw one token from what is left, in proportion to exp(logit / temperature).
// Temperature is applied inside the exponent in double, after top-k has ranked the penalized
// logits; dividing by a positive temperature keeps their order, so the kept set is vLLM's, and
// no two distinct logits can become tied by float rounding (top_k = 1 is exactly greedy).
//
// Reported logprobs are those of the RAW model distribution: log_softmax of the logits passed
// to Sample, before penalties, temperature and truncation (vLLM's default, "raw_logprobs").
//
// Randomness: std::mt19937_64 seeded with SamplingParams::seed (its output is fixed by the C++
// standard); one draw per non-greedy step, turned into a double in [0, 1) from its top 53 bits
// (not std::uniform_real_distribution, whose output is implementation-defined). Greedy steps
// draw nothing.
//
// Cost per step: O(V) for penalties-free sampling with top-k off or small; top-k uses
// nth_element (O(V)); top-p sorts the candidates (O(V log V), or O(k log k) after top-k);
// top_logprobs costs O(V log n). Memory: O(V) per request (token counts and scratch buffers).
class Sampler {
 public:
  // `params` must pass Validate(vocab_size) (its error is returned otherwise); `prompt_ids` are
  // the prompt's token ids, used by the repetition penalty; one outside [0, vocab_size) is
  // InvalidArgument naming its index.
  [[nodiscard]] static absl::StatusOr<Sampler> Create(const SamplingParams& params,
                                                      int64_t vocab_size,
                                                      absl::Span<const int32_t> prompt_ids);

  // Chooses the next token from `logits` ([vocab_size] floats, one per token id). Does not
  // record the token: call Accept with the token that is actually appended to the output
  // (normally the one returned), so that penalties see it on the next step.
  // Errors: InvalidArgument when logits.size() != vocab_size; Internal when a logit is NaN or
  // +inf, or every logit is -inf (a broken model: the request fails, the server does not).
  // -inf logits are allowed and such tokens are never chosen.
  [[nodiscard]] absl::StatusOr<SampleResult> Sample(absl::Span<const float> logits);

  // Records `token_id` as generated (for the penalties). InvalidArgument outside the vocabulary.
  [[nodiscard]] absl::Status Accept(int32_t token_id);

  // The logits after the penalties of the last Sample call ([vocab_size]; empty before the
  // first). For tests and debugging.
  absl::Span<const float> penalized_logits() const { return penalized_; }

  const SamplingParams& params() const { return params_; }
  int64_t num_generated() const { return num_generated_; }

 private:
  Sampler(const SamplingParams& params, int64_t vocab_size);

  void ApplyPenalties(absl::Span<const float> logits);
  int32_t Greedy() const;
  int32_t Draw();

  SamplingParams params_;
  int64_t vocab_size_ = 0;
  std::mt19937_64 rng_;
  int64_t num_generated_ = 0;

  // Repetition penalty: which ids occurred in the prompt or output ([vocab_size] flags) and the
  // list of them, so the penalty costs O(distinct ids), not O(V).
  std::vector<uint8_t> seen_;
  std::vector<int32_t> seen_ids_;
  // Presence / frequency: how often each id was generated ([vocab_size]) and the distinct ids.
  std::vector<int32_t> output_counts_;
  std::vector<int32_t> output_ids_;

  // Scratch reused every step (no allocation in the steady state).
  std::vector<float> penalized_;     // [vocab_size]
  std::vector<int32_t> candidates_;  // ids still in the running
  std::vector<double> weights_;      // exp((logit - max) / temperature), parallel to candidates_
};

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_SERVING_SAMPLER_H_
