// Fuzz target: ParseStrictJson and JsonForError (json_util.h), shared by the config and the
// safetensors header parsers. What json_util.h promises: accepted text is valid UTF-8 without a
// byte order mark or raw NUL, and parses to the same value under nlohmann's ordinary parser (the
// strict one only refuses more); error messages and renderings for messages are valid UTF-8 and
// no longer than asked.
#include <cstddef>
#include <cstdint>
#include <string>

#include <absl/strings/string_view.h>
#include <nlohmann/json.hpp>

#include "fuzz/fuzz_check.h"
#include "server/engine/model_io/json_util.h"
#include "server/engine/model_io/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using ps::engine::IsValidUtf8;
  const absl::string_view text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<nlohmann::json> strict = ps::engine::ParseStrictJson(text);
  if (!strict.ok()) {
    PS_FUZZ_CHECK(strict.status().code() == absl::StatusCode::kInvalidArgument, "code");
    PS_FUZZ_CHECK(IsValidUtf8(strict.status().message()), "error message is not valid UTF-8");
    return 0;
  }
  PS_FUZZ_CHECK(IsValidUtf8(text), "accepted text that is not valid UTF-8");
  PS_FUZZ_CHECK(text.find('\0') == absl::string_view::npos, "accepted a NUL byte");
  PS_FUZZ_CHECK(text.substr(0, 3) != "\xEF\xBB\xBF", "accepted a byte order mark");
  const nlohmann::json lenient =
      nlohmann::json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  PS_FUZZ_CHECK(!lenient.is_discarded(), "the ordinary parser refuses what the strict one took");
  PS_FUZZ_CHECK(lenient == *strict, "the two parsers disagree on the value");

  for (size_t max_chars : {size_t{3}, size_t{10}, size_t{80}}) {
    const std::string shown = ps::engine::JsonForError(*strict, max_chars);
    PS_FUZZ_CHECK(shown.size() <= max_chars, "rendering of %zu bytes for max_chars %zu",
                  shown.size(), max_chars);
    PS_FUZZ_CHECK(IsValidUtf8(shown), "rendering is not valid UTF-8");
  }
  return 0;
}
