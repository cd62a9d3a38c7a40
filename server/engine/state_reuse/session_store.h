// SessionStore: conversations kept between requests. A session is one sequence's state (a
// SequenceState: the constant-size state plus the token it last produced), kept in host memory
// after each request of the session ends, so that the next request feeds only its new tokens.
//
// Rules:
//   * Ids are 128 random bits (hex), made by the server. A session belongs to the identity that
//     opened it (the authenticated client; "" without authentication); to anyone else it does not
//     exist (NotFound, the same answer as for an unknown id, so ids cannot be probed).
//   * One request at a time per session (Take / Return); a second is refused.
//   * A session unused for `ttl` expires. Close ends one at once.
//   * Memory is bounded: every session reserves `bytes_per_session` from `budget_bytes` when it
//     is opened (a state is the same size at any length), so the number of sessions is bounded
//     and nothing ever grows past the budget; Open refuses when it is full.
//
// With a shared tier (SetTier, session_tier.h) the store is the first of two tiers: every
// completed turn, open and import is written behind to the tier, and Take continues a session this
// process does not hold (or holds an older copy of: another replica ran a turn) from the tier,
// under the tier's lease. Copies in memory that the tier holds too are dropped first when the
// budget is full, so the memory tier is then a cache of the shared one.
//
// Thread-safety: every method may be called from any thread. Take, Close and Copy may block on
// the tier's network calls (bounded by its timeouts): never call them on the engine thread.
#ifndef POLYSKETCH_SERVER_ENGINE_STATE_REUSE_SESSION_STORE_H_
#define POLYSKETCH_SERVER_ENGINE_STATE_REUSE_SESSION_STORE_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include <absl/base/thread_annotations.h>
#include <absl/container/flat_hash_map.h>
#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>
#include <absl/time/time.h>

#include "server/engine/state_reuse/session_tier.h"
#include "server/engine/state_reuse/state_codec.h"

namespace ps::engine {

struct SessionOptions {
  int64_t budget_bytes = 0;  // 0: sessions are off
  absl::Duration ttl = absl::Minutes(30);
};

struct SessionStats {
  int64_t active = 0;  // sessions open now
  int64_t bytes = 0;   // reserved by them
  int64_t opened = 0;  // all time (Open and Import)
  int64_t closed = 0;
  int64_t expired = 0;
  int64_t evicted = 0;  // copies in memory dropped for the budget (the shared tier has them)
};

class SessionStore {
 public:
  // bytes_per_session: one SequenceState (the state slot plus bookkeeping).
  SessionStore(SessionOptions options, int64_t bytes_per_session);
  SessionStore(const SessionStore&) = delete;
  SessionStore& operator=(const SessionStore&) = delete;

  // Makes `tier` (not owned; outlives the store) the shared tier. Call before any other method.
  void SetTier(SessionTier* tier) { tier_ = tier; }
  SessionTier* tier() const { return tier_; }

  bool enabled() const { return options_.budget_bytes > 0; }
  int64_t bytes_per_session() const { return bytes_per_session_; }
  const SessionOptions& options() const { return options_; }

  // A new session at the empty state (or holding `state`), owned by `owner`; returns its id.
  // FailedPrecondition when sessions are off; ResourceExhausted when the budget is full.
  [[nodiscard]] absl::StatusOr<std::string> Open(absl::string_view owner, absl::Time now);
  [[nodiscard]] absl::StatusOr<std::string> Import(absl::string_view owner, SequenceState state,
                                                   absl::Time now);
  // Ends a session. NotFound as Take. A request of the session still running finishes, and its
  // state is dropped.
  [[nodiscard]] absl::Status Close(absl::string_view id, absl::string_view owner);

  // Hands the session's state to a request (the session is busy until Return). NotFound "session
  // ... not found (closed, expired or never opened)" for an unknown, expired or foreign id;
  // FailedPrecondition when a request of the session is already in progress (on any replica).
  // With a tier also SessionTier::BeginTurn's errors (Unavailable when the tier is unreachable and
  // this process does not hold the session; NotFound naming a refused record) and
  // ResourceExhausted when a session loaded from the tier finds no room in the budget.
  [[nodiscard]] absl::StatusOr<SequenceState> Take(absl::string_view id, absl::string_view owner,
                                                   absl::Time now);
  // Gives the state back after the request (the new state when the turn completed, or the one
  // Take gave when it did not). Dropped when the session was closed in the meantime. A completed
  // turn is written behind to the tier. Never blocks on I/O (the engine thread calls it).
  // `owner`: the one Take was called with.
  void Return(absl::string_view id, absl::string_view owner, SequenceState state, absl::Time now,
              bool completed = false);

  // A copy of the session's state (export). NotFound as Take; FailedPrecondition while busy.
  [[nodiscard]] absl::StatusOr<SequenceState> Copy(absl::string_view id, absl::string_view owner,
                                                   absl::Time now);

  // Ends sessions idle for longer than the ttl (not busy ones). Open and Import call it (to free
  // budget) and the engine calls it about once a second; Take and Copy check only the session
  // they are given, so the request path never scans the store.
  void ExpireIdle(absl::Time now);

  SessionStats stats() const;

 private:
  struct Session {
    std::string owner;
    // Shared with the tier's writer while it writes the state behind (read only there).
    std::shared_ptr<SequenceState> state;
    absl::Time last_used;
    bool busy = false;
    int64_t version = 0;  // completed turns (the tier's record version)
  };

  absl::StatusOr<std::string> Add(absl::string_view owner, SequenceState state, absl::Time now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Makes room for one more session: expires idle ones, then drops idle copies the tier holds.
  bool MakeRoom(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The state of a session for a request: moved out when nobody else holds it, else copied.
  static SequenceState TakeState(Session& session);
  absl::StatusOr<Session*> Find(absl::string_view id, absl::string_view owner, absl::Time now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ExpireLocked(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool Expired(const Session& session, absl::Time now) const {
    return !session.busy && now - session.last_used > options_.ttl;
  }

  const SessionOptions options_;
  const int64_t bytes_per_session_;
  const int64_t max_sessions_;
  SessionTier* tier_ = nullptr;

  mutable std::mutex mu_;
  absl::flat_hash_map<std::string, Session> sessions_ ABSL_GUARDED_BY(mu_);
  SessionStats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_STATE_REUSE_SESSION_STORE_H_
