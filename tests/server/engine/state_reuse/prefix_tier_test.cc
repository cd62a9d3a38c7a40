// Prefix-cache snapshots in the shared tier, through schedulers of the same model (replicas): with
// a real redis-server started by the test, a prompt prefix that replica a computed is restored on
// replica b, which then prefills only the rest of the prompt (counted in prefill tokens the engine
// computed, not in time), with exactly the output of a replica that computed it all. With the
// in-memory tier (MemoryStateTier): the tier keeps identities and cache salts apart exactly as the
// local cache does; a damaged, foreign or unreachable tier costs a full prefill, never a request.
#include "server/engine/state_reuse/prefix_tier.h"

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <absl/strings/str_cat.h>
#include <absl/time/clock.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "kernels/cpu/cpu_backend.h"
#include "server/engine/serving/scheduler.h"
#include "server/engine/state_reuse/redis_state_tier.h"
#include "tests/testing/recorder.h"
#include "tests/testing/redis_server.h"
#include "tests/testing/scheduler_fixture.h"
#include "tests/testing/status_matchers.h"

namespace ps::engine {
namespace {

using ::ps::test::IsOk;
using ::ps::test::Recorder;
using ::ps::test::RedisServer;

constexpr char kFixture[] = "polysketch-learned-local";
constexpr int64_t kGranularity = 8;

std::vector<int32_t> Tokens(int seed, int n) {
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i)
    out.push_back(static_cast<int32_t>((seed * 131 + i * 17 + i * i) % 200));
  return out;
}

std::vector<int32_t> Concat(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  std::vector<int32_t> out = a;
  out.insert(out.end(), b.begin(), b.end());
  return out;
}

struct Output {
  std::vector<int32_t> tokens;
  int64_t cached = 0;    // FinalResult::cached_tokens
  int64_t computed = 0;  // prompt tokens the engine prefilled for it (StepStats)
};

class PrefixTierTest : public ::testing::Test {
 protected:
  struct Replica {
    std::unique_ptr<Scheduler> scheduler;
    std::shared_ptr<std::atomic<int64_t>> prefilled = std::make_shared<std::atomic<int64_t>>(0);
  };

  // A replica with the prefix cache on (granularity 8), sharing its prefixes through `tier`
  // (none when null).
  Replica Make(StateTier* tier, bool shared_across_owners = false) {
    ModelOptions model_options;
    model_options.num_slots = 2;
    model_options.max_batch = 2;
    model_options.prefill_chunk = 16;
    model_options.max_context = 512;
    SchedulerOptions options;
    options.prefix_cache.budget_bytes = int64_t{1} << 30;
    options.prefix_cache.granularity = kGranularity;
    options.prefix_cache.shared_across_owners = shared_across_owners;
    options.shared_tier = tier;
    options.shared_tier_options.replica = "replica";
    options.share_prefixes = true;
    Replica replica;
    options.on_step = [prefilled = replica.prefilled](const StepStats& step) {
      prefilled->fetch_add(step.prefill_tokens);
    };
    replica.scheduler =
        test::MakeFixtureScheduler(kFixture, backend_, model_options, std::move(options));
    return replica;
  }

  // One greedy request, alone on the replica.
  Output Run(Replica& replica, std::vector<int32_t> prompt, const std::string& owner = "",
             const std::string& salt = "") {
    const int64_t before = replica.prefilled->load();
    auto recorder = std::make_shared<Recorder>();
    EngineRequest r;
    r.id = absl::StrCat("r", next_id_++);
    r.prompt = std::move(prompt);
    r.sampling.temperature = 0.0f;
    r.stops.max_new_tokens = 5;
    r.owner = owner;
    r.prefix_cache_salt = salt;
    r.observer = recorder;
    EXPECT_THAT(replica.scheduler->Submit(std::move(r)), IsOk());
    EXPECT_TRUE(recorder->Wait());
    return {recorder->tokens(), recorder->result().cached_tokens,
            replica.prefilled->load() - before};
  }

