// Sessions in the shared tier, through two schedulers of the same model (two replicas): with a real
// redis-server started by the test, a conversation whose turns alternate between the replicas
// gives exactly the outputs of one process; a replica that has never seen a session continues it
// from Redis; a lease keeps two replicas from running one session's turns at once; Redis down,
// restarted or returning damaged or foreign bytes leaves every session the replica holds
// running from memory, and one it does not hold fails with a clear error. With the in-memory tier
// (MemoryStateTier): copies the tier holds are dropped first when the budget is full, and Flush
// waits for the writes.
#include "server/engine/state_reuse/session_tier.h"

#include <condition_variable>
#include <memory>
#include <mutex>
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
using ::ps::test::StatusIs;

constexpr char kFixture[] = "polysketch-learned-local";

std::vector<int32_t> Tokens(int seed, int n) {
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i)
    out.push_back(static_cast<int32_t>((seed * 131 + i * 17 + i * i) % 200));
  return out;
}

class SessionTierTest : public ::testing::Test {
 protected:
  std::unique_ptr<Scheduler> Replica(StateTier* tier, const std::string& name,
                                     int64_t budget = int64_t{1} << 30) {
    ModelOptions model_options;
    model_options.num_slots = 2;
    model_options.max_batch = 2;
    model_options.prefill_chunk = 16;
    model_options.max_context = 512;
    SchedulerOptions options;
    options.sessions.budget_bytes = budget;
    options.shared_tier = tier;
    options.shared_tier_options.replica = name;
    options.shared_tier_options.lease = absl::Seconds(2);
    options.shared_tier_options.lease_wait = absl::Milliseconds(300);
    options.shared_tier_options.retry_interval = absl::Milliseconds(100);
    return test::MakeFixtureScheduler(kFixture, backend_, model_options, std::move(options));
  }

  // One greedy turn; its tokens, or the Submit error.
  absl::StatusOr<std::vector<int32_t>> Turn(Scheduler& scheduler, const std::string& session,
                                            std::vector<int32_t> prompt, int n = 6,
                                            const std::string& owner = "") {
    auto recorder = std::make_shared<Recorder>();
    EngineRequest r;
    r.id = absl::StrCat("r", next_id_++);
    r.prompt = std::move(prompt);
    r.sampling.temperature = 0.0f;
    r.stops.max_new_tokens = n;
    r.session_id = session;
    r.owner = owner;
    r.observer = recorder;
    PS_RETURN_IF_ERROR(scheduler.Submit(std::move(r)));
    EXPECT_TRUE(recorder->Wait());
    return recorder->tokens();
  }

  std::unique_ptr<RedisStateTier> Connect(const RedisServer& redis) {
    RedisTierOptions options;
    EXPECT_THAT(ParseRedisAddress(redis.address(), "--state_tier", &options), IsOk());
    options.timeout = absl::Milliseconds(300);
    options.retry_interval = absl::Milliseconds(100);
    auto tier = RedisStateTier::Create(options);
    EXPECT_THAT(tier.status(), IsOk());
    return tier.ok() ? *std::move(tier) : nullptr;
  }

  kernels::cpu::CpuBackend backend_{2};
  int next_id_ = 0;
};

