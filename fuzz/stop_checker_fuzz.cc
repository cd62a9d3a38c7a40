// Fuzz target: StopChecker with stop strings and stop token ids from the request (untrusted)
// over generated text. The input picks the stop conditions, then a stream of token ids whose text
// comes from the IncrementalDetokenizer, as in the engine. Every step is compared with a naive
// reference that re-searches the whole output: what was released so far, when and why the stream
// ends, and the final text must agree; released text must be valid UTF-8 and never contain text
// that a stop string could still claim.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <absl/strings/string_view.h>
#include <fuzzer/FuzzedDataProvider.h>

#include "fuzz/fuzz_check.h"
#include "server/engine/model_io/tokenizer.h"
#include "server/engine/serving/stop_checker.h"

namespace {

using ps::engine::FinishReason;
using ps::engine::StopConditions;

// The longest suffix of `text` that is a proper prefix of one of `stops`.
size_t HeldBackReference(const std::string& text, const std::vector<std::string>& stops) {
  size_t longest = 0;
  for (const std::string& stop : stops) {
    for (size_t n = 1; n < stop.size() && n <= text.size(); ++n) {
      if (text.compare(text.size() - n, n, stop, 0, n) == 0) longest = std::max(longest, n);
    }
  }
  return longest;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  StopConditions c;
  const int num_stops = in.ConsumeIntegralInRange(0, 4);
  for (int i = 0; i < num_stops; ++i) c.stop_strings.push_back(in.ConsumeRandomLengthString(8));
  const int num_ids = in.ConsumeIntegralInRange(0, 3);
  for (int i = 0; i < num_ids; ++i) c.stop_token_ids.push_back(in.ConsumeIntegral<uint8_t>());
  c.include_stop_string = in.ConsumeBool();
  c.max_new_tokens = in.ConsumeIntegralInRange<int64_t>(0, 64);
  c.min_new_tokens = in.ConsumeIntegralInRange<int64_t>(0, 8);

  absl::StatusOr<ps::engine::StopChecker> created = ps::engine::StopChecker::Create(c, 256);
  if (!created.ok()) {
    PS_FUZZ_CHECK(created.status().code() == absl::StatusCode::kInvalidArgument, "code");
    PS_FUZZ_CHECK(!c.Validate(256).ok(), "Create failed on valid conditions");
    return 0;
  }
  ps::engine::StopChecker checker = *std::move(created);

  ps::engine::IncrementalDetokenizer detokenizer;
  std::string output;    // all text produced so far (the reference's view)
  std::string released;  // what the checker released so far
  int64_t k = 0;
  while (in.remaining_bytes() > 0) {
    const int32_t id = in.ConsumeIntegral<uint8_t>();
    absl::StatusOr<std::string> text = detokenizer.Push(id);
    PS_FUZZ_CHECK(text.ok(), "detokenizer");
    ++k;
    const size_t before = output.size();
    output += *text;

    // The reference: the earliest stop string that ends inside this token's text (ties to the
    // earlier entry), then the stop token, then the length limit.
    std::optional<FinishReason> want;
    size_t want_len = output.size();
    if (k > c.min_new_tokens) {
      size_t best = std::string::npos;
      size_t best_len = 0;
      for (const std::string& stop : c.stop_strings) {
        const size_t from = before + 1 >= stop.size() ? before + 1 - stop.size() : 0;
        const size_t pos = output.find(stop, from);
        if (pos < best) {
          best = pos;
          best_len = stop.size();
        }
      }
      if (best != std::string::npos) {
        want = FinishReason::kStopString;
        want_len = c.include_stop_string ? best + best_len : best;
      } else if (std::find(c.stop_token_ids.begin(), c.stop_token_ids.end(), id) !=
                 c.stop_token_ids.end()) {
        want = FinishReason::kStopToken;
        want_len = c.include_stop_string ? output.size() : before;
      }
    }
    if (!want.has_value() && k >= c.max_new_tokens) want = FinishReason::kLength;

    absl::StatusOr<ps::engine::StopStep> step = checker.Append(id, *text);
    PS_FUZZ_CHECK(step.ok(), "Append failed before the end");
    PS_FUZZ_CHECK(ps::engine::IsValidUtf8(step->released), "released invalid UTF-8");
    released += step->released;
    PS_FUZZ_CHECK(step->finish_reason == want, "token %lld: finish %d, reference %d",
                  static_cast<long long>(k),
                  step->finish_reason ? static_cast<int>(*step->finish_reason) : -1,
                  want ? static_cast<int>(*want) : -1);
    if (want.has_value()) {
      PS_FUZZ_CHECK(released == output.substr(0, want_len), "final text differs at token %lld",
                    static_cast<long long>(k));
      PS_FUZZ_CHECK(checker.finished(), "not finished");
      PS_FUZZ_CHECK(
          checker.Append(id, "x").status().code() == absl::StatusCode::kFailedPrecondition,
          "Append after the end");
      return 0;
    }
    // Not finished: exactly the longest tail that may still become a stop string is held back.
    const size_t held = HeldBackReference(output, c.stop_strings);
    PS_FUZZ_CHECK(released.size() + held == output.size() &&
                      output.compare(0, released.size(), released) == 0,
                  "token %lld: released %zu bytes, reference %zu of %zu", static_cast<long long>(k),
                  released.size(), output.size() - held, output.size());
    PS_FUZZ_CHECK(checker.held_back_bytes() == static_cast<int64_t>(held), "held_back_bytes");
  }
  released += checker.Release();
  PS_FUZZ_CHECK(released == output, "Release lost or invented text");
  return 0;
}
