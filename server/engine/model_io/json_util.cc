// ParseStrictJson: nlohmann::json's parser plus a callback that tracks the keys of every open
// object, so that duplicates are caught while parsing (the parsed value keeps only one of them).
#include "server/engine/model_io/json_util.h"

#include <limits>
#include <set>
#include <utility>
#include <vector>

#include <absl/status/status.h>
#include <absl/strings/str_cat.h>

namespace ps::engine {

using nlohmann::json;

namespace {

constexpr int kMaxRenderDepth = 8;

// Appends a rendering of `value` to `out`, stopping early once `out` is longer than `limit`.
// Recursion is bounded by kMaxRenderDepth, so a hostile, deeply nested value cannot overflow the
// stack (json::dump recurses once per level).
void Render(const json& value, int depth, size_t limit, std::string& out) {
  if (out.size() > limit) return;
  if (!value.is_structured()) {
    out += value.dump(-1, ' ', false, json::error_handler_t::replace);
    return;
  }
  const bool is_object = value.is_object();
  out += is_object ? '{' : '[';
  if (depth >= kMaxRenderDepth && !value.empty()) {
    out += "...";
  } else {
    bool first = true;
    for (auto it = value.begin(); it != value.end() && out.size() <= limit; ++it) {
      if (!first) out += ',';
      first = false;
      if (is_object) {
        out += json(it.key()).dump(-1, ' ', false, json::error_handler_t::replace);
        out += ':';
      }
      Render(*it, depth + 1, limit, out);
    }
  }
  out += is_object ? '}' : ']';
}

// Parser messages quote the input they stopped at, which may be any bytes: escape everything
// that is not printable ASCII so that the message is valid UTF-8 and safe to log.
std::string Printable(absl::string_view s) {
  std::string out;
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (u >= 0x20 && u < 0x7f) {
      out += c;
    } else {
      constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[u >> 4];
      out += kHex[u & 0xf];
    }
  }
  return out;
}

}  // namespace

absl::StatusOr<json> ParseStrictJson(absl::string_view text) {
  // nlohmann skips a UTF-8 byte order mark silently; Python's json (the writer's side) refuses it.
  if (text.substr(0, 3) == "\xEF\xBB\xBF") {
    return absl::InvalidArgumentError("starts with a byte order mark");
  }
  // nlohmann's lexer takes a NUL byte for the end of the input and would ignore what follows it;
  // a raw NUL is never valid JSON (inside strings it must be escaped as \u0000).
  if (const size_t nul = text.find('\0'); nul != absl::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat("NUL byte at offset ", nul));
  }
  std::vector<std::set<std::string>> open_objects;  // keys seen so far, innermost object last
  std::string duplicate;
  auto callback = [&](int /*depth*/, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
        open_objects.emplace_back();
        break;
      case json::parse_event_t::object_end:
        open_objects.pop_back();
        break;
      case json::parse_event_t::key:
        if (!open_objects.back().insert(parsed.get<std::string>()).second && duplicate.empty()) {
          duplicate = parsed.get<std::string>();
        }
        break;
      default:
        break;
    }
    return true;  // keep everything; the duplicate check runs after the parse
  };
  json value;
  try {
    value = json::parse(text.begin(), text.end(), callback, /*allow_exceptions=*/true,
                        /*ignore_comments=*/false);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(Printable(e.what()));
  }
  if (!duplicate.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("duplicate key ", JsonForError(json(duplicate)), " in an object"));
  }
  return value;
}

std::string JsonForError(const json& value, size_t max_chars) {
  std::string out;
  Render(value, 0, max_chars, out);
  if (out.size() > max_chars) {
    size_t cut = max_chars > 3 ? max_chars - 3 : 0;
    // Do not cut a UTF-8 character in half: back up to a lead byte.
    while (cut > 0 && (static_cast<unsigned char>(out[cut]) & 0xC0) == 0x80) --cut;
    out = absl::StrCat(out.substr(0, cut), "...");
  }
  return out;
}

std::optional<int64_t> JsonToInt64(const json& value) {
  if (value.is_number_unsigned()) {
    const uint64_t v = value.get<uint64_t>();
    if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return static_cast<int64_t>(v);
  }
  if (value.is_number_integer()) return value.get<int64_t>();
  return std::nullopt;
}

}  // namespace ps::engine