TEST_F(SessionTierTest, TurnsAlternatingBetweenReplicasEqualOneProcess) {
  RedisServer redis;
  ASSERT_TRUE(redis.running());
  // Each replica has its own connection pool, as two processes would.
  auto tier_a = Connect(redis);
  auto tier_b = Connect(redis);
  auto a = Replica(tier_a.get(), "a");
  auto b = Replica(tier_b.get(), "b");
  auto alone = Replica(nullptr, "alone");
  ASSERT_TRUE(a && b && alone);
  PS_ASSERT_OK_AND_ASSIGN(const std::string shared, a->OpenSession("alice"));
  PS_ASSERT_OK_AND_ASSIGN(const std::string single, alone->OpenSession("alice"));
  Scheduler* replicas[] = {a.get(), b.get(), b.get(), a.get(), b.get()};
  for (int turn = 0; turn < 5; ++turn) {
    const std::vector<int32_t> prompt = Tokens(turn, 5 + 3 * turn);
    PS_ASSERT_OK_AND_ASSIGN(std::vector<int32_t> want, Turn(*alone, single, prompt, 6, "alice"));
    absl::StatusOr<std::vector<int32_t>> got;
    // The previous turn's write may still be on its way (the lease waits for it).
    got = Turn(*replicas[turn], shared, prompt, 6, "alice");
    ASSERT_THAT(got.status(), IsOk()) << "turn " << turn;
    EXPECT_EQ(*got, want) << "turn " << turn;
  }
  ASSERT_THAT(a->FlushSessions(absl::Now() + absl::Seconds(5)), IsOk());
  ASSERT_THAT(b->FlushSessions(absl::Now() + absl::Seconds(5)), IsOk());
  const SessionTierStats sa = a->Stats().tier, sb = b->Stats().tier;
  // Every completed turn's state, and the open's unless turn 0 came before the writer took it (a
  // queued write of a session is replaced by its newer one).
  EXPECT_GE(sa.writes + sb.writes, 5);
  EXPECT_LE(sa.writes + sb.writes, 1 + 5);
  EXPECT_EQ(sa.hits + sb.hits, 5);
  EXPECT_EQ(sa.misses + sb.misses, 0);  // turn 0 on a may run before the open's write lands
  // b loaded the state twice (turns 1 and 4), a once (turn 3); the rest were current in memory.
  EXPECT_EQ(sa.loads, 1);
  EXPECT_EQ(sb.loads, 2);
  EXPECT_GT(sb.bytes_read, 0);
  // Another identity does not see it on either replica; export works on the replica that did not
  // run the last turn (it reads the newer state).
  EXPECT_THAT(Turn(*a, shared, {1, 2}, 2, "mallory").status(),
              StatusIs(absl::StatusCode::kNotFound, "not found"));
  PS_ASSERT_OK_AND_ASSIGN(Scheduler::SessionState exported_a, a->ExportSession(shared, "alice"));
  PS_ASSERT_OK_AND_ASSIGN(Scheduler::SessionState exported_b, b->ExportSession(shared, "alice"));
  EXPECT_EQ(exported_a.tokens, exported_b.tokens);
  EXPECT_TRUE(exported_a.bytes == exported_b.bytes);
  // Closing on one replica closes it everywhere (b reads its record: gone).
  ASSERT_THAT(a->CloseSession(shared, "alice"), IsOk());
  ASSERT_THAT(a->FlushSessions(absl::Now() + absl::Seconds(5)), IsOk());
  EXPECT_THAT(Turn(*b, shared, {1, 2}, 2, "alice").status(),
              StatusIs(absl::StatusCode::kNotFound, "was closed"));
  EXPECT_EQ(b->Stats().sessions.active, 0);
}

// A memory tier whose value writes wait at a gate (reads and leases pass): a write behind that
// has not landed yet, for as long as a test needs.
class GatedWriteTier final : public StateTier {
 public:
  std::string Describe() const override { return "gated memory tier"; }
  absl::StatusOr<std::optional<std::string>> Get(absl::string_view key) override {
    return inner_.Get(key);
  }
  absl::Status Put(absl::string_view key, absl::string_view value, absl::Duration ttl) override {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return open_; });
    }
    return inner_.Put(key, value, ttl);
  }
  absl::Status Delete(absl::string_view key) override { return inner_.Delete(key); }
  absl::StatusOr<std::vector<bool>> Present(const std::vector<std::string>& keys) override {
    return inner_.Present(keys);
  }
  absl::StatusOr<bool> Lease(absl::string_view key, absl::string_view holder, absl::Duration ttl,
                             std::string* other) override {
    return inner_.Lease(key, holder, ttl, other);
  }
  absl::Status Unlease(absl::string_view key, absl::string_view holder) override {
    return inner_.Unlease(key, holder);
  }
  void Open() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      open_ = true;
    }
    cv_.notify_all();
  }

 private:
  MemoryStateTier inner_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

