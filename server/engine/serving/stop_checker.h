// When a request's generation ends (stop token ids, stop strings, min/max new tokens) and which
// text may be streamed to the client meanwhile: text that could still be the start of a stop
// string is held back until the next tokens show whether it is one.
#ifndef POLYSKETCH_SERVER_ENGINE_SERVING_STOP_CHECKER_H_
#define POLYSKETCH_SERVER_ENGINE_SERVING_STOP_CHECKER_H_

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>

namespace ps::engine {

// Limits on stop strings (OpenAI allows 4; vLLM more). They bound the work per token.
inline constexpr int kMaxStopStrings = 16;
inline constexpr int kMaxStopStringBytes = 256;
inline constexpr int kMaxStopTokenIds = 64;

// Why a generation ended.
enum class FinishReason {
  kLength,      // max_new_tokens reached
  kStopToken,   // a token of stop_token_ids was generated
  kStopString,  // the text completed one of stop_strings
  // Endings decided by the engine, not by the output (the scheduler's):
  kCancelled,  // the client cancelled or went away
  kDeadline,   // the request's deadline or time limit passed
  kError,      // an internal error ended it (the final result carries the status)
};

// The lower-case name of `reason` ("length", "stop_token", "stop_string"), as tools and logs
// print it.
absl::string_view FinishReasonName(FinishReason reason);

// The stop fields of one request.
struct StopConditions {
  // Generation ends after one of these ids. [0, vocab_size), at most kMaxStopTokenIds.
  std::vector<int32_t> stop_token_ids;
  // Generation ends when the detokenized text contains one of these (non-empty, valid UTF-8, at
  // most kMaxStopStringBytes bytes each, at most kMaxStopStrings of them).
  std::vector<std::string> stop_strings;
  // Whether the matched stop string (or the stop token's text) is part of the output.
  bool include_stop_string = false;
  // Stops (tokens and strings) completed by one of the first min_new_tokens tokens are ignored
  // and their text is ordinary output. [0, max_new_tokens]
  int64_t min_new_tokens = 0;
  // Generation ends (kLength) after this many tokens, whatever else holds. >= 0; 0 generates
  // nothing (the scheduler ends the request when its prompt is prefilled: pure scoring).
  int64_t max_new_tokens = 16;

  // OK, or InvalidArgument naming the first bad field and value.
  [[nodiscard]] absl::Status Validate(int64_t vocab_size) const;
};

// What Append decided about one token.
struct StopStep {
  // Text that can be sent to the client now (valid UTF-8 when the input text is): held-back text
  // that turned out not to start a stop string, plus this token's text that cannot.
  std::string released;
  // Set when generation ends with this token; `released` then holds all remaining output (the
  // text up to the stop string, plus the stop string with include_stop_string; text after a
  // stop string in the same token is dropped).
  std::optional<FinishReason> finish_reason;
};

// Follows one request's output stream. One object per request; not thread-safe (engine thread
// only). Copyable.
class StopChecker {
 public:
  // Errors of StopConditions::Validate.
  [[nodiscard]] static absl::StatusOr<StopChecker> Create(StopConditions conditions,
                                                          int64_t vocab_size);

  // Feeds one generated token and the text it produced (from IncrementalDetokenizer::Push; may
  // be empty while a UTF-8 character is open). Order of checks, as vLLM: stop strings (the
  // earliest match in the text, ties to the earlier stop_strings entry), then the stop token,
  // then max_new_tokens. A stop token's own text is dropped unless include_stop_string.
  // FailedPrecondition once a previous call has finished the stream.
  // Cost: O(held + text) per stop string, held < kMaxStopStringBytes.
  [[nodiscard]] absl::StatusOr<StopStep> Append(int32_t token_id, absl::string_view text);

  // Ends the stream for a reason outside the stop rules (context limit, cancellation): returns
  // the held-back bytes, which no stop string can complete any more, and marks it finished.
  std::string Release();

  // Bytes currently held back (a suffix of the output that is a proper prefix of a stop
  // string). The engine sends them only when Append releases them.
  int64_t held_back_bytes() const { return static_cast<int64_t>(held_.size()); }

  int64_t num_tokens() const { return num_tokens_; }
  bool finished() const { return finished_; }

 private:
  explicit StopChecker(StopConditions conditions) : conditions_(std::move(conditions)) {}

  // The length of the longest suffix of `text` that is a proper prefix of some stop string.
  size_t PartialMatchLength(absl::string_view text) const;

  StopConditions conditions_;
  std::string held_;  // text not yet released; never contains a whole stop string
  int64_t num_tokens_ = 0;
  bool finished_ = false;
};

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_SERVING_STOP_CHECKER_H_
