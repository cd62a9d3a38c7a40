// chat_template.json: defaults, every key, refusals naming the key, loading from a model
// directory, rendering.
#include "server/http/chat_template.h"

#include <fstream>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/testing/files.h"
#include "tests/testing/status_matchers.h"

namespace ps::http {
namespace {

using ::ps::test::IsOk;
using ::ps::test::StatusIs;
using ::testing::ElementsAre;

TEST(ChatTemplateTest, DefaultRendering) {
  PS_ASSERT_OK_AND_ASSIGN(std::string text,
                          RenderChat(DefaultChatTemplate(), {{"developer", "Be brief."},
                                                             {"user", "Hi {content}"},
                                                             {"assistant", "Hello."},
                                                             {"user", "Bye"}}));
  // "{content}" inside a message stays as it is.
  EXPECT_EQ(text, "Be brief.\n\nUser: Hi {content}\nAssistant: Hello.\nUser: Bye\nAssistant:");
  EXPECT_THAT(RenderChat(DefaultChatTemplate(), {{"tool", "x"}}),
              StatusIs(absl::StatusCode::kInvalidArgument, "messages[0].role: must be one of"));
}

TEST(ChatTemplateTest, ParsesEveryKey) {
  PS_ASSERT_OK_AND_ASSIGN(
      ChatTemplate t,
      ParseChatTemplate(R"({"system": "### System\n{content}\n", "user": "### Q\n{content}\n",
                            "assistant": "### A\n{content}\n", "generation_prompt": "### A\n",
                            "stop": ["###"]})"));
  EXPECT_EQ(t.system, "### System\n{content}\n");
  EXPECT_THAT(t.stop, ElementsAre("###"));
  PS_ASSERT_OK_AND_ASSIGN(std::string text, RenderChat(t, {{"user", "Why?"}}));
  EXPECT_EQ(text, "### Q\nWhy?\n### A\n");
  // A missing key keeps its default; an empty stop list is allowed.
  PS_ASSERT_OK_AND_ASSIGN(ChatTemplate partial, ParseChatTemplate(R"({"stop": []})"));
  EXPECT_EQ(partial.user, DefaultChatTemplate().user);
  EXPECT_TRUE(partial.stop.empty());
}

TEST(ChatTemplateTest, RefusalsNameTheKey) {
  const std::pair<const char*, const char*> cases[] = {
      {"[]", "must be a JSON object"},
      {R"({"user": "no placeholder"})", "user: must contain \"{content}\" exactly once"},
      {R"({"user": "{content}{content}"})", "user: must contain"},
      {R"({"system": 3})", "system: must be a string"},
      {R"({"stop": "x"})", "stop: must be a list of at most 8"},
      {R"({"stop": [""]})", "stop[0]: must have 1..256 bytes"},
      {R"({"stop": [1]})", "stop[0]: must be a string"},
      {R"({"roles": {}})", "unknown key \"roles\""},
      {R"({"user": "{content}", "user": "{content}"})", "duplicate key"},
  };
  for (const auto& [text, message] : cases) {
    EXPECT_THAT(ParseChatTemplate(text), StatusIs(absl::StatusCode::kInvalidArgument, message))
        << text;
  }
}

TEST(ChatTemplateTest, LoadsFromTheModelDirectory) {
  test::TempDir dir;
  PS_ASSERT_OK_AND_ASSIGN(ChatTemplate absent, LoadChatTemplate(dir.path()));
  EXPECT_EQ(absent.source, "default");
  const std::string path = dir.path() + "/" + kChatTemplateFile;
  std::ofstream(path) << R"({"generation_prompt": "A:"})";
  PS_ASSERT_OK_AND_ASSIGN(ChatTemplate loaded, LoadChatTemplate(dir.path()));
  EXPECT_EQ(loaded.generation_prompt, "A:");
  EXPECT_EQ(loaded.source, path);
  std::ofstream(path) << R"({"user": "x"})";
  EXPECT_THAT(LoadChatTemplate(dir.path()),
              StatusIs(absl::StatusCode::kInvalidArgument, path + ": user: must contain"));
}

}  // namespace
}  // namespace ps::http