TEST_F(SessionTierTest, ATurnBeforeItsOwnWriteLandsIsAHitFromMemoryNotAMiss) {
  GatedWriteTier tier;
  auto a = Replica(&tier, "a");
  auto alone = Replica(nullptr, "alone");
  ASSERT_TRUE(a && alone);
  // Opens the gate on every way out, before the replicas' writer threads are joined.
  struct OpenAtExit {
    GatedWriteTier& tier;
    ~OpenAtExit() { tier.Open(); }
  } open_at_exit{tier};
  // The open's write waits at the gate: the tier has no record of the session yet.
  PS_ASSERT_OK_AND_ASSIGN(const std::string id, a->OpenSession(""));
  PS_ASSERT_OK_AND_ASSIGN(const std::string single, alone->OpenSession(""));
  for (int turn = 0; turn < 2; ++turn) {  // the second also runs before the first's write lands
    const std::vector<int32_t> prompt = Tokens(turn, 7);
    PS_ASSERT_OK_AND_ASSIGN(std::vector<int32_t> want, Turn(*alone, single, prompt));
    PS_ASSERT_OK_AND_ASSIGN(std::vector<int32_t> got, Turn(*a, id, prompt));
    EXPECT_EQ(got, want) << "turn " << turn;
  }
  const SessionTierStats held = a->Stats().tier;
  EXPECT_EQ(held.hits, 2);
  EXPECT_EQ(held.misses, 0);  // what the tier lacked was this replica's own unlanded write
  EXPECT_EQ(held.loads, 0);
  EXPECT_EQ(held.writes, 0);
  tier.Open();
  ASSERT_THAT(a->FlushSessions(absl::Now() + absl::Seconds(5)), IsOk());
  EXPECT_GE(a->Stats().tier.writes, 1);  // the newest state landed (older queued ones merge)
  // Now the tier has it: another replica continues from it.
  auto b = Replica(&tier, "b");
  ASSERT_TRUE(b);
  const std::vector<int32_t> prompt = Tokens(2, 7);
  PS_ASSERT_OK_AND_ASSIGN(std::vector<int32_t> want, Turn(*alone, single, prompt));
  PS_ASSERT_OK_AND_ASSIGN(std::vector<int32_t> got, Turn(*b, id, prompt));
  EXPECT_EQ(got, want);
  EXPECT_EQ(b->Stats().tier.loads, 1);
}

TEST_F(SessionTierTest, ALeaseKeepsTwoReplicasFromOneSession) {
  MemoryStateTier tier;
  auto a = Replica(&tier, "a");
  auto b = Replica(&tier, "b");
  ASSERT_TRUE(a && b);
  PS_ASSERT_OK_AND_ASSIGN(const std::string id, a->OpenSession(""));
  ASSERT_THAT(a->FlushSessions(absl::Now() + absl::Seconds(5)), IsOk());
  // Replica "a" is mid-turn (a dead "a" leaves the same lease behind).
  ASSERT_THAT(
      tier.Lease(absl::StrCat("polysketch:", absl::Hex(a->identity().fingerprint, absl::kZeroPad16),
                              ":l:", SessionTier::Scoped(id, "")),
                 "a", absl::Milliseconds(800)),
      IsOk());
  EXPECT_THAT(Turn(*b, id, {1, 2, 3}).status(),
              StatusIs(absl::StatusCode::kFailedPrecondition, "in progress on replica a"));
  EXPECT_EQ(b->Stats().tier.lease_busy, 1);
  absl::SleepFor(absl::Milliseconds(900));  // its lease ends: b continues the session
  EXPECT_THAT(Turn(*b, id, {1, 2, 3}).status(), IsOk());
}

