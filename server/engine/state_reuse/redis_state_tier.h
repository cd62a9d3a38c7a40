// RedisStateTier: the shared state tier (state_tier.h) in a Redis server, through hiredis
// (Debian's libhiredis-dev: the Redis project's own C client; blocking calls with timeouts,
// pipelining, binary-safe arguments; no exceptions and no threads of its own).
//
// Layout of a value under key K (every key carries the value's time to live):
//   K                     the manifest, 36 bytes: "PSKTIER1", u64 total bytes, u32 chunks,
//                         u64 Fingerprint64 of the whole value, u64 generation
//   K#<generation>#<i>    chunk i of the value (chunk_bytes each, the last one shorter)
// A Put writes the chunks of a new generation first, then swaps the manifest (SET ... GET, one
// atomic command) and deletes the chunks of the generation it replaced, so a reader sees the old
// value or the new one; a reader that finds a chunk gone (replaced meanwhile) reads the manifest
// again. Chunks keep every command and reply under chunk_bytes (one Redis bulk string, one network
// burst) whatever the state's size. Needs Redis 6.2 or later (SET with GET).
//
// Leases are one key each holding the holder's name, taken, renewed and released by small Lua
// scripts (EVAL), so a check and its change are one atomic step.
//
// Connections: a pool of blocking hiredis connections, one per concurrent caller (a connection is
// used by one thread at a time), each with the connect and command timeout. A connection that
// failed is closed, never reused. After a failed connect, calls fail at once (Unavailable naming
// the last error) for `retry_interval` instead of each waiting for the connect timeout, so a Redis
// that is down costs the request path nothing but a clear error.
//
// Thread-safety: every method may be called from any thread.
#ifndef POLYSKETCH_SERVER_ENGINE_STATE_REUSE_REDIS_STATE_TIER_H_
#define POLYSKETCH_SERVER_ENGINE_STATE_REUSE_REDIS_STATE_TIER_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <absl/base/thread_annotations.h>
#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>
#include <absl/time/time.h>

#include "server/engine/state_reuse/state_tier.h"

struct redisContext;

namespace ps::engine {

struct RedisTierOptions {
  std::string host = "127.0.0.1";
  int port = 6379;
  std::string password;                                     // AUTH when not empty
  absl::Duration timeout = absl::Seconds(1);                // connect, and each command's reply
  absl::Duration retry_interval = absl::Milliseconds(500);  // after a failed connect
  int64_t chunk_bytes = int64_t{1} << 20;
  int64_t max_value_bytes = int64_t{1} << 30;  // larger values are ResourceExhausted
  int max_idle_connections = 8;
};

// "host:port" (port 1..65535; host a name or an IPv4 address) -> host and port of `options`.
// InvalidArgument naming `flag` and the value otherwise.
[[nodiscard]] absl::Status ParseRedisAddress(absl::string_view address, absl::string_view flag,
                                             RedisTierOptions* options);

class RedisStateTier final : public StateTier {
 public:
  // Connects nothing yet (a Redis that is down at start is not an error: the server serves from
  // memory and connects when Redis comes up). InvalidArgument for options out of range.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<RedisStateTier>> Create(
      RedisTierOptions options);
  ~RedisStateTier() override;

  std::string Describe() const override;
  absl::StatusOr<std::optional<std::string>> Get(absl::string_view key) override;
  absl::Status Put(absl::string_view key, absl::string_view value, absl::Duration ttl) override;
  absl::Status Delete(absl::string_view key) override;
  // EXISTS of every key's manifest, pipelined.
  absl::StatusOr<std::vector<bool>> Present(const std::vector<std::string>& keys) override;
  absl::StatusOr<bool> Lease(absl::string_view key, absl::string_view holder, absl::Duration ttl,
                             std::string* other = nullptr) override;
  absl::Status Unlease(absl::string_view key, absl::string_view holder) override;

  // PING: OK when Redis answers (a check at start and for tests).
  [[nodiscard]] absl::Status Ping();

 private:
  class Connection;
  explicit RedisStateTier(RedisTierOptions options);
  absl::StatusOr<std::unique_ptr<Connection>> Acquire();
  void Release(std::unique_ptr<Connection> connection);
  absl::StatusOr<std::optional<std::string>> GetOnce(Connection& c, absl::string_view key,
                                                     bool* retry);

  const RedisTierOptions options_;
  std::mutex mu_;
  std::vector<std::unique_ptr<Connection>> idle_ ABSL_GUARDED_BY(mu_);
  absl::Time down_until_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  std::string last_error_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_STATE_REUSE_REDIS_STATE_TIER_H_
