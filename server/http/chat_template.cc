// chat_template.json: parsed with the strict JSON reader of the model files (duplicate keys,
// invalid UTF-8 and trailing bytes refused), so a template means one thing only.
#include "server/http/chat_template.h"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>

#include <absl/status/status.h>
#include <absl/strings/str_cat.h>
#include <nlohmann/json.hpp>

#include "base/status_macros.h"
#include "server/engine/model_io/json_util.h"
#include "server/engine/model_io/tokenizer.h"

namespace ps::http {
namespace {

using nlohmann::json;

// A template file is a few hundred bytes; anything far larger is not one.
constexpr int64_t kMaxTemplateFileBytes = 64 << 10;
constexpr size_t kMaxTemplateStops = 8;
constexpr size_t kMaxStopBytes = 256;

absl::StatusOr<std::string> StringField(const json& value, absl::string_view key) {
  if (!value.is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(key, ": must be a string, got ", engine::JsonForError(value)));
  }
  std::string s = value.get<std::string>();
  if (const int64_t bad = engine::FirstInvalidUtf8Byte(s); bad >= 0) {
    return absl::InvalidArgumentError(absl::StrCat(key, ": not valid UTF-8 at byte ", bad));
  }
  return s;
}

absl::Status CheckRoleTemplate(absl::string_view key, absl::string_view text) {
  const size_t first = text.find(kContentPlaceholder);
  if (first == absl::string_view::npos ||
      text.find(kContentPlaceholder, first + 1) != absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat(key, ": must contain \"", kContentPlaceholder, "\" exactly once"));
  }
  return absl::OkStatus();
}

}  // namespace

ChatTemplate DefaultChatTemplate() { return ChatTemplate(); }

absl::StatusOr<ChatTemplate> ParseChatTemplate(absl::string_view text) {
  PS_ASSIGN_OR_RETURN(json root, engine::ParseStrictJson(text));
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("must be a JSON object, got ", engine::JsonForError(root)));
  }
  ChatTemplate out;
  for (auto it = root.begin(); it != root.end(); ++it) {
    const std::string& key = it.key();
    if (key == "system" || key == "user" || key == "assistant") {
      PS_ASSIGN_OR_RETURN(std::string value, StringField(it.value(), key));
      PS_RETURN_IF_ERROR(CheckRoleTemplate(key, value));
      (key == "system" ? out.system : key == "user" ? out.user : out.assistant) = std::move(value);
    } else if (key == "generation_prompt") {
      PS_ASSIGN_OR_RETURN(out.generation_prompt, StringField(it.value(), key));
    } else if (key == "stop") {
      if (!it.value().is_array() || it.value().size() > kMaxTemplateStops) {
        return absl::InvalidArgumentError(absl::StrCat("stop: must be a list of at most ",
                                                       kMaxTemplateStops, " strings, got ",
                                                       engine::JsonForError(it.value())));
      }
      out.stop.clear();
      for (size_t i = 0; i < it.value().size(); ++i) {
        const std::string field = absl::StrCat("stop[", i, "]");
        PS_ASSIGN_OR_RETURN(std::string stop, StringField(it.value()[i], field));
        if (stop.empty() || stop.size() > kMaxStopBytes) {
          return absl::InvalidArgumentError(
              absl::StrCat(field, ": must have 1..", kMaxStopBytes, " bytes"));
        }
        out.stop.push_back(std::move(stop));
      }
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown key ", engine::JsonForError(json(key)),
                       " (known: system, user, assistant, generation_prompt, stop)"));
    }
  }
  return out;
}

absl::StatusOr<ChatTemplate> LoadChatTemplate(const std::string& model_dir) {
  const std::filesystem::path path = std::filesystem::path(model_dir) / kChatTemplateFile;
  std::error_code error;
  if (!std::filesystem::exists(path, error)) return DefaultChatTemplate();
  const auto size = std::filesystem::file_size(path, error);
  if (error || size > static_cast<uintmax_t>(kMaxTemplateFileBytes)) {
    return absl::InvalidArgumentError(absl::StrCat(
        path.string(), ": ",
        error ? error.message() : absl::StrCat("larger than ", kMaxTemplateFileBytes, " bytes")));
  }
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  if (!in.good() && !in.eof()) {
    return absl::InvalidArgumentError(absl::StrCat(path.string(), ": cannot read"));
  }
  absl::StatusOr<ChatTemplate> parsed = ParseChatTemplate(text.str());
  if (!parsed.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path.string(), ": ", parsed.status().message()));
  }
  parsed->source = path.string();
  return parsed;
}

absl::StatusOr<std::string> RenderChat(const ChatTemplate& chat_template,
                                       const std::vector<ChatMessage>& messages) {
  std::string out;
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    const std::string* role_template = nullptr;
    if (m.role == "system" || m.role == "developer") {
      role_template = &chat_template.system;
    } else if (m.role == "user") {
      role_template = &chat_template.user;
    } else if (m.role == "assistant") {
      role_template = &chat_template.assistant;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("messages[", i, "].role: must be one of system, developer, user, ",
                       "assistant, got ", engine::JsonForError(json(m.role))));
    }
    // Replace the one placeholder only: a content that itself contains "{content}" stays as is.
    const size_t at = role_template->find(kContentPlaceholder);
    absl::StrAppend(&out, absl::string_view(*role_template).substr(0, at), m.content,
                    absl::string_view(*role_template).substr(at + sizeof(kContentPlaceholder) - 1));
  }
  out += chat_template.generation_prompt;
  return out;
}

}  // namespace ps::http
