#include "server/engine/state_reuse/redis_state_tier.h"

#include <cerrno>
#include <cstring>
#include <random>
#include <sys/time.h>
#include <utility>

#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/time/clock.h>
#include <hiredis/hiredis.h>

#include "base/hash.h"
#include "base/status_macros.h"

namespace ps::engine {
namespace {

constexpr char kManifestMagic[8] = {'P', 'S', 'K', 'T', 'I', 'E', 'R', '1'};
constexpr size_t kManifestBytes = 8 + 8 + 4 + 8 + 8;
constexpr uint64_t kValueChecksumSeed = 0x5053'4b54'4945'5231ULL;  // "PSKTIER1"

// Takes the lease (KEYS[1]) for ARGV[1] for ARGV[2] ms, or renews it for its holder: 1, or the
// name of the other holder.
constexpr char kLeaseScript[] =
    "local v = redis.call('GET', KEYS[1]) "
    "if v == false then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end "
    "if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end "
    "return v";
constexpr char kUnleaseScript[] =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end "
    "return 0";

struct Manifest {
  uint64_t total = 0;
  uint32_t chunks = 0;
  uint64_t checksum = 0;
  uint64_t generation = 0;
};

template <typename T>
void Put(std::string& out, T value) {
  char raw[sizeof(T)];
  std::memcpy(raw, &value, sizeof(T));
  out.append(raw, sizeof(T));
}
template <typename T>
T Read(const char* p) {
  T value;
  std::memcpy(&value, p, sizeof(T));
  return value;
}

std::string EncodeManifest(const Manifest& m) {
  std::string out(kManifestMagic, sizeof(kManifestMagic));
  Put<uint64_t>(out, m.total);
  Put<uint32_t>(out, m.chunks);
  Put<uint64_t>(out, m.checksum);
  Put<uint64_t>(out, m.generation);
  return out;
}

std::optional<Manifest> DecodeManifest(absl::string_view bytes) {
  if (bytes.size() != kManifestBytes ||
      std::memcmp(bytes.data(), kManifestMagic, sizeof(kManifestMagic)) != 0) {
    return std::nullopt;
  }
  const char* p = bytes.data() + 8;
  Manifest m;
  m.total = Read<uint64_t>(p);
  m.chunks = Read<uint32_t>(p + 8);
  m.checksum = Read<uint64_t>(p + 12);
  m.generation = Read<uint64_t>(p + 20);
  return m;
}

std::string ChunkKey(absl::string_view key, uint64_t generation, uint32_t i) {
  return absl::StrCat(key, "#", absl::Hex(generation, absl::kZeroPad16), "#", i);
}

int64_t Millis(absl::Duration d) { return std::max<int64_t>(1, absl::ToInt64Milliseconds(d)); }

struct ReplyDeleter {
  void operator()(redisReply* reply) const { freeReplyObject(reply); }
};
using Reply = std::unique_ptr<redisReply, ReplyDeleter>;

}  // namespace

// One blocking hiredis connection; broken() once an I/O error made it unusable.
class RedisStateTier::Connection {
 public:
  explicit Connection(redisContext* context) : c_(context) {}
  ~Connection() { redisFree(c_); }
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  bool broken() const { return broken_; }

  void Append(const std::vector<absl::string_view>& args) {
    std::vector<const char*> argv;
    std::vector<size_t> lens;
    for (absl::string_view a : args) {
      argv.push_back(a.data());
      lens.push_back(a.size());
    }
    redisAppendCommandArgv(c_, static_cast<int>(argv.size()), argv.data(), lens.data());
  }
  // The next reply of the pipeline; errors for I/O failures (the connection is then broken).
  absl::StatusOr<Reply> Next(absl::string_view what) {
    void* raw = nullptr;
    if (redisGetReply(c_, &raw) != REDIS_OK || raw == nullptr) {
      broken_ = true;
      return IoError(what);
    }
    return Reply(static_cast<redisReply*>(raw));
  }
  absl::StatusOr<Reply> Command(const std::vector<absl::string_view>& args,
                                absl::string_view what) {
    Append(args);
    return Next(what);
  }

  absl::Status IoError(absl::string_view what) const {
    const std::string detail = c_->errstr[0] != '\0' ? c_->errstr : "no reply";
    if (c_->err == REDIS_ERR_IO && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      return absl::DeadlineExceededError(
          absl::StrCat(what, ": no answer within the timeout (", detail, ")"));
    }
    if (c_->err == REDIS_ERR_EOF) {
      return absl::UnavailableError(
          absl::StrCat(what, ": connection closed by the server (restarted?): ", detail));
    }
    return absl::UnavailableError(absl::StrCat(what, ": ", detail));
  }

