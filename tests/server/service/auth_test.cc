// The tokens file parser and the bearer check (server/service/auth.h): formats, every refusal,
// messages that never contain a token, and reload keeping the old tokens on a bad file.
#include "server/service/auth.h"

#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/testing/files.h"
#include "tests/testing/status_matchers.h"

namespace ps::service {
namespace {

using test::IsOk;
using test::StatusIs;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kAlice[] = "alice-token-0123456789abcdef";
constexpr char kBob[] = "bob-token-0123456789abcdef";

TEST(ParseTokensTest, NamedBareCommentsAndBlankLines) {
  PS_ASSERT_OK_AND_ASSIGN(
      std::vector<TokenEntry> entries,
      ParseTokens(absl::StrCat("# operators\n\n  alice : ", kAlice, "  \n\t", kBob, "\n# end")));
  ASSERT_EQ(entries.size(), 2u);
  EXPECT_EQ(entries[0].name, "alice");
  EXPECT_EQ(entries[0].digest, Sha256(kAlice));
  // A bare token is named by its digest, so the name survives edits elsewhere in the file.
  EXPECT_EQ(entries[1].name.substr(0, 6), "token-");
  EXPECT_EQ(entries[1].name.size(), 6u + 12u);
  EXPECT_EQ(entries[1].digest, Sha256(kBob));
}

TEST(ParseTokensTest, RefusalsNameTheLineAndNeverTheToken) {
  const std::string short_token = "short-secret";
  struct Case {
    std::string text;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"", "no tokens"},
      {"# only a comment\n\n", "no tokens"},
      {"alice:" + short_token, "line 1: the token must have 16..4096 bytes, it has 12"},
      {absl::StrCat("a:", kAlice, "\nbad name:", kBob), "line 2: the name"},
      {absl::StrCat(":", kAlice), "line 1: the name"},
      {absl::StrCat("a:", kAlice, "\na:", kBob), "line 2: duplicate name 'a'"},
      {absl::StrCat("a:", kAlice, "\nb:", kAlice), "line 2: the same token as an earlier line"},
      {"a:token with spaces inside it", "line 1: the token must be printable ASCII"},
      {"a:" + std::string(4097, 'x'), "it has 4097"},
  };
  for (const Case& c : cases) {
    const absl::StatusOr<std::vector<TokenEntry>> parsed = ParseTokens(c.text);
    EXPECT_THAT(parsed, StatusIs(absl::StatusCode::kInvalidArgument, c.message)) << c.text;
    if (!parsed.ok()) {
      for (const std::string& secret : {short_token, std::string(kAlice), std::string(kBob)}) {
        EXPECT_THAT(std::string(parsed.status().message()), Not(HasSubstr(secret)));
      }
    }
  }
}

TEST(AuthenticatorTest, DisabledIsAnonymous) {
  Authenticator off;
  EXPECT_FALSE(off.enabled());
  PS_ASSERT_OK_AND_ASSIGN(std::string identity, off.AuthenticateValue(std::nullopt));
  EXPECT_EQ(identity, kAnonymousIdentity);
}

TEST(AuthenticatorTest, BearerTokensAndEveryRefusal) {
  PS_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Authenticator> auth,
                          Authenticator::FromText(absl::StrCat("alice:", kAlice, "\nbob:", kBob)));
  EXPECT_TRUE(auth->enabled());
  EXPECT_EQ(auth->num_tokens(), 2u);
  PS_ASSERT_OK_AND_ASSIGN(std::string alice,
                          auth->AuthenticateValue(absl::StrCat("Bearer ", kAlice)));
  EXPECT_EQ(alice, "alice");
  PS_ASSERT_OK_AND_ASSIGN(std::string bob, auth->AuthenticateValue(absl::StrCat("bearer  ", kBob)));
  EXPECT_EQ(bob, "bob");

  EXPECT_THAT(auth->AuthenticateValue(std::nullopt),
              StatusIs(absl::StatusCode::kUnauthenticated, "missing credentials"));
  const std::string alice_token = kAlice;
  // A prefix, an extension, another scheme, no scheme, an empty value: one answer for all.
  for (const std::string& value :
       {"Bearer " + alice_token.substr(0, alice_token.size() - 1), "Bearer " + alice_token + "x",
        "Basic " + alice_token, alice_token, std::string(), std::string("Bearer "),
        std::string("Bearer"), "Bearer " + std::string(10000, 'a')}) {
    const absl::StatusOr<std::string> refused = auth->AuthenticateValue(value);
    EXPECT_THAT(refused, StatusIs(absl::StatusCode::kUnauthenticated, "invalid credentials"))
        << value;
    EXPECT_EQ(refused.status().message(), "invalid credentials");
  }
}

TEST(AuthenticatorTest, ReloadAddsRemovesAndKeepsOldTokensOnError) {
  test::TempDir dir;
  const std::string path = dir.Join("tokens");
  test::WriteFile(path, absl::StrCat("alice:", kAlice, "\n"));
  PS_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Authenticator> auth, Authenticator::FromFile(path));
  EXPECT_THAT(auth->AuthenticateValue(absl::StrCat("Bearer ", kAlice)), IsOk());
  EXPECT_THAT(auth->AuthenticateValue(absl::StrCat("Bearer ", kBob)), Not(IsOk()));

  test::WriteFile(path, absl::StrCat("bob:", kBob, "\n"));
  EXPECT_THAT(auth->Reload(), IsOk());
  EXPECT_THAT(auth->AuthenticateValue(absl::StrCat("Bearer ", kAlice)), Not(IsOk()));
  EXPECT_THAT(auth->AuthenticateValue(absl::StrCat("Bearer ", kBob)), IsOk());

  // A broken file: the error names the file and line, bob's token keeps working.
  test::WriteFile(path, "bob:short\n");
  EXPECT_THAT(auth->Reload(), StatusIs(absl::StatusCode::kInvalidArgument, path + ": line 1"));
  EXPECT_THAT(auth->AuthenticateValue(absl::StrCat("Bearer ", kBob)), IsOk());
  std::remove(path.c_str());
  EXPECT_THAT(auth->Reload(), StatusIs(absl::StatusCode::kNotFound, path));
  EXPECT_THAT(auth->AuthenticateValue(absl::StrCat("Bearer ", kBob)), IsOk());

  EXPECT_THAT(Authenticator::FromFile(dir.Join("missing")),
              StatusIs(absl::StatusCode::kNotFound, "missing"));
  Authenticator off;
  EXPECT_THAT(off.Reload(), StatusIs(absl::StatusCode::kFailedPrecondition));
}

}  // namespace
}  // namespace ps::service
