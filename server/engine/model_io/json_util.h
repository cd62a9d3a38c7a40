// Strict JSON parsing for the model files (config.json, the safetensors header), and short
// renderings of JSON values for error messages. Shared so that both files refuse the same things.
#ifndef POLYSKETCH_SERVER_ENGINE_MODEL_IO_JSON_UTIL_H_
#define POLYSKETCH_SERVER_ENGINE_MODEL_IO_JSON_UTIL_H_

#include <cstdint>
#include <optional>
#include <string>

#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>
#include <nlohmann/json.hpp>

namespace ps::engine {

// Parses one JSON document. Stricter than RFC 8259 readers where the RFC leaves room, so that a
// file never means two things: refuses a duplicate key in any object (which of the two would
// win is reader-defined), a leading byte order mark, raw NUL bytes, invalid UTF-8 and lone
// surrogate escapes in strings, NaN/Infinity literals and trailing non-whitespace. Errors are
// InvalidArgument with the parser's position; the message does not name a file (callers prefix
// their path and may change the code, e.g. to DataLoss for a corrupt weights file).
[[nodiscard]] absl::StatusOr<nlohmann::json> ParseStrictJson(absl::string_view text);

// A compact rendering of `value` for an error message ("got ..."): at most `max_chars`
// characters (longer renderings end in "..."); invalid UTF-8 is replaced, never copied.
std::string JsonForError(const nlohmann::json& value, size_t max_chars = 80);

// The value of a JSON integer (signed or unsigned) that fits int64_t; nullopt for anything else
// (floats such as 1.0, booleans, strings, integers beyond int64_t).
std::optional<int64_t> JsonToInt64(const nlohmann::json& value);

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_MODEL_IO_JSON_UTIL_H_