 private:
  redisContext* c_;
  bool broken_ = false;
};

namespace {

// A Redis error reply as a status: OOM (maxmemory) is ResourceExhausted ("full"), anything else
// Unavailable, with Redis's words.
absl::Status ReplyError(const redisReply& reply, absl::string_view what) {
  const std::string text(reply.str, reply.len);
  if (text.rfind("OOM", 0) == 0) {
    return absl::ResourceExhaustedError(absl::StrCat(what, ": Redis is full: ", text));
  }
  return absl::UnavailableError(absl::StrCat(what, ": Redis refused: ", text));
}

}  // namespace

absl::Status ParseRedisAddress(absl::string_view address, absl::string_view flag,
                               RedisTierOptions* options) {
  absl::string_view a = address;
  if (a.rfind("redis://", 0) == 0) a.remove_prefix(8);
  const size_t colon = a.rfind(':');
  int port = 0;
  if (colon == absl::string_view::npos || colon == 0 ||
      !absl::SimpleAtoi(a.substr(colon + 1), &port) || port < 1 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        flag, ": expected host:port (e.g. redis:6379 or 127.0.0.1:6379), got \"", address, "\""));
  }
  options->host = std::string(a.substr(0, colon));
  options->port = port;
  return absl::OkStatus();
}

RedisStateTier::RedisStateTier(RedisTierOptions options) : options_(std::move(options)) {}

RedisStateTier::~RedisStateTier() = default;

absl::StatusOr<std::unique_ptr<RedisStateTier>> RedisStateTier::Create(RedisTierOptions options) {
  if (options.host.empty() || options.port < 1 || options.port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("redis tier: bad address ", options.host, ":", options.port));
  }
  if (options.timeout <= absl::ZeroDuration() || options.chunk_bytes < 1024 ||
      options.max_value_bytes < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("redis tier: timeout must be > 0 and chunk_bytes >= 1024, got ",
                     absl::FormatDuration(options.timeout), " and ", options.chunk_bytes));
  }
  return std::unique_ptr<RedisStateTier>(new RedisStateTier(std::move(options)));
}

std::string RedisStateTier::Describe() const {
  return absl::StrCat("redis ", options_.host, ":", options_.port);
}