TEST_F(SessionTierTest, FaultsLeaveHeldSessionsServingAndNameTheCause) {
  MemoryStateTier tier;
  auto a = Replica(&tier, "a");
  auto b = Replica(&tier, "b");
  auto alone = Replica(nullptr, "alone");
  ASSERT_TRUE(a && b && alone);
  PS_ASSERT_OK_AND_ASSIGN(const std::string id, a->OpenSession(""));
  PS_ASSERT_OK_AND_ASSIGN(const std::string single, alone->OpenSession(""));
  PS_ASSERT_OK_AND_ASSIGN(auto w1, Turn(*alone, single, Tokens(1, 9)));
  PS_ASSERT_OK_AND_ASSIGN(auto g1, Turn(*a, id, Tokens(1, 9)));
  EXPECT_EQ(g1, w1);
  // The tier goes down: a continues from memory; b, which does not hold it, says why it cannot.
  tier.Fail(absl::UnavailableError("redis 10.0.0.7:6379 unreachable: Connection refused"));
  PS_ASSERT_OK_AND_ASSIGN(auto w2, Turn(*alone, single, Tokens(2, 7)));
  PS_ASSERT_OK_AND_ASSIGN(auto g2, Turn(*a, id, Tokens(2, 7)));
  EXPECT_EQ(g2, w2);
  EXPECT_THAT(Turn(*b, id, {1}).status(),
              StatusIs(absl::StatusCode::kUnavailable, "10.0.0.7:6379 unreachable"));
  EXPECT_GT(a->Stats().tier.errors[static_cast<int>(TierError::kUnreachable)], 0);
  // Slow: the same, as a timeout.
  tier.Fail(absl::DeadlineExceededError("redis: no answer within the timeout"));
  PS_ASSERT_OK_AND_ASSIGN(auto w3, Turn(*alone, single, Tokens(3, 4)));
  PS_ASSERT_OK_AND_ASSIGN(auto g3, Turn(*a, id, Tokens(3, 4)));
  EXPECT_EQ(g3, w3);
  EXPECT_THAT(Turn(*b, id, {1}).status(), StatusIs(absl::StatusCode::kUnavailable, "timeout"));
  // Back: a's queued write (retried) reaches the tier, and b continues where a left off.
  tier.Fail(absl::OkStatus());
  ASSERT_THAT(a->FlushSessions(absl::Now() + absl::Seconds(5)), IsOk());
  PS_ASSERT_OK_AND_ASSIGN(auto w4, Turn(*alone, single, Tokens(4, 5)));
  PS_ASSERT_OK_AND_ASSIGN(auto g4, Turn(*b, id, Tokens(4, 5)));
  EXPECT_EQ(g4, w4);
  ASSERT_THAT(b->FlushSessions(absl::Now() + absl::Seconds(5)), IsOk());
  // Damaged or foreign bytes under the session's record: a replica that does not hold the
  // session refuses them, naming why (counted by kind).
  const std::string prefix =
      absl::StrCat("polysketch:", absl::Hex(a->identity().fingerprint, absl::kZeroPad16), ":");
  tier.Set(prefix + "s:" + SessionTier::Scoped(id, ""), "garbage that is not a session record");
  auto c = Replica(&tier, "c");
  ASSERT_NE(c, nullptr);
  EXPECT_THAT(Turn(*c, id, {1}).status(), StatusIs(absl::StatusCode::kNotFound, "foreign bytes"));
  EXPECT_EQ(c->Stats().tier.errors[static_cast<int>(TierError::kDamaged)], 1);
  // A state of another model (valid record, other fingerprint): refused, naming both.
  {
    ModelIdentity other = a->identity();
    other.fingerprint ^= 1;
    SequenceState empty;
    std::string record("PSKSESS1", 8);
    const int64_t version = 99;
    const uint32_t owner_bytes = 0;
    record.append(reinterpret_cast<const char*>(&version), 8);
    record.append(reinterpret_cast<const char*>(&owner_bytes), 4);
    record += EncodeState(empty, other);
    tier.Set(prefix + "s:" + SessionTier::Scoped(id, ""), record);
    tier.Set(prefix + "v:" + SessionTier::Scoped(id, ""), "99");
  }
  EXPECT_THAT(Turn(*c, id, {1}).status(), StatusIs(absl::StatusCode::kNotFound, "another model"));
  EXPECT_EQ(c->Stats().tier.errors[static_cast<int>(TierError::kForeign)], 1);
  // b holds version 5 in memory; the tier claims 99 and hands a foreign state: b keeps serving
  // its own copy.
  PS_ASSERT_OK_AND_ASSIGN(auto w5, Turn(*alone, single, Tokens(5, 3)));
  PS_ASSERT_OK_AND_ASSIGN(auto g5, Turn(*b, id, Tokens(5, 3)));
  EXPECT_EQ(g5, w5);
}

