// SessionTier: sessions in the shared state tier (state_tier.h), so that any replica continues a
// session and a session outlives the process that ran its last turn (docs/sessions.md, "Shared
// tier"). SessionStore (session_store.h) keeps sessions in memory as before and calls this class
// around every turn:
//   * BeginTurn (on the thread that submits the turn, never the engine thread): takes the
//     session's lease, so two replicas never run turns of one session at once (waiting up to
//     lease_wait for a replica whose last turn is still being written), then reads the session's
//     version in the tier and, when it is newer than the copy in memory (another replica ran a
//     turn) or there is no copy, loads the record and decodes it (DecodeState: fingerprint,
//     checksum and contents are checked as for ImportState).
//   * EndTurn (on the engine thread; it only queues): a completed turn's state is written behind,
//     by this class's own writer thread, in the export format (state_codec.h); the lease is let
//     go once the write is done, so the next replica reads the new state. The engine thread never
//     waits for the network and never encodes a state.
// Keys (prefix "polysketch:<model fingerprint>:", so replicas of other weights never meet), each
// scoped by the session's owner as the prefix cache scopes its entries (docs/security.md): <tag>
// is the owner's Fingerprint64 in hex, so another identity naming the same id reaches other keys
// (it can neither read the session nor hold its lease), and the record's owner is still compared
// exactly on every read:
//   s:<tag>:<id>  the record: "PSKSESS1", u64 version, u32 owner bytes, owner, the exported state
//   v:<tag>:<id>  the version alone (decimal; "closed" after CloseSession, a tombstone that tells
//                 replicas holding a copy), written after the record: a turn on the replica that
//                 ran the previous one reads only this, not megabytes
//   l:<tag>:<id>  the lease: the name of the replica running a turn, with an expiry (lease),
//                 renewed by the writer thread while the turn runs, so a dead replica holds a
//                 session for at most one lease.
// Both records live for the session ttl after their last write.
//
// Faults never stop the server: a tier that is down, slow, full or returns damaged or foreign
// bytes is counted (stats().errors) and the session continues from memory when this process holds
// it. Only a session it does not hold fails, with Unavailable (tier unreachable or slow) or
// NotFound (no such session, or a record that was refused, with the reason) naming the cause.
// Failed writes are retried (the latest state of each session only) until they succeed or the
// queue passes max_queued_bytes, when the oldest writes are dropped (counted); Flush waits for
// the queue to empty (SIGTERM drain).
//
// Thread-safety: every method may be called from any thread.
#ifndef POLYSKETCH_SERVER_ENGINE_STATE_REUSE_SESSION_TIER_H_
#define POLYSKETCH_SERVER_ENGINE_STATE_REUSE_SESSION_TIER_H_

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include <absl/base/thread_annotations.h>
#include <absl/container/flat_hash_map.h>
#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>
#include <absl/time/time.h>

#include "server/engine/state_reuse/state_codec.h"
#include "server/engine/state_reuse/state_tier.h"

namespace ps::engine {

struct SessionTierOptions {
  absl::Duration ttl = absl::Minutes(30);            // records live this long after a write
  absl::Duration lease = absl::Seconds(15);          // a turn's lease (renewed while it runs)
  absl::Duration lease_wait = absl::Seconds(2);      // wait this long for another replica's lease
  int64_t max_queued_bytes = int64_t{256} << 20;     // states waiting to be written
  absl::Duration retry_interval = absl::Seconds(1);  // between tries of a failed write
  std::string replica;                               // this process's name in leases (non-empty)
};

// Latency buckets of tier calls (upper bounds in seconds; one more bucket for +Inf).
inline constexpr std::array<double, 12> kTierLatencyBuckets = {
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5};

enum class TierError : uint8_t {
  kUnreachable = 0,  // Unavailable
  kTimeout,          // DeadlineExceeded
  kFull,             // ResourceExhausted (maxmemory, size limit)
  kDamaged,          // DataLoss (checksum, truncated, not our layout)
  kForeign,          // a state of another model or format (FailedPrecondition from DecodeState)
  kDropped,          // a write given up (queue over max_queued_bytes)
  kOther,
};
inline constexpr int kNumTierErrors = 7;
absl::string_view TierErrorName(TierError error);  // "unreachable", "timeout", ...
TierError ClassifyTierError(const absl::Status& status);

enum class TierOp : uint8_t { kRead = 0, kWrite, kLease };
inline constexpr int kNumTierOps = 3;
absl::string_view TierOpName(TierOp op);  // "read", "write", "lease"

struct TierLatency {
  std::array<int64_t, kTierLatencyBuckets.size() + 1> buckets{};  // counts, not cumulative
  double sum_seconds = 0;
  int64_t count = 0;
};

struct SessionTierStats {
  int64_t hits = 0;    // turns that found the session's current state in the tier
  int64_t misses = 0;  // turns of a session the tier does not have
  int64_t loads = 0;   // of those hits, states read (another replica's turn, or not held here)
  int64_t writes = 0;  // states written
  int64_t bytes_read = 0;
  int64_t bytes_written = 0;
  int64_t lease_busy = 0;  // turns refused: another replica runs one
  std::array<int64_t, kNumTierErrors> errors{};
  int64_t queued = 0;        // writes waiting now
  int64_t queued_bytes = 0;  // their state bytes
  std::array<TierLatency, kNumTierOps> latency;
};

class SessionTier {
 public:
  // `tier` and `model` must outlive this object. Starts the writer thread.
  SessionTier(StateTier* tier, const ModelIdentity* model, SessionTierOptions options);
  // Stops the writer; writes still queued are lost (Flush first to keep them).
  ~SessionTier();
  SessionTier(const SessionTier&) = delete;
  SessionTier& operator=(const SessionTier&) = delete;

