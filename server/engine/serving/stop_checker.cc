// StopChecker: stop tokens, stop strings across token boundaries, min/max new tokens. The
// contract is in stop_checker.h.
#include "server/engine/serving/stop_checker.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/string_view.h>

#include "server/engine/model_io/tokenizer.h"

namespace ps::engine {

absl::string_view FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength:
      return "length";
    case FinishReason::kStopToken:
      return "stop_token";
    case FinishReason::kStopString:
      return "stop_string";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kDeadline:
      return "deadline";
    case FinishReason::kError:
      return "error";
  }
  return "unknown";
}

absl::Status StopConditions::Validate(int64_t vocab_size) const {
  if (max_new_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_new_tokens = ", max_new_tokens, " must be >= 0"));
  }
  if (min_new_tokens < 0 || min_new_tokens > max_new_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("min_new_tokens = ", min_new_tokens,
                     " is outside [0, max_new_tokens = ", max_new_tokens, "]"));
  }
  if (stop_token_ids.size() > kMaxStopTokenIds) {
    return absl::InvalidArgumentError(absl::StrCat("stop_token_ids has ", stop_token_ids.size(),
                                                   " entries, at most ", kMaxStopTokenIds));
  }
  for (size_t i = 0; i < stop_token_ids.size(); ++i) {
    if (stop_token_ids[i] < 0 || stop_token_ids[i] >= vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("stop_token_ids[", i, "] = ", stop_token_ids[i],
                       " is outside the vocabulary [0, ", vocab_size, ")"));
    }
  }
  if (stop_strings.size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(absl::StrCat("stop_strings has ", stop_strings.size(),
                                                   " entries, at most ", kMaxStopStrings));
  }
  for (size_t i = 0; i < stop_strings.size(); ++i) {
    const std::string& stop = stop_strings[i];
    if (stop.empty() || stop.size() > kMaxStopStringBytes) {
      return absl::InvalidArgumentError(absl::StrCat("stop_strings[", i, "] has ", stop.size(),
                                                     " bytes, allowed [1, ", kMaxStopStringBytes,
                                                     "]"));
    }
    if (!IsValidUtf8(stop)) {
      return absl::InvalidArgumentError(absl::StrCat("stop_strings[", i, "] is not valid UTF-8"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<StopChecker> StopChecker::Create(StopConditions conditions, int64_t vocab_size) {
  if (absl::Status status = conditions.Validate(vocab_size); !status.ok()) return status;
  return StopChecker(std::move(conditions));
}

size_t StopChecker::PartialMatchLength(absl::string_view text) const {
  size_t longest = 0;
  for (const std::string& stop : conditions_.stop_strings) {
    // Proper prefixes only: a whole stop string in `text` has already been handled.
    for (size_t n = std::min(stop.size() - 1, text.size()); n > longest; --n) {
      if (absl::string_view(stop).substr(0, n) == text.substr(text.size() - n)) {
        longest = n;
        break;
      }
    }
  }
  return longest;
}

absl::StatusOr<StopStep> StopChecker::Append(int32_t token_id, absl::string_view text) {
  if (finished_) {
    return absl::FailedPreconditionError("StopChecker::Append after the stream finished");
  }
  ++num_tokens_;
  // The first min_new_tokens tokens cannot stop the stream.
  const bool stops_active = num_tokens_ > conditions_.min_new_tokens;
  StopStep step;
  const size_t old_held = held_.size();
  held_.append(text.data(), text.size());

  if (stops_active) {
    // Only matches that end inside the new text count: one wholly inside the held text was
    // completed while stops were still deferred (and is held as the start of a longer stop).
    size_t best_pos = std::string::npos;
    size_t best_len = 0;
    for (const std::string& stop : conditions_.stop_strings) {
      const size_t pos = held_.find(stop, old_held >= stop.size() ? old_held - stop.size() + 1 : 0);
      if (pos < best_pos) {
        best_pos = pos;
        best_len = stop.size();
      }
    }
    if (best_pos != std::string::npos) {
      step.released =
          held_.substr(0, conditions_.include_stop_string ? best_pos + best_len : best_pos);
      step.finish_reason = FinishReason::kStopString;
    } else if (std::find(conditions_.stop_token_ids.begin(), conditions_.stop_token_ids.end(),
                         token_id) != conditions_.stop_token_ids.end()) {
      if (!conditions_.include_stop_string) held_.resize(held_.size() - text.size());
      step.released = std::move(held_);
      step.finish_reason = FinishReason::kStopToken;
    }
  }
  if (!step.finish_reason.has_value() && num_tokens_ >= conditions_.max_new_tokens) {
    step.released = std::move(held_);
    step.finish_reason = FinishReason::kLength;
  }
  if (step.finish_reason.has_value()) {
    finished_ = true;
    held_.clear();
    return step;
  }
  // Hold back the longest tail that may still become a stop string; release the rest. (While
  // stops are deferred this still holds back, as the stop may complete after min_new_tokens.)
  const size_t keep = PartialMatchLength(held_);
  step.released = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return step;
}

std::string StopChecker::Release() {
  finished_ = true;
  return std::exchange(held_, std::string());
}

}  // namespace ps::engine