  // Replica a computes `system` twice (with two questions), so its cache, and through it the
  // tier, holds the state of system's whole blocks.
  void Warm(Replica& a, const std::vector<int32_t>& system, const std::string& owner = "",
            const std::string& salt = "") {
    Run(a, Concat(system, Tokens(50, 6)), owner, salt);
    Run(a, Concat(system, Tokens(51, 7)), owner, salt);
    ASSERT_THAT(a.scheduler->FlushSessions(absl::Now() + absl::Seconds(10)), IsOk());
  }

  kernels::cpu::CpuBackend backend_{2};
  int next_id_ = 0;
};

TEST_F(PrefixTierTest, ASecondReplicaRestoresTheFirstsPrefixThroughRedis) {
  RedisServer redis;
  ASSERT_TRUE(redis.running());
  // A connection pool per replica, as two processes would have.
  RedisTierOptions redis_options;
  ASSERT_THAT(ParseRedisAddress(redis.address(), "--state_tier", &redis_options), IsOk());
  redis_options.chunk_bytes = 4096;  // a state spans several chunks
  auto tier_a = RedisStateTier::Create(redis_options);
  auto tier_b = RedisStateTier::Create(redis_options);
  ASSERT_TRUE(tier_a.ok() && tier_b.ok());
  Replica a = Make(tier_a->get());
  Replica b = Make(tier_b->get());
  Replica alone = Make(nullptr);
  ASSERT_TRUE(a.scheduler && b.scheduler && alone.scheduler);
  const std::vector<int32_t> system = Tokens(1, 83);  // 10 whole blocks of 8, and 3
  Warm(a, system);
  EXPECT_GE(a.scheduler->Stats().prefix_tier.writes, 2);

  const std::vector<int32_t> prompt = Concat(system, Tokens(52, 9));  // 92 tokens
  const Output want = Run(alone, prompt);
  EXPECT_EQ(want.cached, 0);
  EXPECT_EQ(want.computed, 92);
  const Output got = Run(b, prompt);
  EXPECT_EQ(got.tokens, want.tokens);
  EXPECT_EQ(got.cached, 80);
  EXPECT_EQ(got.computed, 92 - 80);
  const PrefixTierStats stats = b.scheduler->Stats().prefix_tier;
  EXPECT_EQ(stats.hits, 1);
  EXPECT_EQ(stats.tokens, 80);
  EXPECT_GT(stats.bytes_read, 0);
  // b keeps a copy: its next request of the same prefix hits its own cache, not the tier.
  const Output again = Run(b, Concat(system, Tokens(53, 4)));
  EXPECT_EQ(again.cached, 80);
  EXPECT_EQ(b.scheduler->Stats().prefix_tier.hits, 1);
  EXPECT_EQ(b.scheduler->Stats().prefix_cache.hits, 1);
}

// The tier keeps prefixes in the local cache's scopes: the identity that left them (unless the
// cache is shared across identities) and the cache salt.
TEST_F(PrefixTierTest, OnlyTheSameIdentityAndSaltFindAPrefix) {
  const std::vector<int32_t> system = Tokens(2, 43);  // 5 whole blocks of 8, and 3
  const std::vector<int32_t> prompt = Concat(system, Tokens(60, 5));
  for (const bool shared : {false, true}) {
    SCOPED_TRACE(shared ? "shared across identities" : "per identity");
    MemoryStateTier tier;
    Replica a = Make(&tier, shared);
    ASSERT_TRUE(a.scheduler);
    Warm(a, system, "alice");
    Warm(a, system, "alice", "x");
    // Each a fresh replica, so that only the tier can give it the prefix.
    auto on_fresh = [&](const std::string& owner, const std::string& salt) {
      Replica b = Make(&tier, shared);
      return Run(b, prompt, owner, salt).cached;
    };
    EXPECT_EQ(on_fresh("alice", ""), 40);
    EXPECT_EQ(on_fresh("bob", ""), shared ? 40 : 0);
    EXPECT_EQ(on_fresh("", ""), shared ? 40 : 0);
    EXPECT_EQ(on_fresh("alice", "x"), 40);
    EXPECT_EQ(on_fresh("alice", "y"), 0);
    EXPECT_EQ(on_fresh("bob", "x"), shared ? 40 : 0);
  }
}

// What the tier holds is checked on the way in: bytes under a prefix's key that are not its
// record (damaged, another model's state, another scope's) are refused and counted, and the
// request prefills everything, with the right output. So does a tier that is down.
TEST_F(PrefixTierTest, RefusedOrUnreachableTierCostsAPrefillNotARequest) {
  MemoryStateTier tier;
  Replica a = Make(&tier);
  Replica alone = Make(nullptr);
  ASSERT_TRUE(a.scheduler && alone.scheduler);
  const std::vector<int32_t> system = Tokens(3, 43);
  Warm(a, system);
  const std::vector<int32_t> prompt = Concat(system, Tokens(70, 5));
  const Output want = Run(alone, prompt);
  // The key of the 40-token prefix, in the unscoped cache.
  const ModelIdentity& model = a.scheduler->identity();
  PrefixCache keys({.budget_bytes = 1, .granularity = kGranularity}, model.fingerprint);
  const std::vector<uint64_t> hashes = keys.Hashes(prompt);
  const std::string key = PrefixTier::KeyOf(model.fingerprint, hashes[4]);
  PS_ASSERT_OK_AND_ASSIGN(std::optional<std::string> record, tier.Get(key));
  ASSERT_TRUE(record.has_value());

  // Damaged: a flipped byte in the state.
  std::string damaged = *record;
  damaged[damaged.size() - 20] ^= 1;
  tier.Set(key, damaged);
  {
    Replica b = Make(&tier);
    const Output got = Run(b, prompt);
    EXPECT_EQ(got.tokens, want.tokens);
    EXPECT_EQ(got.cached, 0);
    EXPECT_EQ(got.computed, static_cast<int64_t>(prompt.size()));
    EXPECT_EQ(b.scheduler->Stats().prefix_tier.errors[static_cast<int>(TierError::kDamaged)], 1);
  }
  // Another scope's record under this key (as if the hashes collided): not a hit, not an error.
  {
    std::string other = *record;
    other[8] = 1;           // scope bytes: 1 ...
    other.insert(12, "z");  // ... and the scope "z"
    tier.Set(key, other);
    Replica b = Make(&tier);
    const Output got = Run(b, prompt);
    EXPECT_EQ(got.tokens, want.tokens);
    EXPECT_EQ(got.cached, 0);
    EXPECT_EQ(b.scheduler->Stats().prefix_tier.misses, 1);
  }
  // Unreachable.
  tier.Set(key, *record);
  tier.Fail(absl::UnavailableError("redis 10.0.0.7:6379 unreachable: Connection refused"));
  {
    Replica b = Make(&tier);
    const Output got = Run(b, prompt);
    EXPECT_EQ(got.tokens, want.tokens);
    EXPECT_EQ(got.cached, 0);
    // (b's own snapshot write fails too, later or not yet.)
    EXPECT_GE(b.scheduler->Stats().prefix_tier.errors[static_cast<int>(TierError::kUnreachable)],
              1);
  }
  // Back: the record as written is a hit again.
  tier.Fail(absl::OkStatus());
  Replica b = Make(&tier);
  const Output got = Run(b, prompt);
  EXPECT_EQ(got.tokens, want.tokens);
  EXPECT_EQ(got.cached, 40);
  EXPECT_EQ(got.computed, static_cast<int64_t>(prompt.size()) - 40);
}

}  // namespace
}  // namespace ps::engine