  // A session's record as the tier has it.
  struct Record {
    int64_t version = 0;  // completed turns
    std::string owner;
    SequenceState state;
  };

  // Starts a turn of session `id` for `owner`. local_version: the version of the copy this
  // process holds (-1: none). Returns the record when the tier has a newer one than local_version
  // (load it), nullopt when the local copy is current (or the tier cannot say and there is one:
  // the turn runs from memory). Errors (the turn is then over: no EndTurn):
  //   FailedPrecondition  another replica runs a turn of it (names the replica);
  //   NotFound            no local copy and the tier has no such session of `owner`, or its record
  //                       was refused (names why: damaged, another model);
  //   Unavailable         no local copy and the tier is unreachable or slow (names it).
  [[nodiscard]] absl::StatusOr<std::optional<Record>> BeginTurn(absl::string_view id,
                                                                absl::string_view owner,
                                                                int64_t local_version);
  // Ends a turn BeginTurn started: `state` (null when the turn did not complete) is written
  // behind as `version`, then the lease is let go. Only queues: cheap, never blocks on I/O.
  void EndTurn(absl::string_view id, absl::string_view owner, int64_t version,
               std::shared_ptr<const SequenceState> state);
  // Writes a session's state behind without a turn (OpenSession, ImportState).
  void Write(absl::string_view id, absl::string_view owner, int64_t version,
             std::shared_ptr<const SequenceState> state);
  // Deletes a session's records behind (CloseSession).
  void Remove(absl::string_view id, absl::string_view owner);
  // The record without a lease (export, close of a session not held here); errors as BeginTurn.
  [[nodiscard]] absl::StatusOr<std::optional<Record>> Fetch(absl::string_view id,
                                                            absl::string_view owner,
                                                            int64_t local_version);
  // True when version `version` of session `id` is in the tier (written by this process): a copy
  // in memory of it may be dropped.
  bool Persisted(absl::string_view id, absl::string_view owner, int64_t version) const;
  // Waits until every queued write is done (or given up) and every lease let go, or `deadline`.
  // DeadlineExceeded naming how many writes are left.
  [[nodiscard]] absl::Status Flush(absl::Time deadline);

  SessionTierStats stats() const;
  const StateTier& tier() const { return *tier_; }

  // A session's name in the tier (after "polysketch:<fingerprint>:<kind>:") and in this class's
  // maps: "<owner tag>:<id>".
  static std::string Scoped(absl::string_view id, absl::string_view owner);

 private:
  enum class OpKind : uint8_t { kWrite, kDelete, kRelease };
  struct Pending {
    OpKind kind = OpKind::kWrite;
    std::string owner;
    int64_t version = 0;
    std::shared_ptr<const SequenceState> state;
    int64_t bytes = 0;
    absl::Time not_before = absl::InfinitePast();
    int attempts = 0;
  };
  struct LeaseEntry {
    bool in_turn = false;
    bool releasing = false;
    bool held = false;  // the tier granted it (false: the turn runs from memory)
  };

  std::string Key(absl::string_view kind, absl::string_view sid) const;
  void Enqueue(absl::string_view sid, Pending op) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<std::optional<Record>> Read(absl::string_view id, absl::string_view owner,
                                             int64_t local_version);
  absl::Status Run(absl::string_view sid, const Pending& op);
  void WriterLoop();
  void RenewLeases();
  // Ends the local bookkeeping of a turn that got no lease or failed.
  void AbandonTurn(absl::string_view sid);
  void CountError(const absl::Status& status);
  void Observe(TierOp op, absl::Duration elapsed);

  StateTier* const tier_;
  const ModelIdentity* const model_;
  const SessionTierOptions options_;
  const std::string prefix_;

  // True when this replica has a write of `sid` queued or running: its copy in memory is then
  // newer than the tier's (no other replica can have written since: the lease, or for a new
  // session nobody else knowing it, keeps them out until the write lands).
  bool OwnWriteUnlanded(const std::string& sid) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable std::mutex mu_;
  std::condition_variable cv_;
  // Keyed by Scoped(id, owner).
  absl::flat_hash_map<std::string, Pending> pending_ ABSL_GUARDED_BY(mu_);
  std::deque<std::string> order_ ABSL_GUARDED_BY(mu_);  // keys of pending_, oldest first
  absl::flat_hash_map<std::string, LeaseEntry> leases_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, int64_t> persisted_ ABSL_GUARDED_BY(mu_);
  int64_t queued_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t in_flight_ ABSL_GUARDED_BY(mu_) = 0;  // ops the writer is running
  // The session whose write the writer is running ("" when none is): with pending_, the writes
  // of this replica that have not landed yet (OwnWriteUnlanded).
  std::string in_flight_write_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time next_renewal_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();

  mutable std::mutex stats_mu_;
  SessionTierStats stats_ ABSL_GUARDED_BY(stats_mu_);

  std::thread writer_;  // last: started when everything else is ready
};

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_STATE_REUSE_SESSION_TIER_H_
