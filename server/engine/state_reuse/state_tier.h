// StateTier: the second, shared tier of kept states (docs/sessions.md, "Shared tier"). The first
// tier is this process's memory (SessionStore, PrefixCache); the shared tier is a key-value store
// every replica of the model reaches (RedisStateTier, redis_state_tier.h), so that a session or a
// prefix state outlives the process that made it and follows its request to any replica.
//
// The interface is byte values under string keys, each with a time to live, plus leases (a key
// one holder owns until it lets go or the lease expires). Values are whole exported states
// (megabytes); an implementation may store them in chunks, but Get returns a whole value or
// nothing. Every call blocks on the network: callers keep them off the engine thread
// (SessionTier runs writes on its own thread; loads run on the caller's thread of Submit).
//
// Errors (each message names the tier and the cause):
//   Unavailable        unreachable (connection refused, reset, restarted)
//   DeadlineExceeded   no answer within the tier's timeout (slow)
//   ResourceExhausted  the tier is full (Redis maxmemory) or the value is over its size limit
//   DataLoss           a value that is not one this code wrote, or damaged (checksum)
//
// Thread-safety: every method may be called from any thread.
#ifndef POLYSKETCH_SERVER_ENGINE_STATE_REUSE_STATE_TIER_H_
#define POLYSKETCH_SERVER_ENGINE_STATE_REUSE_STATE_TIER_H_

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <absl/base/thread_annotations.h>
#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>
#include <absl/time/time.h>

namespace ps::engine {

class StateTier {
 public:
  virtual ~StateTier() = default;

  // "redis 10.0.0.7:6379": for messages and logs.
  virtual std::string Describe() const = 0;

  // The value under `key`, nullopt when there is none (never written, expired, evicted).
  [[nodiscard]] virtual absl::StatusOr<std::optional<std::string>> Get(absl::string_view key) = 0;
  // Stores `value` under `key` for `ttl`, replacing any value it had (a reader sees the old value
  // or the new one, never a mix).
  [[nodiscard]] virtual absl::Status Put(absl::string_view key, absl::string_view value,
                                         absl::Duration ttl) = 0;
  [[nodiscard]] virtual absl::Status Delete(absl::string_view key) = 0;
  // For each key, whether the tier has a value under it now, in one round trip (the shared
  // prefix tier asks for every block of a prompt at once).
  [[nodiscard]] virtual absl::StatusOr<std::vector<bool>> Present(
      const std::vector<std::string>& keys) = 0;

  // Takes the lease `key` for `holder`, or renews it when `holder` has it: true when `holder`
  // holds it now (for `ttl`), false when another holder does (that holder's name in *other when
  // given).
  [[nodiscard]] virtual absl::StatusOr<bool> Lease(absl::string_view key, absl::string_view holder,
                                                   absl::Duration ttl,
                                                   std::string* other = nullptr) = 0;
  // Lets the lease go when `holder` has it (nothing otherwise).
  [[nodiscard]] virtual absl::Status Unlease(absl::string_view key, absl::string_view holder) = 0;
};

// A tier in this process's memory: what the tests use to check SessionTier's rules without a
// network, and a way to inject faults (Fail). Not shared between processes.
class MemoryStateTier final : public StateTier {
 public:
  std::string Describe() const override { return "memory tier"; }
  absl::StatusOr<std::optional<std::string>> Get(absl::string_view key) override;
  absl::Status Put(absl::string_view key, absl::string_view value, absl::Duration ttl) override;
  absl::Status Delete(absl::string_view key) override;
  absl::StatusOr<std::vector<bool>> Present(const std::vector<std::string>& keys) override;
  absl::StatusOr<bool> Lease(absl::string_view key, absl::string_view holder, absl::Duration ttl,
                             std::string* other = nullptr) override;
  absl::Status Unlease(absl::string_view key, absl::string_view holder) override;

  // Every call answers `status` from now on (OkStatus: back to normal).
  void Fail(absl::Status status);
  // Overwrites a stored value's bytes (fault tests: damaged or foreign values).
  void Set(absl::string_view key, std::string value);
  int64_t keys() const;

 private:
  struct Entry {
    std::string value;
    absl::Time expires;
  };
  absl::Status Check() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return failure_; }

  mutable std::mutex mu_;
  std::map<std::string, Entry, std::less<>> values_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, Entry, std::less<>> leases_ ABSL_GUARDED_BY(mu_);
  absl::Status failure_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_STATE_REUSE_STATE_TIER_H_
