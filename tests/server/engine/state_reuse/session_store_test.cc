// SessionStore alone: the budget bounds the number of sessions, idle ones expire after the ttl
// (busy ones never), a session is visible to its owner only, one request at a time, and a state
// returned after Close is dropped.
#include "server/engine/state_reuse/session_store.h"

#include <set>
#include <string>

#include <gtest/gtest.h>

#include "tests/testing/status_matchers.h"

namespace ps::engine {
namespace {

using ::ps::test::IsOk;
using ::ps::test::StatusIs;

const absl::Time kT0 = absl::FromUnixSeconds(1'700'000'000);

TEST(SessionStoreTest, TheBudgetBoundsTheSessions) {
  SessionStore store({.budget_bytes = 10'000, .ttl = absl::Minutes(1)}, 3'000);
  std::set<std::string> ids;
  for (int i = 0; i < 3; ++i) {
    PS_ASSERT_OK_AND_ASSIGN(const std::string id, store.Open("", kT0));
    EXPECT_EQ(id.size(), 32u);
    ids.insert(id);
  }
  EXPECT_EQ(ids.size(), 3u);
  EXPECT_THAT(store.Open("", kT0), StatusIs(absl::StatusCode::kResourceExhausted, "budget"));
  EXPECT_EQ(store.stats().bytes, 9'000);
  ASSERT_THAT(store.Close(*ids.begin(), ""), IsOk());
  EXPECT_THAT(store.Open("", kT0).status(), IsOk());
  const SessionStats stats = store.stats();
  EXPECT_EQ(stats.active, 3);
  EXPECT_EQ(stats.opened, 4);
  EXPECT_EQ(stats.closed, 1);
}

TEST(SessionStoreTest, IdleSessionsExpireBusyOnesDoNot) {
  SessionStore store({.budget_bytes = 1 << 20, .ttl = absl::Seconds(10)}, 100);
  PS_ASSERT_OK_AND_ASSIGN(const std::string idle, store.Open("", kT0));
  PS_ASSERT_OK_AND_ASSIGN(const std::string busy, store.Open("", kT0));
  PS_ASSERT_OK_AND_ASSIGN(SequenceState state, store.Take(busy, "", kT0));
  store.ExpireIdle(kT0 + absl::Seconds(11));
  EXPECT_THAT(store.Take(idle, "", kT0 + absl::Seconds(11)),
              StatusIs(absl::StatusCode::kNotFound, "expired"));
  store.Return(busy, "", std::move(state), kT0 + absl::Seconds(12));
  EXPECT_THAT(store.Copy(busy, "", kT0 + absl::Seconds(20)).status(), IsOk());
  EXPECT_EQ(store.stats().expired, 1);
  // Past its ttl, a session is gone for Take even before any sweep ran.
  EXPECT_THAT(store.Take(busy, "", kT0 + absl::Seconds(31)),
              StatusIs(absl::StatusCode::kNotFound, "expired"));
  EXPECT_EQ(store.stats().expired, 2);
  EXPECT_EQ(store.stats().active, 0);
}

TEST(SessionStoreTest, OwnersAndBusySessions) {
  SessionStore store({.budget_bytes = 1 << 20, .ttl = absl::Minutes(1)}, 100);
  PS_ASSERT_OK_AND_ASSIGN(const std::string id, store.Open("alice", kT0));
  EXPECT_THAT(store.Take(id, "bob", kT0), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(store.Take("no-such-id", "alice", kT0), StatusIs(absl::StatusCode::kNotFound));
  SequenceState state;
  state.snapshot.position = 5;
  PS_ASSERT_OK_AND_ASSIGN(const std::string imported, store.Import("alice", state, kT0));
  PS_ASSERT_OK_AND_ASSIGN(SequenceState taken, store.Take(imported, "alice", kT0));
  EXPECT_EQ(taken.snapshot.position, 5);
  EXPECT_THAT(store.Take(imported, "alice", kT0),
              StatusIs(absl::StatusCode::kFailedPrecondition, "in progress"));
  // Closed while busy: the returned state is dropped.
  ASSERT_THAT(store.Close(imported, "alice"), IsOk());
  store.Return(imported, "alice", std::move(taken), kT0);
  EXPECT_THAT(store.Take(imported, "alice", kT0), StatusIs(absl::StatusCode::kNotFound));
}

TEST(SessionStoreTest, OffWithoutABudget) {
  SessionStore store({}, 100);
  EXPECT_THAT(store.Open("", kT0), StatusIs(absl::StatusCode::kFailedPrecondition, "disabled"));
}

}  // namespace
}  // namespace ps::engine