absl::StatusOr<std::unique_ptr<RedisStateTier::Connection>> RedisStateTier::Acquire() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!idle_.empty()) {
      std::unique_ptr<Connection> c = std::move(idle_.back());
      idle_.pop_back();
      return c;
    }
    if (absl::Now() < down_until_) {
      return absl::UnavailableError(
          absl::StrCat(Describe(), " unreachable: ", last_error_, " (retrying every ",
                       absl::FormatDuration(options_.retry_interval), ")"));
    }
  }
  const timeval tv = absl::ToTimeval(options_.timeout);
  redisContext* raw = redisConnectWithTimeout(options_.host.c_str(), options_.port, tv);
  std::string error;
  if (raw == nullptr) {
    error = "cannot allocate a connection";
  } else if (raw->err != 0) {
    error = raw->errstr;
    redisFree(raw);
    raw = nullptr;
  }
  std::unique_ptr<Connection> c;
  if (raw != nullptr) {
    redisSetTimeout(raw, tv);
    c = std::make_unique<Connection>(raw);
    if (!options_.password.empty()) {
      absl::StatusOr<Reply> auth = c->Command({"AUTH", options_.password}, "AUTH");
      if (!auth.ok()) {
        error = std::string(auth.status().message());
      } else if ((*auth)->type == REDIS_REPLY_ERROR) {
        error = absl::StrCat("AUTH refused: ", std::string((*auth)->str, (*auth)->len));
      }
      if (!error.empty()) c.reset();
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (c == nullptr) {
    last_error_ = error;
    down_until_ = absl::Now() + options_.retry_interval;
    return absl::UnavailableError(absl::StrCat(Describe(), " unreachable: ", error));
  }
  down_until_ = absl::InfinitePast();
  return c;
}

void RedisStateTier::Release(std::unique_ptr<Connection> connection) {
  if (connection == nullptr || connection->broken()) return;
  std::lock_guard<std::mutex> lock(mu_);
  if (static_cast<int>(idle_.size()) < options_.max_idle_connections) {
    idle_.push_back(std::move(connection));
  }
}

absl::Status RedisStateTier::Ping() {
  PS_ASSIGN_OR_RETURN(std::unique_ptr<Connection> c, Acquire());
  absl::StatusOr<Reply> reply = c->Command({"PING"}, Describe());
  if (!reply.ok()) return reply.status();
  if ((*reply)->type == REDIS_REPLY_ERROR) return ReplyError(**reply, Describe());
  Release(std::move(c));
  return absl::OkStatus();
}

absl::Status RedisStateTier::Put(absl::string_view key, absl::string_view value,
                                 absl::Duration ttl) {
  const std::string what = absl::StrCat(Describe(), ": writing ", key);
  if (static_cast<int64_t>(value.size()) > options_.max_value_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        what, ": ", value.size(), " bytes exceed the limit of ", options_.max_value_bytes));
  }
  PS_ASSIGN_OR_RETURN(std::unique_ptr<Connection> c, Acquire());
  static thread_local std::mt19937_64 random(std::random_device{}());
  Manifest m;
  m.total = value.size();
  m.chunks = static_cast<uint32_t>((value.size() + options_.chunk_bytes - 1) /
                                   static_cast<uint64_t>(options_.chunk_bytes));
  m.checksum = Fingerprint64(value.data(), value.size(), kValueChecksumSeed);
  m.generation = random();
  const std::string ms = absl::StrCat(Millis(ttl));
  // The new generation's chunks, then the manifest swap, in one pipeline.
  std::vector<std::string> chunk_keys;
  for (uint32_t i = 0; i < m.chunks; ++i) {
    chunk_keys.push_back(ChunkKey(key, m.generation, i));
    const size_t at = static_cast<size_t>(i) * static_cast<size_t>(options_.chunk_bytes);
    c->Append({"SET", chunk_keys.back(), value.substr(at, options_.chunk_bytes), "PX", ms});
  }
  const std::string manifest = EncodeManifest(m);
  c->Append({"SET", key, manifest, "PX", ms, "GET"});
  absl::Status error;
  for (uint32_t i = 0; i < m.chunks; ++i) {
    absl::StatusOr<Reply> reply = c->Next(what);
    if (!reply.ok()) return reply.status();  // broken: the rest of the pipeline is lost
    if ((*reply)->type == REDIS_REPLY_ERROR && error.ok()) error = ReplyError(**reply, what);
  }
  absl::StatusOr<Reply> swapped = c->Next(what);
  if (!swapped.ok()) return swapped.status();
  if ((*swapped)->type == REDIS_REPLY_ERROR && error.ok()) error = ReplyError(**swapped, what);
  std::vector<std::string> stale;
  if (!error.ok()) {
    stale = chunk_keys;  // the manifest may not point at them: drop what was written
  } else if ((*swapped)->type == REDIS_REPLY_STRING) {
    const std::optional<Manifest> old =
        DecodeManifest(absl::string_view((*swapped)->str, (*swapped)->len));
    if (old.has_value() && old->generation != m.generation) {
      for (uint32_t i = 0; i < old->chunks; ++i) stale.push_back(ChunkKey(key, old->generation, i));
    }
  }
  if (!stale.empty()) {
    std::vector<absl::string_view> args = {"DEL"};
    for (const std::string& k : stale) args.push_back(k);
    absl::StatusOr<Reply> deleted = c->Command(args, what);
    if (!deleted.ok() && error.ok()) error = deleted.status();
  }
  Release(std::move(c));
  return error;
}

absl::StatusOr<std::optional<std::string>> RedisStateTier::GetOnce(Connection& c,
                                                                   absl::string_view key,
                                                                   bool* retry) {
  const std::string what = absl::StrCat(Describe(), ": reading ", key);
  *retry = false;
  PS_ASSIGN_OR_RETURN(Reply head, c.Command({"GET", key}, what));
  if (head->type == REDIS_REPLY_NIL) return std::nullopt;
  if (head->type == REDIS_REPLY_ERROR) return ReplyError(*head, what);
  const std::optional<Manifest> m = head->type == REDIS_REPLY_STRING
                                        ? DecodeManifest(absl::string_view(head->str, head->len))
                                        : std::nullopt;
  if (!m.has_value() || m->total > static_cast<uint64_t>(options_.max_value_bytes) ||
      m->chunks !=
          (m->total + options_.chunk_bytes - 1) / static_cast<uint64_t>(options_.chunk_bytes)) {
    return absl::DataLossError(
        absl::StrCat(what, ": not a value this server wrote (foreign or damaged manifest)"));
  }
  std::string value;
  value.reserve(m->total);
  if (m->chunks > 0) {
    std::vector<std::string> keys;
    std::vector<absl::string_view> args = {"MGET"};
    for (uint32_t i = 0; i < m->chunks; ++i) keys.push_back(ChunkKey(key, m->generation, i));
    for (const std::string& k : keys) args.push_back(k);
    PS_ASSIGN_OR_RETURN(Reply chunks, c.Command(args, what));
    if (chunks->type == REDIS_REPLY_ERROR) return ReplyError(*chunks, what);
    if (chunks->type != REDIS_REPLY_ARRAY || chunks->elements != m->chunks) {
      return absl::DataLossError(absl::StrCat(what, ": unexpected reply to MGET"));
    }
    for (size_t i = 0; i < chunks->elements; ++i) {
      const redisReply* chunk = chunks->element[i];
      if (chunk->type != REDIS_REPLY_STRING) {
        *retry = true;  // replaced (or evicted) while we read
        return absl::DataLossError(absl::StrCat(what, ": chunk ", i, " of ", m->chunks,
                                                " is missing (evicted or replaced)"));
      }
      value.append(chunk->str, chunk->len);
    }
  }
  if (value.size() != m->total ||
      Fingerprint64(value.data(), value.size(), kValueChecksumSeed) != m->checksum) {
    return absl::DataLossError(
        absl::StrCat(what, ": checksum mismatch (", value.size(), " bytes: damaged)"));
  }
  return value;
}

