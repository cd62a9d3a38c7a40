// The chat template: how /v1/chat/completions turns a list of messages into the plain text prompt
// of a base (non-chat) model. It lives in the model directory as chat_template.json
// (docs/model-format.md, "Chat template"); a directory without one gets DefaultChatTemplate().
// Pure data and functions; immutable after loading, so thread-safe.
#ifndef POLYSKETCH_SERVER_HTTP_CHAT_TEMPLATE_H_
#define POLYSKETCH_SERVER_HTTP_CHAT_TEMPLATE_H_

#include <string>
#include <vector>

#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>

namespace ps::http {

// The file name in a model directory.
inline constexpr char kChatTemplateFile[] = "chat_template.json";
// The placeholder a role's template replaces with the message's content.
inline constexpr char kContentPlaceholder[] = "{content}";

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant" ("developer" is read as "system")
  std::string content;
};

struct ChatTemplate {
  // Each holds kContentPlaceholder exactly once.
  std::string system = "{content}\n\n";
  std::string user = "User: {content}\n";
  std::string assistant = "Assistant: {content}\n";
  // Appended after the last message: the model continues from here.
  std::string generation_prompt = "Assistant:";
  // Stop strings added to every chat request (the model would otherwise go on to write the user's
  // next turn). At most 8, each 1..256 bytes.
  std::vector<std::string> stop = {"\nUser:"};
  // Where it came from, for the start-up log ("default" or the file's path).
  std::string source = "default";
};

// The template used when the model directory has no chat_template.json.
ChatTemplate DefaultChatTemplate();

// Parses the text of a chat_template.json: a JSON object whose keys are those of ChatTemplate
// (system, user, assistant, generation_prompt: strings; stop: a list of strings), each optional
// (a missing key keeps its default). InvalidArgument naming the key: an unknown key, a wrong type,
// a role template without exactly one "{content}", invalid UTF-8, a stop list too long.
[[nodiscard]] absl::StatusOr<ChatTemplate> ParseChatTemplate(absl::string_view text);

// The template of `model_dir`: its chat_template.json, or the default when there is none.
// Errors name the file (unreadable, or ParseChatTemplate's).
[[nodiscard]] absl::StatusOr<ChatTemplate> LoadChatTemplate(const std::string& model_dir);

// The prompt for `messages`: each message through its role's template, in order, then the
// generation prompt. InvalidArgument naming "messages[i].role" for a role the template has no
// entry for. (Message contents are the caller's to validate.)
[[nodiscard]] absl::StatusOr<std::string> RenderChat(const ChatTemplate& chat_template,
                                                     const std::vector<ChatMessage>& messages);

}  // namespace ps::http

#endif  // POLYSKETCH_SERVER_HTTP_CHAT_TEMPLATE_H_
