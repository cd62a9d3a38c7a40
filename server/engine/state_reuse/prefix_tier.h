// PrefixTier: prefix-cache snapshots in the shared state tier (state_tier.h), so that a long
// prompt prefix (a system prompt, a shared document) computed on one replica is restored, not
// prefilled again, on every other replica of the model (docs/sessions.md, "Shared prefixes").
//
// What is shared: every snapshot the local prefix cache stores (prefix_cache.h decides which are
// worth one), written behind by this class's own thread after the engine thread stored it. A
// request without a session asks the tier on the thread that submits it (never the engine
// thread), and only for prefixes longer than the longest one the local cache holds: one round
// trip that asks for every candidate block at once (StateTier::Present), then one read of the
// longest present. The engine thread restores the state it got, and keeps a copy in the local
// cache for the next requests here.
//
// Scopes: exactly the local cache's (PrefixCache::Scope: the owner unless shared across owners,
// and the cache salt). The key of a prefix is its PrefixCache hash, which is seeded with the
// model fingerprint and the scope, and the value carries the scope and the prefix tokens, both
// compared exactly on the way back in: another identity's or another salt's prefix is never a
// hit, whatever the hash, as in the local cache (docs/security.md).
//
// Key (prefix "polysketch:<model fingerprint>:"):
//   p:<hash>  "PSKPREF1", u32 scope bytes, scope, u32 tokens, i32 tokens[], the exported state
//             (state_codec.h: model fingerprint, checksum and contents checked on the way in),
//             for `ttl` after its last write. The tier's byte budget is Redis's maxmemory with a
//             TTL eviction policy (deploy/k8s/overlays/sessions).
//
// Faults never fail a request: a tier that is down, slow, full, or holds damaged or foreign bytes
// is counted (stats().errors) and the request prefills from what this replica has.
//
// Thread-safety: every method may be called from any thread.
#ifndef POLYSKETCH_SERVER_ENGINE_STATE_REUSE_PREFIX_TIER_H_
#define POLYSKETCH_SERVER_ENGINE_STATE_REUSE_PREFIX_TIER_H_

#include <array>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <absl/base/thread_annotations.h>
#include <absl/container/flat_hash_set.h>
#include <absl/status/status.h>
#include <absl/strings/string_view.h>
#include <absl/time/time.h>
#include <absl/types/span.h>

#include "server/engine/model/state_snapshot.h"
#include "server/engine/state_reuse/session_tier.h"
#include "server/engine/state_reuse/state_codec.h"
#include "server/engine/state_reuse/state_tier.h"

namespace ps::engine {

struct PrefixTierOptions {
  absl::Duration ttl = absl::Hours(1);            // a snapshot lives this long after its write
  int64_t max_queued_bytes = int64_t{256} << 20;  // snapshots waiting to be written
};

struct PrefixTierStats {
  int64_t hits = 0;    // lookups that found a longer prefix in the tier than the local cache
  int64_t misses = 0;  // lookups that found none
  int64_t tokens = 0;  // prefix tokens of those hits (prefill the requests did not compute)
  int64_t writes = 0;  // snapshots written
  int64_t bytes_read = 0;
  int64_t bytes_written = 0;
  std::array<int64_t, kNumTierErrors> errors{};
  int64_t queued = 0;  // writes waiting now
  int64_t queued_bytes = 0;
  std::array<TierLatency, kNumTierOps> latency;  // read (lookups and loads) and write
};

class PrefixTier {
 public:
  // `tier` and `model` must outlive this object. Starts the writer thread.
  PrefixTier(StateTier* tier, const ModelIdentity* model, PrefixTierOptions options);
  // Stops the writer; snapshots still queued are not written.
  ~PrefixTier();
  PrefixTier(const PrefixTier&) = delete;
  PrefixTier& operator=(const PrefixTier&) = delete;

  struct Found {
    int64_t length = 0;  // prefix tokens the state holds (0: nothing found)
    std::shared_ptr<const StateSnapshot> state;
  };
  // The longest prefix of `tokens` in scope `scope` that the tier holds, of more than
  // `min_blocks` and at most `max_blocks` whole blocks of `granularity` tokens; hashes[i] is the
  // key of the first i + 1 blocks (PrefixCache::Hashes in that scope). Blocks the tier has whose
  // value is refused (damaged, another model's, another scope's or other tokens) are skipped for
  // shorter ones. Never an error: faults count and find nothing. Blocks on the network.
  Found Lookup(absl::Span<const int32_t> tokens, absl::Span<const uint64_t> hashes,
               int64_t granularity, int64_t min_blocks, int64_t max_blocks,
               absl::string_view scope);
  // Writes the snapshot of `prefix` (snapshot.position == prefix.size()) under `hash` in
  // `scope`, behind. Only queues; a prefix this process wrote or read before is not written again.
  void Publish(uint64_t hash, std::string scope, std::vector<int32_t> prefix,
               StateSnapshot snapshot);
  // Waits until every queued write is done (or failed), or `deadline` (tests).
  [[nodiscard]] absl::Status Flush(absl::Time deadline);

  PrefixTierStats stats() const;

  // The tier key of prefix hash `hash` of the model with fingerprint `fingerprint`.
  static std::string KeyOf(uint64_t fingerprint, uint64_t hash);

 private:
  struct Pending {
    uint64_t hash = 0;
    std::string scope;
    std::vector<int32_t> prefix;
    SequenceState state;  // the snapshot, no pending tokens
    int64_t bytes = 0;
  };
  void WriterLoop();
  absl::Status Write(const Pending& op);
  // The state in `value` when it is the prefix tokens[0, length) of `scope` for this model.
  absl::StatusOr<std::shared_ptr<const StateSnapshot>> Decode(absl::string_view value,
                                                              absl::Span<const int32_t> tokens,
                                                              int64_t length,
                                                              absl::string_view scope) const;
  void Seen(uint64_t hash) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CountError(const absl::Status& status);
  void Observe(TierOp op, absl::Duration elapsed);

  StateTier* const tier_;
  const ModelIdentity* const model_;
  const PrefixTierOptions options_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Pending> queue_ ABSL_GUARDED_BY(mu_);
  int64_t queued_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  // Hashes written or read by this process (not written again); starts over past a bound.
  absl::flat_hash_set<uint64_t> seen_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;

  mutable std::mutex stats_mu_;
  PrefixTierStats stats_ ABSL_GUARDED_BY(stats_mu_);

  std::thread writer_;  // last: started when everything else is ready
};

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_STATE_REUSE_PREFIX_TIER_H_