absl::StatusOr<std::optional<std::string>> RedisStateTier::Get(absl::string_view key) {
  PS_ASSIGN_OR_RETURN(std::unique_ptr<Connection> c, Acquire());
  absl::StatusOr<std::optional<std::string>> value;
  for (int attempt = 0; attempt < 3; ++attempt) {
    bool retry = false;
    value = GetOnce(*c, key, &retry);
    if (!retry) break;
  }
  Release(std::move(c));
  return value;
}

absl::Status RedisStateTier::Delete(absl::string_view key) {
  const std::string what = absl::StrCat(Describe(), ": deleting ", key);
  PS_ASSIGN_OR_RETURN(std::unique_ptr<Connection> c, Acquire());
  // Read the manifest to find the chunks, then delete it and them in one command.
  PS_ASSIGN_OR_RETURN(Reply head, c->Command({"GET", key}, what));
  std::vector<std::string> keys = {std::string(key)};
  if (head->type == REDIS_REPLY_STRING) {
    if (const std::optional<Manifest> m = DecodeManifest(absl::string_view(head->str, head->len))) {
      for (uint32_t i = 0; i < m->chunks; ++i) keys.push_back(ChunkKey(key, m->generation, i));
    }
  }
  std::vector<absl::string_view> args = {"DEL"};
  for (const std::string& k : keys) args.push_back(k);
  PS_ASSIGN_OR_RETURN(Reply deleted, c->Command(args, what));
  if (deleted->type == REDIS_REPLY_ERROR) return ReplyError(*deleted, what);
  Release(std::move(c));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<bool>> RedisStateTier::Present(const std::vector<std::string>& keys) {
  std::vector<bool> present(keys.size(), false);
  if (keys.empty()) return present;
  const std::string what = absl::StrCat(Describe(), ": looking up ", keys.size(), " keys");
  PS_ASSIGN_OR_RETURN(std::unique_ptr<Connection> c, Acquire());
  for (const std::string& key : keys) c->Append({"EXISTS", key});
  absl::Status error;
  for (size_t i = 0; i < keys.size(); ++i) {
    absl::StatusOr<Reply> reply = c->Next(what);
    if (!reply.ok()) return reply.status();  // broken: the rest of the pipeline is lost
    if ((*reply)->type == REDIS_REPLY_ERROR) {
      if (error.ok()) error = ReplyError(**reply, what);
    } else {
      present[i] = (*reply)->type == REDIS_REPLY_INTEGER && (*reply)->integer == 1;
    }
  }
  Release(std::move(c));
  if (!error.ok()) return error;
  return present;
}

absl::StatusOr<bool> RedisStateTier::Lease(absl::string_view key, absl::string_view holder,
                                           absl::Duration ttl, std::string* other) {
  const std::string what = absl::StrCat(Describe(), ": lease ", key);
  PS_ASSIGN_OR_RETURN(std::unique_ptr<Connection> c, Acquire());
  const std::string ms = absl::StrCat(Millis(ttl));
  PS_ASSIGN_OR_RETURN(Reply reply, c->Command({"EVAL", kLeaseScript, "1", key, holder, ms}, what));
  Release(std::move(c));
  if (reply->type == REDIS_REPLY_ERROR) return ReplyError(*reply, what);
  if (reply->type == REDIS_REPLY_INTEGER && reply->integer == 1) return true;
  if (reply->type == REDIS_REPLY_STRING) {
    if (other != nullptr) *other = std::string(reply->str, reply->len);
    return false;
  }
  return absl::DataLossError(absl::StrCat(what, ": unexpected reply"));
}

absl::Status RedisStateTier::Unlease(absl::string_view key, absl::string_view holder) {
  const std::string what = absl::StrCat(Describe(), ": releasing lease ", key);
  PS_ASSIGN_OR_RETURN(std::unique_ptr<Connection> c, Acquire());
  PS_ASSIGN_OR_RETURN(Reply reply, c->Command({"EVAL", kUnleaseScript, "1", key, holder}, what));
  Release(std::move(c));
  if (reply->type == REDIS_REPLY_ERROR) return ReplyError(*reply, what);
  return absl::OkStatus();
}

}  // namespace ps::engine