// The tier keeps identities apart as the prefix cache does: a session is reachable only by the
// identity that opened it, on every replica. Another identity naming its id reads nothing, holds
// no lease that would block the owner, and cannot close it; a record that reaches another
// identity's keys anyway (an owner tag collision) is still refused by its recorded owner.
TEST_F(SessionTierTest, AnotherIdentityNeverGetsTheSessionOnAnyReplica) {
  MemoryStateTier tier;
  auto a = Replica(&tier, "a");
  auto b = Replica(&tier, "b");
  auto alone = Replica(nullptr, "alone");
  ASSERT_TRUE(a && b && alone);
  PS_ASSERT_OK_AND_ASSIGN(const std::string id, a->OpenSession("alice"));
  PS_ASSERT_OK_AND_ASSIGN(const std::string single, alone->OpenSession("alice"));
  PS_ASSERT_OK_AND_ASSIGN(auto w1, Turn(*alone, single, Tokens(1, 9), 6, "alice"));
  PS_ASSERT_OK_AND_ASSIGN(auto g1, Turn(*a, id, Tokens(1, 9), 6, "alice"));
  EXPECT_EQ(g1, w1);
  ASSERT_THAT(a->FlushSessions(absl::Now() + absl::Seconds(5)), IsOk());
  // Mallory on the replica that does not hold it, and on the one that does.
  EXPECT_THAT(Turn(*b, id, {1}, 6, "mallory").status(),
              StatusIs(absl::StatusCode::kNotFound, "not found"));
  EXPECT_THAT(Turn(*a, id, {1}, 6, "mallory").status(),
              StatusIs(absl::StatusCode::kNotFound, "not found"));
  EXPECT_THAT(b->ExportSession(id, "mallory").status(), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(b->CloseSession(id, "mallory"), StatusIs(absl::StatusCode::kNotFound));
  ASSERT_THAT(b->FlushSessions(absl::Now() + absl::Seconds(5)), IsOk());
  // Mallory's tries left no lease on alice's session, nor any record of their own.
  const std::string prefix =
      absl::StrCat("polysketch:", absl::Hex(a->identity().fingerprint, absl::kZeroPad16), ":");
  PS_ASSERT_OK_AND_ASSIGN(
      const bool free,
      tier.Lease(prefix + "l:" + SessionTier::Scoped(id, "alice"), "probe", absl::Milliseconds(1)));
  EXPECT_TRUE(free);
  PS_ASSERT_OK_AND_ASSIGN(auto mallorys,
                          tier.Get(prefix + "s:" + SessionTier::Scoped(id, "mallory")));
  EXPECT_FALSE(mallorys.has_value());
  absl::SleepFor(absl::Milliseconds(5));
  // Mallory mid-turn on a replica "m" with alice's id (a lease held under mallory's keys, as
  // such a turn takes it before it finds nothing to read) holds up nothing of alice's.
  PS_ASSERT_OK_AND_ASSIGN(
      const bool taken,
      tier.Lease(prefix + "l:" + SessionTier::Scoped(id, "mallory"), "m", absl::Seconds(30)));
  ASSERT_TRUE(taken);
  // Alice continues on b, where a left off.
  PS_ASSERT_OK_AND_ASSIGN(auto w2, Turn(*alone, single, Tokens(2, 7), 6, "alice"));
  PS_ASSERT_OK_AND_ASSIGN(auto g2, Turn(*b, id, Tokens(2, 7), 6, "alice"));
  EXPECT_EQ(g2, w2);
  ASSERT_THAT(b->FlushSessions(absl::Now() + absl::Seconds(5)), IsOk());
  ASSERT_THAT(tier.Unlease(prefix + "l:" + SessionTier::Scoped(id, "mallory"), "m"), IsOk());
  // Alice's record copied under mallory's keys (as if the owner tags collided): c, which holds
  // nothing, still refuses it to mallory, by the owner the record names.
  PS_ASSERT_OK_AND_ASSIGN(auto record, tier.Get(prefix + "s:" + SessionTier::Scoped(id, "alice")));
  PS_ASSERT_OK_AND_ASSIGN(auto version, tier.Get(prefix + "v:" + SessionTier::Scoped(id, "alice")));
  ASSERT_TRUE(record.has_value() && version.has_value());
  tier.Set(prefix + "s:" + SessionTier::Scoped(id, "mallory"), *record);
  tier.Set(prefix + "v:" + SessionTier::Scoped(id, "mallory"), *version);
  auto c = Replica(&tier, "c");
  ASSERT_NE(c, nullptr);
  EXPECT_THAT(Turn(*c, id, {1}, 6, "mallory").status(),
              StatusIs(absl::StatusCode::kNotFound, "not found"));
  PS_ASSERT_OK_AND_ASSIGN(auto w3, Turn(*alone, single, Tokens(3, 4), 6, "alice"));
  PS_ASSERT_OK_AND_ASSIGN(auto g3, Turn(*c, id, Tokens(3, 4), 6, "alice"));
  EXPECT_EQ(g3, w3);
}

TEST_F(SessionTierTest, CopiesTheTierHoldsMakeRoomWhenTheBudgetIsFull) {
  MemoryStateTier tier;
  auto probe = Replica(nullptr, "probe");
  ASSERT_NE(probe, nullptr);
  const int64_t per_session = probe->sessions().bytes_per_session();
  auto a = Replica(&tier, "a", 2 * per_session);
  ASSERT_NE(a, nullptr);
  PS_ASSERT_OK_AND_ASSIGN(const std::string s1, a->OpenSession(""));
  PS_ASSERT_OK_AND_ASSIGN(const std::string s2, a->OpenSession(""));
  ASSERT_THAT(Turn(*a, s1, Tokens(1, 5)).status(), IsOk());
  ASSERT_THAT(a->FlushSessions(absl::Now() + absl::Seconds(5)), IsOk());
  // Full, but both copies are in the tier: the least recently used goes, and comes back on use.
  PS_ASSERT_OK_AND_ASSIGN(const std::string s3, a->OpenSession(""));
  EXPECT_EQ(a->Stats().sessions.evicted, 1);
  ASSERT_THAT(a->FlushSessions(absl::Now() + absl::Seconds(5)), IsOk());
  EXPECT_THAT(Turn(*a, s2, Tokens(2, 5)).status(), IsOk());
  EXPECT_THAT(Turn(*a, s1, Tokens(3, 5)).status(), IsOk());
  EXPECT_GE(a->Stats().tier.loads, 2);
  (void)s3;
}

}  // namespace
}  // namespace ps::engine
