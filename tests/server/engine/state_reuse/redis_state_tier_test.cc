// RedisStateTier against a real redis-server started by the test (tests/testing/redis_server.h):
// values of megabytes round-trip in chunks, a replaced value leaves no chunks behind, values and
// leases expire, a lease is one holder's at a time; and every fault is a clear status, never a
// crash or a hang: Redis down (and back), restarted (empty), paused (slow), full (maxmemory), and
// foreign or damaged bytes under a key.
#include "server/engine/state_reuse/redis_state_tier.h"

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_split.h>
#include <absl/strings/strip.h>
#include <absl/time/clock.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/testing/redis_server.h"
#include "tests/testing/status_matchers.h"

namespace ps::engine {
namespace {

using ::ps::test::IsOk;
using ::ps::test::RedisServer;
using ::ps::test::StatusIs;
using ::testing::HasSubstr;

// Runs redis-cli against `redis` and returns its output.
std::string Cli(const RedisServer& redis, const std::string& args) {
  const std::string command = absl::StrCat("redis-cli -p ", redis.port(), " ", args, " 2>&1");
  std::string out;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return out;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) out.append(buffer, n);
  pclose(pipe);
  return out;
}

int64_t DbSize(const RedisServer& redis) {
  int64_t n = -1;
  EXPECT_TRUE(absl::SimpleAtoi(absl::StripAsciiWhitespace(Cli(redis, "DBSIZE")), &n));
  return n;
}

std::unique_ptr<RedisStateTier> Connect(const RedisServer& redis, int64_t chunk_bytes = 64 << 10,
                                        absl::Duration timeout = absl::Milliseconds(300)) {
  RedisTierOptions options;
  EXPECT_THAT(ParseRedisAddress(redis.address(), "--state_tier", &options), IsOk());
  options.chunk_bytes = chunk_bytes;
  options.timeout = timeout;
  options.retry_interval = absl::Milliseconds(200);
  absl::StatusOr<std::unique_ptr<RedisStateTier>> tier = RedisStateTier::Create(options);
  EXPECT_THAT(tier.status(), IsOk());
  return tier.ok() ? *std::move(tier) : nullptr;
}

// A Get's answer as one string: the value, "<none>", or "<error: ...>".
std::string Got(const absl::StatusOr<std::optional<std::string>>& got) {
  if (!got.ok()) return absl::StrCat("<error: ", got.status().ToString(), ">");
  return got->has_value() ? **got : "<none>";
}
// A Lease's answer as one string: "held", "other" or "<error: ...>".
std::string Leased(const absl::StatusOr<bool>& got) {
  if (!got.ok()) return absl::StrCat("<error: ", got.status().ToString(), ">");
  return *got ? "held" : "other";
}

std::string Bytes(size_t n, int seed) {
  std::string out(n, '\0');
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<char>((i * 31 + seed * 7 + (i >> 9)) & 0xff);
  return out;
}

TEST(RedisStateTierTest, AddressesAreCheckedAndNamed) {
  RedisTierOptions options;
  EXPECT_THAT(ParseRedisAddress("redis:6379", "--state_tier", &options), IsOk());
  EXPECT_EQ(options.host, "redis");
  EXPECT_EQ(options.port, 6379);
  EXPECT_THAT(ParseRedisAddress("redis://10.0.0.7:7000", "--state_tier", &options), IsOk());
  EXPECT_EQ(options.host, "10.0.0.7");
  EXPECT_EQ(options.port, 7000);
  for (const char* bad : {"redis", ":6379", "redis:0", "redis:65536", "redis:x"}) {
    EXPECT_THAT(ParseRedisAddress(bad, "--state_tier", &options),
                StatusIs(absl::StatusCode::kInvalidArgument, "--state_tier"))
        << bad;
  }
}

TEST(RedisStateTierTest, ValuesRoundTripInChunksAndReplacingLeavesNoChunks) {
  RedisServer redis;
  ASSERT_TRUE(redis.running());
  auto tier = Connect(redis);
  ASSERT_NE(tier, nullptr);
  EXPECT_THAT(tier->Ping(), IsOk());
  EXPECT_EQ(Got(tier->Get("missing")), "<none>");
  const std::string big = Bytes(2'630'656 + 123, 1);  // a tiny-polysketch state and a header
  ASSERT_THAT(tier->Put("k", big, absl::Minutes(1)), IsOk());
  EXPECT_TRUE(Got(tier->Get("k")) == big);
  const int64_t chunks = (static_cast<int64_t>(big.size()) + (64 << 10) - 1) / (64 << 10);
  EXPECT_EQ(DbSize(redis), 1 + chunks);  // the manifest and the chunks
  const std::string other = Bytes(100'000, 2);
  ASSERT_THAT(tier->Put("k", other, absl::Minutes(1)), IsOk());
  EXPECT_EQ(Got(tier->Get("k")), other);
  EXPECT_EQ(DbSize(redis), 1 + 2);  // the old generation's chunks are gone
  ASSERT_THAT(tier->Put("empty", "", absl::Minutes(1)), IsOk());
  EXPECT_EQ(Got(tier->Get("empty")), std::string());
  ASSERT_THAT(tier->Delete("k"), IsOk());
  ASSERT_THAT(tier->Delete("empty"), IsOk());
  EXPECT_EQ(Got(tier->Get("k")), "<none>");
  EXPECT_EQ(DbSize(redis), 0);
}

// Present answers for many keys in one pipeline: values (whatever their chunks), not leases or
// chunk keys of their own, and not once expired or deleted.
TEST(RedisStateTierTest, PresentAnswersEveryKeyInOneCall) {
  RedisServer redis;
  ASSERT_TRUE(redis.running());
  auto tier = Connect(redis, 1024);
  ASSERT_NE(tier, nullptr);
  PS_ASSERT_OK_AND_ASSIGN(std::vector<bool> none, tier->Present({}));
  EXPECT_TRUE(none.empty());
  ASSERT_THAT(tier->Put("a", Bytes(5000, 5), absl::Minutes(1)), IsOk());
  ASSERT_THAT(tier->Put("c", "", absl::Minutes(1)), IsOk());
  ASSERT_THAT(tier->Put("short", "x", absl::Milliseconds(100)), IsOk());
  std::vector<std::string> keys = {"a", "b", "c", "short"};
  PS_ASSERT_OK_AND_ASSIGN(std::vector<bool> present, tier->Present(keys));
  EXPECT_EQ(present, (std::vector<bool>{true, false, true, true}));
  absl::SleepFor(absl::Milliseconds(300));
  ASSERT_THAT(tier->Delete("c"), IsOk());
  PS_ASSERT_OK_AND_ASSIGN(present, tier->Present(keys));
  EXPECT_EQ(present, (std::vector<bool>{true, false, false, false}));
  redis.Stop();
  EXPECT_THAT(tier->Present(keys).status(), StatusIs(absl::StatusCode::kUnavailable));
}

TEST(RedisStateTierTest, ValuesAndLeasesExpire) {
  RedisServer redis;
  ASSERT_TRUE(redis.running());
  auto tier = Connect(redis);
  ASSERT_NE(tier, nullptr);
  ASSERT_THAT(tier->Put("short", Bytes(200'000, 3), absl::Milliseconds(150)), IsOk());
  std::string other;
  EXPECT_EQ(Leased(tier->Lease("lease", "a", absl::Milliseconds(150))), "held");
  EXPECT_EQ(Leased(tier->Lease("lease", "b", absl::Seconds(5), &other)), "other");
  EXPECT_EQ(other, "a");
  EXPECT_EQ(Leased(tier->Lease("lease", "a", absl::Milliseconds(150))), "held");
  absl::SleepFor(absl::Milliseconds(400));
  EXPECT_EQ(Got(tier->Get("short")), "<none>");
  EXPECT_EQ(DbSize(redis), 0);  // chunks expire with their manifest
  // a's lease expired: a dead holder blocks nobody for longer than its lease.
  EXPECT_EQ(Leased(tier->Lease("lease", "b", absl::Seconds(5))), "held");
  EXPECT_THAT(tier->Unlease("lease", "a"), IsOk());  // not a's: nothing happens
  EXPECT_EQ(Leased(tier->Lease("lease", "a", absl::Seconds(5))), "other");
  EXPECT_THAT(tier->Unlease("lease", "b"), IsOk());
  EXPECT_EQ(Leased(tier->Lease("lease", "a", absl::Seconds(5))), "held");
}

TEST(RedisStateTierTest, DownRestartedAndSlowRedisAreClearErrors) {
  RedisServer redis;
  ASSERT_TRUE(redis.running());
  auto tier = Connect(redis);
  ASSERT_NE(tier, nullptr);
  ASSERT_THAT(tier->Put("k", Bytes(1000, 4), absl::Minutes(1)), IsOk());
  redis.Stop();
  // The pooled connection finds the server gone; then connects fail, and within the retry
  // interval calls fail at once without trying.
  EXPECT_THAT(tier->Get("k"), StatusIs(absl::StatusCode::kUnavailable, redis.address()));
  const absl::Time start = absl::Now();
  EXPECT_THAT(tier->Put("k", "v", absl::Minutes(1)),
              StatusIs(absl::StatusCode::kUnavailable, "unreachable"));
  EXPECT_THAT(tier->Lease("l", "a", absl::Seconds(1)).status(),
              StatusIs(absl::StatusCode::kUnavailable, "unreachable"));
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  // Back (empty: no persistence): the tier reconnects by itself.
  ASSERT_TRUE(redis.Start());
  absl::SleepFor(absl::Milliseconds(250));
  EXPECT_EQ(Got(tier->Get("k")), "<none>");
  ASSERT_THAT(tier->Put("k", "v", absl::Minutes(1)), IsOk());
  // Frozen (SIGSTOP): no answer within the timeout.
  redis.Pause();
  const absl::Time frozen = absl::Now();
  EXPECT_THAT(tier->Get("k"), StatusIs(absl::StatusCode::kDeadlineExceeded, "timeout"));
  EXPECT_LT(absl::Now() - frozen, absl::Seconds(2));
  redis.Resume();
  absl::SleepFor(absl::Milliseconds(250));
  EXPECT_EQ(Got(tier->Get("k")), std::string("v"));
}

TEST(RedisStateTierTest, AFullRedisIsResourceExhausted) {
  RedisServer redis({"--maxmemory", "3mb", "--maxmemory-policy", "noeviction"});
  ASSERT_TRUE(redis.running());
  auto tier = Connect(redis);
  ASSERT_NE(tier, nullptr);
  absl::Status status;
  for (int i = 0; i < 10 && status.ok(); ++i) {
    status = tier->Put(absl::StrCat("k", i), Bytes(1 << 20, i), absl::Minutes(1));
  }
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kResourceExhausted, "full"));
  // What was stored still reads back whole.
  EXPECT_TRUE(Got(tier->Get("k0")) == Bytes(1 << 20, 0));
}

TEST(RedisStateTierTest, ForeignAndDamagedBytesAreDataLoss) {
  RedisServer redis;
  ASSERT_TRUE(redis.running());
  auto tier = Connect(redis);
  ASSERT_NE(tier, nullptr);
  Cli(redis, "SET foreign hello");
  EXPECT_THAT(tier->Get("foreign"), StatusIs(absl::StatusCode::kDataLoss, "not a value"));
  ASSERT_THAT(tier->Put("k", Bytes(200'000, 5), absl::Minutes(1)), IsOk());
  const std::string keys = Cli(redis, "--scan --pattern 'k#*'");
  const std::vector<std::string> chunks = absl::StrSplit(keys, '\n', absl::SkipEmpty());
  ASSERT_EQ(chunks.size(), 4u);
  Cli(redis, absl::StrCat("SETRANGE '", chunks[1], "' 100 X"));
  EXPECT_THAT(tier->Get("k"), StatusIs(absl::StatusCode::kDataLoss, "checksum"));
  Cli(redis, absl::StrCat("DEL '", chunks[2], "'"));
  EXPECT_THAT(tier->Get("k"), StatusIs(absl::StatusCode::kDataLoss, "missing"));
}

}  // namespace
}  // namespace ps::engine
