// The state kept beyond a request, through the scheduler, for every attention kind: a prefix
// cache hit gives the outputs of a full prefill; a session's next request gives the outputs of one
// request over the whole conversation; an exported and imported session continues identically;
// a turn that does not complete leaves its session as it was; sessions are private to their
// owner and one request at a time; damaged or foreign states are refused.
#include <cmath>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <absl/strings/str_cat.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "kernels/cpu/cpu_backend.h"
#include "server/engine/model_io/weights.h"
#include "server/engine/serving/scheduler.h"
#include "tests/testing/files.h"
#include "tests/testing/golden.h"
#include "tests/testing/recorder.h"
#include "tests/testing/scheduler_fixture.h"
#include "tests/testing/status_matchers.h"

namespace ps::engine {
namespace {

using ::ps::test::IsOk;
using ::ps::test::Recorder;
using ::ps::test::StatusIs;

// Restored states are prefilled from other chunk boundaries than a full prefill, so logits
// agree to rounding, not bit for bit (the engine's parity budget is 1e-4 relative).
constexpr float kLogprobTolerance = 2e-4f;

struct Output {
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  FinalResult result;
};

void ExpectSameOutput(const Output& got, const Output& want, const std::string& what) {
  EXPECT_EQ(got.tokens, want.tokens) << what;
  ASSERT_EQ(got.logprobs.size(), want.logprobs.size()) << what;
  for (size_t i = 0; i < got.logprobs.size(); ++i) {
    EXPECT_NEAR(got.logprobs[i], want.logprobs[i], kLogprobTolerance) << what << " token " << i;
  }
}

std::vector<int32_t> Tokens(int seed, int n, int64_t vocab) {
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i)
    out.push_back(static_cast<int32_t>((seed * 131 + i * 17 + i * i) % vocab));
  return out;
}

std::vector<int32_t> Concat(std::initializer_list<std::vector<int32_t>> parts) {
  std::vector<int32_t> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

class StateReuseTest : public ::testing::TestWithParam<std::string> {
 protected:
  std::unique_ptr<Scheduler> Make(const std::string& fixture, SchedulerOptions options) {
    ModelOptions model_options;
    model_options.num_slots = 3;
    model_options.max_batch = 3;
    model_options.prefill_chunk = 16;
    model_options.max_context = 512;
    ModelConfig config;
    auto scheduler =
        test::MakeFixtureScheduler(fixture, backend_, model_options, std::move(options), &config);
    vocab_ = config.vocab_size;
    return scheduler;
  }

  static SchedulerOptions CacheOptions() {
    SchedulerOptions options;
    options.prefix_cache.budget_bytes = int64_t{1} << 30;
    options.prefix_cache.granularity = 8;
    options.sessions.budget_bytes = int64_t{1} << 30;
    return options;
  }

  // Runs one greedy request with logprobs to its end.
  Output Run(Scheduler& scheduler, std::vector<int32_t> prompt, int64_t max_new_tokens,
             const std::string& session = "", const std::string& owner = "",
             const std::string& salt = "") {
    auto recorder = std::make_shared<Recorder>();
    EngineRequest r;
    r.id = absl::StrCat("r", next_id_++);
    r.prompt = std::move(prompt);
    r.sampling.temperature = 0.0f;
    r.sampling.logprobs = true;
    r.stops.max_new_tokens = max_new_tokens;
    r.session_id = session;
    r.owner = owner;
    r.prefix_cache_salt = salt;
    r.observer = recorder;
    EXPECT_THAT(scheduler.Submit(std::move(r)), IsOk());
    EXPECT_TRUE(recorder->Wait());
    return {recorder->tokens(), recorder->logprobs(), recorder->result()};
  }

  kernels::cpu::CpuBackend backend_{2};
  int64_t vocab_ = 0;
  int next_id_ = 0;
};

TEST_P(StateReuseTest, PrefixCacheHitEqualsFullPrefill) {
  auto plain = Make(GetParam(), {});
  auto cached = Make(GetParam(), CacheOptions());
  const std::vector<int32_t> system = Tokens(1, 43, vocab_);  // 5 whole blocks of 8, and 3
  for (int user = 0; user < 4; ++user) {
    const std::vector<int32_t> prompt = Concat({system, Tokens(10 + user, 6 + user, vocab_)});
    const Output want = Run(*plain, prompt, 6);
    const Output got = Run(*cached, prompt, 6);
    ExpectSameOutput(got, want, absl::StrCat("user ", user));
    // The first prompt is new; the second shares 40 tokens with it and is snapshotted there;
    // from the third on, those 40 tokens come from the cache.
    EXPECT_EQ(got.result.cached_tokens, user >= 2 ? 40 : 0) << "user " << user;
  }
  // The same prompt again: its own last block boundary was cached.
  const std::vector<int32_t> again = Concat({system, Tokens(13, 9, vocab_)});
  const Output repeat = Run(*cached, again, 6);
  EXPECT_EQ(repeat.result.cached_tokens, 48);
  ExpectSameOutput(repeat, Run(*plain, again, 6), "repeat");
  const PrefixCacheStats stats = cached->Stats().prefix_cache;
  EXPECT_EQ(stats.hits, 3);
  EXPECT_EQ(stats.misses, 2);
  EXPECT_GT(stats.bytes, 0);
}

// Cached prefixes are kept per identity (docs/security.md): identity B gets no hit on the prefix
// identity A left, unless the cache is shared across identities; requests with different salts
// never share, shared or not.
TEST_P(StateReuseTest, PrefixCacheKeepsIdentitiesAndSaltsApart) {
  for (const bool shared : {false, true}) {
    SCOPED_TRACE(shared ? "shared" : "per identity");
    SchedulerOptions options = CacheOptions();
    options.prefix_cache.shared_across_owners = shared;
    auto scheduler = Make(GetParam(), options);
    const std::vector<int32_t> prompt = Tokens(3, 49, vocab_);  // snapshotted at 48
    EXPECT_EQ(Run(*scheduler, prompt, 2, "", "alice").result.cached_tokens, 0);
    EXPECT_EQ(Run(*scheduler, prompt, 2, "", "alice").result.cached_tokens, 48);
    EXPECT_EQ(Run(*scheduler, prompt, 2, "", "bob").result.cached_tokens, shared ? 48 : 0);
    // Salts: a salted request finds only what the same salt (and identity, unless shared) left.
    EXPECT_EQ(Run(*scheduler, prompt, 2, "", "alice", "x").result.cached_tokens, 0);
    EXPECT_EQ(Run(*scheduler, prompt, 2, "", "alice", "x").result.cached_tokens, 48);
    EXPECT_EQ(Run(*scheduler, prompt, 2, "", "alice", "y").result.cached_tokens, 0);
    EXPECT_EQ(Run(*scheduler, prompt, 2, "", "carol", "x").result.cached_tokens, shared ? 48 : 0);
    EXPECT_EQ(Run(*scheduler, prompt, 2, "", "carol", "z").result.cached_tokens, 0);
  }
}

TEST_P(StateReuseTest, SessionContinuationEqualsOneRequestOverTheConversation) {
  auto plain = Make(GetParam(), {});
  auto sessions = Make(GetParam(), CacheOptions());
  PS_ASSERT_OK_AND_ASSIGN(const std::string id, sessions->OpenSession("alice"));
  const std::vector<int32_t> turn1 = Tokens(2, 21, vocab_);
  const std::vector<int32_t> turn2 = Tokens(3, 9, vocab_);
  const std::vector<int32_t> turn3 = Tokens(4, 5, vocab_);
  const Output out1 = Run(*sessions, turn1, 7, id, "alice");
  ExpectSameOutput(out1, Run(*plain, turn1, 7), "turn 1");
  const Output out2 = Run(*sessions, turn2, 7, id, "alice");
  EXPECT_EQ(out2.result.cached_tokens, 21 + 6);  // the last generated token is fed with turn 2
  ExpectSameOutput(out2, Run(*plain, Concat({turn1, out1.tokens, turn2}), 7), "turn 2");
  const Output out3 = Run(*sessions, turn3, 5, id, "alice");
  ExpectSameOutput(out3, Run(*plain, Concat({turn1, out1.tokens, turn2, out2.tokens, turn3}), 5),
                   "turn 3");
}

TEST_P(StateReuseTest, ATurnThatDoesNotCompleteLeavesTheSessionAsItWas) {
  auto plain = Make(GetParam(), {});
  auto sessions = Make(GetParam(), CacheOptions());
  PS_ASSERT_OK_AND_ASSIGN(const std::string id, sessions->OpenSession(""));
  const std::vector<int32_t> turn1 = Tokens(5, 12, vocab_);
  const Output out1 = Run(*sessions, turn1, 4, id);
  // A request already past its deadline ends without running.
  auto recorder = std::make_shared<Recorder>();
  EngineRequest late;
  late.id = "late";
  late.prompt = Tokens(6, 30, vocab_);
  late.stops.max_new_tokens = 3;
  late.deadline = absl::Now() - absl::Seconds(1);
  late.session_id = id;
  late.observer = recorder;
  ASSERT_THAT(sessions->Submit(std::move(late)), IsOk());
  ASSERT_TRUE(recorder->Wait());
  EXPECT_EQ(recorder->result().reason, FinishReason::kDeadline);
  const std::vector<int32_t> turn2 = Tokens(7, 6, vocab_);
  ExpectSameOutput(Run(*sessions, turn2, 5, id),
                   Run(*plain, Concat({turn1, out1.tokens, turn2}), 5), "after the failed turn");
}

TEST_P(StateReuseTest, ExportImportRoundTripContinuesIdentically) {
  auto sessions = Make(GetParam(), CacheOptions());
  PS_ASSERT_OK_AND_ASSIGN(const std::string id, sessions->OpenSession("bob"));
  Run(*sessions, Tokens(8, 19, vocab_), 5, id, "bob");
  PS_ASSERT_OK_AND_ASSIGN(const Scheduler::SessionState exported,
                          sessions->ExportSession(id, "bob"));
  EXPECT_EQ(exported.tokens, 19 + 5);
  const std::string& bytes = exported.bytes;
  PS_ASSERT_OK_AND_ASSIGN(const Scheduler::SessionState imported,
                          sessions->ImportSession(bytes, "bob"));
  EXPECT_EQ(imported.tokens, 19 + 5);
  const std::string copy = imported.id;
  EXPECT_NE(copy, id);
  const std::vector<int32_t> next = Tokens(9, 7, vocab_);
  const Output a = Run(*sessions, next, 6, id, "bob");
  const Output b = Run(*sessions, next, 6, copy, "bob");
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(a.logprobs, b.logprobs);  // the same state and the same computation: bit for bit
  // A flipped byte anywhere is refused.
  std::string damaged = bytes;
  damaged[damaged.size() / 2] ^= 0x10;
  EXPECT_THAT(sessions->ImportSession(damaged, "bob"), StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(sessions->ImportSession(bytes.substr(0, bytes.size() - 9), "bob"),
              StatusIs(absl::StatusCode::kDataLoss));
}

TEST_P(StateReuseTest, SessionsArePrivateAndOneRequestAtATime) {
  auto sessions = Make(GetParam(), CacheOptions());
  PS_ASSERT_OK_AND_ASSIGN(const std::string id, sessions->OpenSession("alice"));
  auto recorder = std::make_shared<Recorder>();
  EngineRequest r;
  r.prompt = Tokens(10, 5, vocab_);
  r.stops.max_new_tokens = 5;
  r.session_id = id;
  r.owner = "mallory";
  r.id = "m";
  r.observer = recorder;
  EXPECT_THAT(sessions->Submit(r), StatusIs(absl::StatusCode::kNotFound, "not found"));
  EXPECT_THAT(sessions->ExportSession(id, "mallory"), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(sessions->CloseSession(id, "mallory"), StatusIs(absl::StatusCode::kNotFound));
  // Alice's long request holds the session; a second one is refused until it ends.
  r.owner = "alice";
  r.id = "long";
  r.stops.max_new_tokens = 100000;
  ASSERT_THAT(sessions->Submit(r), IsOk());
  r.id = "second";
  EXPECT_THAT(sessions->Submit(r), StatusIs(absl::StatusCode::kFailedPrecondition, "in progress"));
  EXPECT_THAT(sessions->ExportSession(id, "alice"),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  ASSERT_THAT(sessions->Cancel("long"), IsOk());
  ASSERT_TRUE(recorder->Wait());
  EXPECT_THAT(sessions->CloseSession(id, "alice"), IsOk());
  EXPECT_THAT(sessions->CloseSession(id, "alice"), StatusIs(absl::StatusCode::kNotFound));
  r.id = "after-close";
  EXPECT_THAT(sessions->Submit(r), StatusIs(absl::StatusCode::kNotFound));
}

TEST_P(StateReuseTest, BudgetsHoldUnderPressure) {
  SchedulerOptions options = CacheOptions();
  auto probe = Make(GetParam(), options);
  const int64_t state_bytes = probe->model().layout().bytes_per_slot();
  const int64_t session_bytes = probe->sessions().bytes_per_session();
  probe.reset();
  // Room for three snapshots (and their tokens) and two sessions.
  options.prefix_cache.budget_bytes = 3 * state_bytes + 3 * 64 * 4;
  options.sessions.budget_bytes = 2 * session_bytes + session_bytes / 2;
  auto scheduler = Make(GetParam(), options);
  for (int i = 0; i < 10; ++i) Run(*scheduler, Tokens(100 + i, 30, vocab_), 2);
  const PrefixCacheStats cache = scheduler->Stats().prefix_cache;
  EXPECT_EQ(cache.insertions, 10);  // each prompt's last block boundary (24)
  EXPECT_EQ(cache.evictions, 7);
  EXPECT_EQ(cache.entries, 3);
  EXPECT_LE(cache.bytes, options.prefix_cache.budget_bytes);
  PS_ASSERT_OK_AND_ASSIGN(const std::string a, scheduler->OpenSession(""));
  PS_ASSERT_OK_AND_ASSIGN(const std::string b, scheduler->OpenSession(""));
  EXPECT_THAT(scheduler->OpenSession(""), StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_LE(scheduler->Stats().sessions.bytes, options.sessions.budget_bytes);
  ASSERT_THAT(scheduler->CloseSession(a, ""), IsOk());
  EXPECT_THAT(scheduler->OpenSession("").status(), IsOk());
  (void)b;
}

// The fixtures whose small random model is stored in the fixture's folder (MakeFixtureScheduler
// loads it from there); the shipped models' fixtures point at models/ and are left out.
std::vector<std::string> SmallFixtures() {
  std::vector<std::string> names;
  for (const std::string& name : test::GoldenFixtureNames()) {
    if (std::filesystem::exists(test::SourcePath("tests/golden/" + name + "/config.json"))) {
      names.push_back(name);
    }
  }
  return names;
}

INSTANTIATE_TEST_SUITE_P(EveryAttentionKind, StateReuseTest, ::testing::ValuesIn(SmallFixtures()),
                         [](const auto& p) { return test::GoldenTestName(p.param); });

// A state from one model is refused by a server of another, naming the reason.
TEST(StateImportTest, AStateOfAnotherModelIsRefused) {
  kernels::cpu::CpuBackend backend(1);
  auto make = [&](const std::string& fixture) {
    SchedulerOptions options;
    options.sessions.budget_bytes = int64_t{1} << 30;
    ModelOptions model_options;
    model_options.num_slots = 1;
    model_options.max_context = 256;
    return test::MakeFixtureScheduler(fixture, backend, model_options, options);
  };
  auto a = make("polysketch-random");
  auto b = make("polysketch-learned");
  PS_ASSERT_OK_AND_ASSIGN(const std::string id, a->OpenSession(""));
  PS_ASSERT_OK_AND_ASSIGN(const Scheduler::SessionState exported, a->ExportSession(id, ""));
  EXPECT_THAT(b->ImportSession(exported.bytes, ""),
              StatusIs(absl::StatusCode::kFailedPrecondition, "another model"));
  EXPECT_THAT(b->ImportSession("not a state", ""), StatusIs(absl::StatusCode::kDataLoss));
}

}  // namespace
}  // namespace ps::engine
