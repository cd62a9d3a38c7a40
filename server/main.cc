// polysketch-server: serves one model directory over gRPC (GenerationService, grpc.health.v1,
// reflection) with Prometheus metrics on their own port. Wiring, flags, signals and the drain:
// SIGTERM / SIGINT -> readiness NOT_SERVING, no new requests (UNAVAILABLE), running ones get
// --drain_timeout to finish, the rest are cancelled, then exit 0. SIGHUP re-reads
// --auth_tokens_file (a bad file keeps the tokens in use). Errors at start (bad flag, model,
// busy port, unreadable or mismatched TLS files, bad tokens file) print one line to stderr and
// exit 1. docs/security.md describes the TLS, token and limit flags. An engine stuck in a step
// for --watchdog_timeout turns liveness NOT_SERVING until it moves again
// (engine/serving/watchdog.h); a backend that fails for good (a CUDA error) turns liveness and
// readiness NOT_SERVING for good (engine/serving/scheduler.h, Scheduler::failure).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <signal.h>
#include <string>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

#include <absl/flags/flag.h>
#include <absl/flags/parse.h>
#include <absl/flags/usage.h>
#include <absl/flags/usage_config.h>
#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/match.h>
#include <absl/strings/str_cat.h>
#include <absl/time/clock.h>
#include <absl/time/time.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include "base/status_macros.h"
#include "kernels/backend_factory.h"
#include "server/engine/model/kv_cache_dtype.h"
#include "server/engine/model/model.h"
#include "server/engine/model/weights_dtype.h"
#include "server/engine/model_io/weights.h"
#include "server/engine/serving/scheduler.h"
#include "server/engine/serving/watchdog.h"
#include "server/engine/state_reuse/redis_state_tier.h"
#include "server/http/http_server.h"
#include "server/metrics/metrics.h"
#include "server/service/auth.h"
#include "server/service/generation_service.h"
#include "server/service/tls.h"
#include "server/service/watchdog_listener.h"

ABSL_FLAG(std::string, model, "", "Model directory (config.json + model.safetensors). Required.");
ABSL_FLAG(std::string, host, "0.0.0.0", "Address the gRPC server listens on.");
ABSL_FLAG(int32_t, port, 50051, "gRPC port; 0 picks a free one (printed in the ready line).");
ABSL_FLAG(std::string, metrics_host, "0.0.0.0", "Address of the Prometheus /metrics endpoint.");
ABSL_FLAG(int32_t, metrics_port, 9464, "Prometheus /metrics port; 0 picks a free one.");
ABSL_FLAG(int64_t, slots, 8, "State slots: requests running at once (memory is fixed at start).");
ABSL_FLAG(int64_t, max_batch, 0, "Most sequences one decode step advances; 0 = --slots.");
ABSL_FLAG(int64_t, max_waiting, 256,
          "Most requests queued for a slot; past it new requests get RESOURCE_EXHAUSTED.");
ABSL_FLAG(int64_t, max_waiting_tokens, int64_t{1} << 22,
          "Most prompt tokens of queued requests; past it RESOURCE_EXHAUSTED.");
ABSL_FLAG(int64_t, max_prompt_tokens, int64_t{1} << 20,
          "Longest prompt accepted, in tokens (also bounded by the context limit).");
ABSL_FLAG(int64_t, max_new_tokens_limit, 4096, "Largest max_new_tokens a request may ask for.");
ABSL_FLAG(int64_t, max_context, 0,
          "Most tokens (prompt + generated) per request; sizes KV caches of softmax and sparse "
          "layers. 0 = the model's default (max_seq_len for KV layers, unlimited otherwise).");
ABSL_FLAG(int64_t, prefill_chunk, 512,
          "Prompt tokens per prefill pass (bounds activation memory).");
ABSL_FLAG(std::string, kv_cache_dtype, "auto",
          "KV caches of softmax, polynomial, sliding-window and sparse layers: fp32, fp16 (half "
          "the memory and decode traffic; scores and sums stay fp32), or auto (fp16 on the cpu "
          "backend, fp32 on cuda). States export with their dtype and import only into a "
          "server of the same one.");
ABSL_FLAG(int64_t, prefill_tokens_per_step, 512,
          "Prompt tokens prefilled per engine step, interleaved with decode steps.");
ABSL_FLAG(int32_t, threads, 0, "CPU threads for the kernels; 0 = all cores.");
ABSL_FLAG(std::string, device, "auto",
          "Kernel backend: auto (CUDA when built with it and a GPU is visible, else CPU), cpu, "
          "cuda.");
ABSL_FLAG(std::string, weights_dtype, "auto",
          "Precision of the linear layers' weights, converted once at load: auto (the model's "
          "stored format: bf16 when it is stored in bf16 and the backend is cpu, else fp32), "
          "fp32, bf16, int8 (per-channel, weight-only). bf16 and int8 are cpu only. "
          "docs/model-format.md, \"weights_dtype\".");
ABSL_FLAG(absl::Duration, drain_timeout, absl::Seconds(30),
          "On SIGTERM/SIGINT: how long running requests may take to finish before they are "
          "cancelled.");
ABSL_FLAG(absl::Duration, watchdog_timeout, absl::Seconds(30),
          "An engine step that makes no progress for this long is a stall: liveness (health "
          "service \"\") turns NOT_SERVING, polysketch_engine_stalled is 1 and a line is "
          "logged, until the engine moves again. 0 disables the watchdog.");

ABSL_FLAG(int64_t, prefix_cache_bytes, int64_t{256} << 20,
          "Budget of the prefix-state cache (snapshots of prompt prefixes reused by later "
          "requests); 0 turns it off.");
ABSL_FLAG(int64_t, prefix_cache_granularity, 0,
          "Cached prefixes are multiples of this many tokens; 0 = the model's local_exact block "
          "size (64 without one).");
ABSL_FLAG(bool, prefix_cache_shared, false,
          "Share cached prefixes across caller identities (tokens). Off (default): a prefix is "
          "reused only by requests of the identity that sent it, so cached_tokens and response "
          "times tell no caller about another's prompts (docs/security.md). Requests with "
          "different cache_salt values never share either way.");
ABSL_FLAG(int64_t, session_budget_bytes, int64_t{512} << 20,
          "Memory all sessions may reserve (each reserves one state); 0 turns sessions off.");
ABSL_FLAG(absl::Duration, session_ttl, absl::Minutes(30),
          "A session unused for this long expires.");
// --- Shared state tier (docs/sessions.md, "Shared tier") ------------------------------------
ABSL_FLAG(std::string, state_tier, "",
          "host:port of a Redis server (6.2 or later) shared by the replicas of this model: "
          "sessions are written there after each turn and any replica continues them. Empty: "
          "sessions stay in this process. Password (AUTH) from $POLYSKETCH_STATE_TIER_PASSWORD.");
ABSL_FLAG(absl::Duration, state_tier_timeout, absl::Seconds(1),
          "Connect and reply timeout of each call to --state_tier.");
ABSL_FLAG(absl::Duration, state_tier_lease, absl::Seconds(15),
          "A session turn's lease in --state_tier (renewed while it runs): how long a replica "
          "that died mid-turn keeps its sessions from the others.");
ABSL_FLAG(absl::Duration, state_tier_lease_wait, absl::Seconds(2),
          "How long a turn waits for another replica's lease on its session before "
          "FAILED_PRECONDITION.");
ABSL_FLAG(int64_t, state_tier_chunk_bytes, int64_t{1} << 20,
          "States are stored in Redis values of at most this many bytes.");
ABSL_FLAG(int64_t, state_tier_queue_bytes, int64_t{256} << 20,
          "Most state bytes waiting to be written to --state_tier; past it the oldest writes "
          "are dropped (counted).");
ABSL_FLAG(absl::Duration, state_tier_flush_timeout, absl::Seconds(10),
          "At SIGTERM, after the drain: how long to wait for session writes to --state_tier.");
ABSL_FLAG(absl::Duration, state_tier_prefix_ttl, absl::Hours(1),
          "Prefix-cache snapshots are shared through --state_tier too, each kept this long after "
          "its last write, so a long prompt prefix computed on one replica is restored on the "
          "others (in the same scope: identity and cache_salt, as the local cache). 0: not "
          "shared.");
ABSL_FLAG(std::string, replica_id, "",
          "This replica's name in --state_tier leases; empty: <hostname>-<pid>.");

// --- Security (docs/security.md) ---------------------------------------------------------------
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain of the gRPC port; with --tls_key turns TLS on (default: "
          "plaintext, for local use).");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert (unencrypted).");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle: mutual TLS, every client must present a certificate signed by it.");
ABSL_FLAG(std::string, auth_tokens_file, "",
          "Bearer tokens, one `name:token` (or bare token) per line, '#' comments; every "
          "GenerationService call then needs `authorization: Bearer <token>`. Re-read on "
          "SIGHUP. Empty: no authentication.");
ABSL_FLAG(absl::Duration, auth_tokens_reload_interval, absl::ZeroDuration(),
          "Also re-read --auth_tokens_file when it changed (mtime, size or inode), checked this "
          "often (e.g. 30s for a Kubernetes Secret volume); 0 = on SIGHUP only.");
ABSL_FLAG(int32_t, health_port, -1,
          "Also serve grpc.health.v1 alone, in plaintext, on --host:this port (for Kubernetes "
          "gRPC probes, which cannot speak TLS); 0 picks a free one; -1 = off.");
ABSL_FLAG(int64_t, max_receive_message_bytes, int64_t{8} << 20,
          "Largest request message the gRPC port accepts, in bytes (gRPC refuses bigger ones "
          "with RESOURCE_EXHAUSTED before they are parsed); with sessions on, at least one "
          "state + 1 MiB (ImportState).");
ABSL_FLAG(int64_t, max_prompt_bytes, int64_t{4} << 20,
          "Largest prompt of one request in bytes (text bytes, or 4 per token id); past it "
          "INVALID_ARGUMENT.");
ABSL_FLAG(int64_t, max_inflight_prompt_bytes, int64_t{256} << 20,
          "Most prompt bytes of all requests in flight (queued or running); past it new "
          "requests get RESOURCE_EXHAUSTED.");
ABSL_FLAG(int64_t, max_stream_buffer_bytes, int64_t{4} << 20,
          "Most output bytes one GenerateStream keeps for a client that does not read; past "
          "it the request is cancelled and the stream ends RESOURCE_EXHAUSTED.");
ABSL_FLAG(int32_t, max_concurrent_streams, 64,
          "Most calls open at once on one HTTP/2 connection (GRPC_ARG_MAX_CONCURRENT_STREAMS).");
ABSL_FLAG(absl::Duration, keepalive_time, absl::Minutes(1),
          "The server pings a connection idle for this long, to find dead peers.");
ABSL_FLAG(absl::Duration, keepalive_timeout, absl::Seconds(20),
          "A connection whose ping is not answered within this is closed.");
ABSL_FLAG(absl::Duration, keepalive_min_client_ping_interval, absl::Seconds(10),
          "Clients may ping at most this often without sending data; more often is a strike.");
ABSL_FLAG(int32_t, keepalive_max_ping_strikes, 2,
          "Strikes (too frequent pings) before the connection is closed with GOAWAY; 0 = no "
          "limit.");
// --- OpenAI-compatible HTTP API (server/http/, docs/serving.md "HTTP API") ---------------------
ABSL_FLAG(int32_t, http_port, 8000,
          "Port of the OpenAI-compatible HTTP API on --host (/v1/completions, "
          "/v1/chat/completions, /v1/models, /health, /tokenize, /detokenize), with the gRPC "
          "port's TLS, tokens and limits; 0 picks a free one (logged); -1 = off.");
ABSL_FLAG(int32_t, http_threads, 2, "I/O threads of the HTTP API.");
ABSL_FLAG(absl::Duration, max_connection_idle, absl::Minutes(30),
          "A connection without a call for this long is closed (GOAWAY); 0 = never.");

namespace {

namespace engine = ::ps::engine;
namespace service = ::ps::service;

constexpr char kUsage[] =
    "Serves a polysketch model over gRPC with Prometheus metrics.\n"
    "  polysketch-server --model DIR [--port 50051] [--metrics_port 9464] [flags]";

absl::Status CheckFlags() {
  PS_RETURN_IF_ERROR(engine::CheckWeightsDtypeFlag(absl::GetFlag(FLAGS_weights_dtype)));
  if (absl::GetFlag(FLAGS_model).empty()) {
    return absl::InvalidArgumentError("--model is required (see --help)");
  }
  // The value's spelling; BuildEngine resolves it for the backend.
  PS_RETURN_IF_ERROR(
      engine::ResolveKvCacheDtype(absl::GetFlag(FLAGS_kv_cache_dtype), "cpu").status());
  for (const auto& [name, value] : std::vector<std::pair<const char*, int64_t>>{
           {"port", absl::GetFlag(FLAGS_port)},
           {"metrics_port", absl::GetFlag(FLAGS_metrics_port)}}) {
    if (value < 0 || value > 65535) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", name, ": must be in [0, 65535], got ", value));
    }
  }
  for (const auto& [name, value] : std::vector<std::pair<const char*, int64_t>>{
           {"slots", absl::GetFlag(FLAGS_slots)},
           {"max_prompt_tokens", absl::GetFlag(FLAGS_max_prompt_tokens)},
           {"max_new_tokens_limit", absl::GetFlag(FLAGS_max_new_tokens_limit)},
           {"prefill_chunk", absl::GetFlag(FLAGS_prefill_chunk)},
           {"prefill_tokens_per_step", absl::GetFlag(FLAGS_prefill_tokens_per_step)}}) {
    if (value < 1) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, ": must be >= 1, got ", value));
    }
  }
  for (const auto& [name, value] : std::vector<std::pair<const char*, int64_t>>{
           {"max_batch", absl::GetFlag(FLAGS_max_batch)},
           {"max_waiting", absl::GetFlag(FLAGS_max_waiting)},
           {"max_waiting_tokens", absl::GetFlag(FLAGS_max_waiting_tokens)},
           {"max_context", absl::GetFlag(FLAGS_max_context)},
           {"prefix_cache_bytes", absl::GetFlag(FLAGS_prefix_cache_bytes)},
           {"prefix_cache_granularity", absl::GetFlag(FLAGS_prefix_cache_granularity)},
           {"session_budget_bytes", absl::GetFlag(FLAGS_session_budget_bytes)},
           {"state_tier_queue_bytes", absl::GetFlag(FLAGS_state_tier_queue_bytes)},
           {"threads", absl::GetFlag(FLAGS_threads)}}) {
    if (value < 0) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, ": must be >= 0, got ", value));
    }
  }
  for (const auto& [name, value] : std::vector<std::pair<const char*, int64_t>>{
           {"max_receive_message_bytes", absl::GetFlag(FLAGS_max_receive_message_bytes)},
           {"max_prompt_bytes", absl::GetFlag(FLAGS_max_prompt_bytes)},
           {"max_inflight_prompt_bytes", absl::GetFlag(FLAGS_max_inflight_prompt_bytes)},
           {"max_stream_buffer_bytes", absl::GetFlag(FLAGS_max_stream_buffer_bytes)},
           {"max_concurrent_streams", absl::GetFlag(FLAGS_max_concurrent_streams)}}) {
    if (value < 1) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, ": must be >= 1, got ", value));
    }
  }
  if (absl::GetFlag(FLAGS_max_receive_message_bytes) > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError("--max_receive_message_bytes: must be below 2 GiB");
  }
  if (absl::GetFlag(FLAGS_auth_tokens_reload_interval) < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--auth_tokens_reload_interval: must not be negative");
  }
  if (absl::GetFlag(FLAGS_keepalive_max_ping_strikes) < 0) {
    return absl::InvalidArgumentError("--keepalive_max_ping_strikes: must be >= 0");
  }
  if (const int32_t http_port = absl::GetFlag(FLAGS_http_port);
      http_port < -1 || http_port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--http_port: must be -1 (off) or in [0, 65535], got ", http_port));
  }
  if (const int32_t threads = absl::GetFlag(FLAGS_http_threads); threads < 1 || threads > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("--http_threads: must be in [1, 64], got ", threads));
  }
  if (const int32_t health_port = absl::GetFlag(FLAGS_health_port);
      health_port < -1 || health_port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--health_port: must be -1 (off) or in [0, 65535], got ", health_port));
  }
  for (const auto& [name, value] : std::vector<std::pair<const char*, absl::Duration>>{
           {"keepalive_time", absl::GetFlag(FLAGS_keepalive_time)},
           {"keepalive_timeout", absl::GetFlag(FLAGS_keepalive_timeout)},
           {"keepalive_min_client_ping_interval",
            absl::GetFlag(FLAGS_keepalive_min_client_ping_interval)},
           {"max_connection_idle", absl::GetFlag(FLAGS_max_connection_idle)}}) {
    if (value < absl::ZeroDuration() || value > absl::Hours(24 * 365)) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, ": must be in [0, 365 days], got ",
                                                     absl::FormatDuration(value)));
    }
  }
  if (absl::GetFlag(FLAGS_max_new_tokens_limit) > int64_t{1} << 31) {
    return absl::InvalidArgumentError("--max_new_tokens_limit: must be at most 2^31");
  }
  if (absl::GetFlag(FLAGS_session_ttl) <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--session_ttl: must be positive");
  }
  for (const auto& [name, value] : std::vector<std::pair<const char*, absl::Duration>>{
           {"state_tier_timeout", absl::GetFlag(FLAGS_state_tier_timeout)},
           {"state_tier_lease", absl::GetFlag(FLAGS_state_tier_lease)}}) {
    if (value <= absl::ZeroDuration()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", name, ": must be positive, got ", absl::FormatDuration(value)));
    }
  }
  if (absl::GetFlag(FLAGS_state_tier_lease_wait) < absl::ZeroDuration() ||
      absl::GetFlag(FLAGS_state_tier_flush_timeout) < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        "--state_tier_lease_wait, --state_tier_flush_timeout: must not be negative");
  }
  if (absl::GetFlag(FLAGS_state_tier_chunk_bytes) < 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("--state_tier_chunk_bytes: must be >= 1024, got ",
                     absl::GetFlag(FLAGS_state_tier_chunk_bytes)));
  }
  if (absl::GetFlag(FLAGS_state_tier_prefix_ttl) < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--state_tier_prefix_ttl: must not be negative");
  }
  if (!absl::GetFlag(FLAGS_state_tier).empty() && absl::GetFlag(FLAGS_session_budget_bytes) == 0 &&
      (absl::GetFlag(FLAGS_prefix_cache_bytes) == 0 ||
       absl::GetFlag(FLAGS_state_tier_prefix_ttl) == absl::ZeroDuration())) {
    return absl::InvalidArgumentError(
        "--state_tier: nothing to share: needs sessions on (--session_budget_bytes > 0) or "
        "shared prefixes (--prefix_cache_bytes > 0 and --state_tier_prefix_ttl > 0)");
  }
  if (absl::GetFlag(FLAGS_drain_timeout) < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--drain_timeout: must not be negative");
  }
  if (absl::GetFlag(FLAGS_watchdog_timeout) < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--watchdog_timeout: must not be negative (0 disables)");
  }
  return absl::OkStatus();
}

// What tells a changed tokens file apart: a Kubernetes Secret volume swaps a symlink (new inode),
// an editor rewrites (new mtime / size).
struct FileStamp {
  bool exists = false;
  dev_t device = 0;
  ino_t inode = 0;
  off_t size = 0;
  int64_t mtime_ns = 0;
  bool operator==(const FileStamp&) const = default;
};
FileStamp Stamp(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) return FileStamp();
  return {true, st.st_dev, st.st_ino, st.st_size,
          int64_t{st.st_mtim.tv_sec} * 1000000000 + st.st_mtim.tv_nsec};
}

// A secret any local user can read is worth a line in the log (not a refusal: a container's
// mounted Secret may legitimately have any mode).
void WarnIfWorldReadable(const char* flag, const std::string& path) {
  struct stat st;
  if (path.empty() || stat(path.c_str(), &st) != 0 || (st.st_mode & S_IROTH) == 0) return;
  std::fprintf(stderr, "polysketch-server: warning: --%s %s is readable by every user\n", flag,
               path.c_str());
}

// Milliseconds for a gRPC channel argument (an int).
int Millis(absl::Duration d) { return static_cast<int>(absl::ToInt64Milliseconds(d)); }

// The connection limits a hostile or broken client cannot exceed (docs/security.md, "Limits").
// `max_receive_bytes`: --max_receive_message_bytes, or more where ImportState needs it.
void SetConnectionLimits(grpc::ServerBuilder& builder, int64_t max_receive_bytes) {
  builder.SetMaxReceiveMessageSize(static_cast<int>(max_receive_bytes));
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS,
                             absl::GetFlag(FLAGS_max_concurrent_streams));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS,
                             Millis(absl::GetFlag(FLAGS_keepalive_time)));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
                             Millis(absl::GetFlag(FLAGS_keepalive_timeout)));
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                             Millis(absl::GetFlag(FLAGS_keepalive_min_client_ping_interval)));
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES,
                             absl::GetFlag(FLAGS_keepalive_max_ping_strikes));
  if (absl::GetFlag(FLAGS_max_connection_idle) > absl::ZeroDuration()) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS,
                               Millis(absl::GetFlag(FLAGS_max_connection_idle)));
  }
}

// Attention memory per slot by kind name: what SetAttentionMemory reports times slots used.
std::map<std::string, int64_t> BytesPerSlotByKind(const engine::StateLayout& layout) {
  std::map<std::string, int64_t> bytes;
  for (const engine::LayerStateLayout& layer : layout.layers()) {
    bytes[std::string(engine::AttentionKindName(layer.kind))] += layer.bytes();
  }
  return bytes;
}

// --- The steps of Serve, in the order it takes them ---------------------------------------------

// The model's name in the API (the directory's last component) and the request limits.
service::ServiceOptions ServiceOptionsFromFlags(const std::string& model_dir) {
  service::ServiceOptions options;
  options.model_name = std::filesystem::path(model_dir).lexically_normal().filename().string();
  if (options.model_name.empty()) {
    options.model_name =
        std::filesystem::path(model_dir).lexically_normal().parent_path().filename().string();
  }
  options.max_prompt_tokens = absl::GetFlag(FLAGS_max_prompt_tokens);
  options.max_new_tokens_limit = absl::GetFlag(FLAGS_max_new_tokens_limit);
  options.max_waiting = absl::GetFlag(FLAGS_max_waiting);
  options.max_waiting_tokens = absl::GetFlag(FLAGS_max_waiting_tokens);
  options.max_prompt_bytes = absl::GetFlag(FLAGS_max_prompt_bytes);
  options.max_inflight_prompt_bytes = absl::GetFlag(FLAGS_max_inflight_prompt_bytes);
  options.max_stream_buffer_bytes = absl::GetFlag(FLAGS_max_stream_buffer_bytes);
  return options;
}

// TLS and bearer tokens, from the flags.
struct Security {
  service::TlsFiles tls_files;
  std::shared_ptr<grpc::ServerCredentials> credentials;
  std::shared_ptr<service::Authenticator> authenticator;  // null without --auth_tokens_file
};

// Reads the TLS and tokens files, warns about secrets every user can read and logs what the port
// will speak. Runs before anything listens, so a bad file stops the start.
absl::StatusOr<Security> LoadSecurity() {
  Security security;
  security.tls_files.cert = absl::GetFlag(FLAGS_tls_cert);
  security.tls_files.key = absl::GetFlag(FLAGS_tls_key);
  security.tls_files.client_ca = absl::GetFlag(FLAGS_tls_client_ca);
  PS_ASSIGN_OR_RETURN(security.credentials, service::MakeServerCredentials(security.tls_files));
  if (const std::string tokens_file = absl::GetFlag(FLAGS_auth_tokens_file); !tokens_file.empty()) {
    absl::StatusOr<std::unique_ptr<service::Authenticator>> loaded =
        service::Authenticator::FromFile(tokens_file);
    if (!loaded.ok()) {
      return absl::Status(loaded.status().code(),
                          absl::StrCat("--auth_tokens_file: ", loaded.status().message()));
    }
    security.authenticator = *std::move(loaded);
  }
  WarnIfWorldReadable("tls_key", security.tls_files.key);
  WarnIfWorldReadable("auth_tokens_file", absl::GetFlag(FLAGS_auth_tokens_file));
  std::fprintf(stderr, "polysketch-server: %s, %s\n",
               !service::TlsEnabled(security.tls_files) ? "plaintext (no TLS)"
               : security.tls_files.client_ca.empty()   ? "TLS"
                                                      : "mutual TLS (client certificates required)",
               security.authenticator == nullptr
                   ? "no authentication"
                   : absl::StrCat("bearer tokens: ", security.authenticator->num_tokens()).c_str());
  return security;
}

// The largest request message the gRPC port accepts: --max_receive_message_bytes, raised to one
// whole state + 1 MiB when sessions are on, because ImportState carries one. The config alone
// sizes it; if it does not load, the model load says why later.
int64_t MaxReceiveMessageBytes(const std::string& model_dir) {
  int64_t max_receive_bytes = absl::GetFlag(FLAGS_max_receive_message_bytes);
  if (absl::StatusOr<engine::ModelConfig> config = engine::LoadModelConfig(model_dir);
      config.ok() && absl::GetFlag(FLAGS_session_budget_bytes) > 0) {
    absl::StatusOr<engine::StateLayout> layout =
        engine::StateLayout::Create(*config, absl::GetFlag(FLAGS_max_context));
    if (layout.ok()) {
      const int64_t import_bytes = layout->bytes_per_slot() + (int64_t{1} << 20);
      max_receive_bytes = std::min<int64_t>(std::max(max_receive_bytes, import_bytes), INT32_MAX);
    }
  }
  return max_receive_bytes;
}

// The gRPC server and, with --health_port, the probe-only server (grpc.health.v1 alone, in
// plaintext, for probes that cannot speak TLS).
struct Servers {
  std::unique_ptr<grpc::Server> main;
  std::unique_ptr<grpc::Server> health;        // null without --health_port
  std::unique_ptr<ps::http::HttpServer> http;  // null with --http_port=-1
  int port = 0;
  int health_port = -1;
  // Shared by the engine-failure listener and the watchdog's (watchdog_listener.h).
  std::shared_ptr<service::EngineHealth> engine_health = std::make_shared<service::EngineHealth>();

  // Readiness or liveness on both.
  void SetServing(const std::string& service, bool serving) const {
    for (grpc::HealthCheckServiceInterface* health_service : HealthServices()) {
      health_service->SetServingStatus(service, serving);
    }
  }
  std::vector<grpc::HealthCheckServiceInterface*> HealthServices() const {
    std::vector<grpc::HealthCheckServiceInterface*> services = {main->GetHealthCheckService()};
    if (health != nullptr) services.push_back(health->GetHealthCheckService());
    return services;
  }
  // Ends them all: the HTTP API first (destroyed here, as its connections may cancel engine
  // requests and so must end before the scheduler), then the gRPC server, then the probe server,
  // so that probes see NOT_SERVING last.
  void Shutdown(std::chrono::system_clock::time_point deadline) {
    if (http != nullptr) {
      http->Shutdown(absl::FromChrono(deadline));
      http.reset();
    }
    main->Shutdown(deadline);
    if (health != nullptr) health->Shutdown(std::chrono::system_clock::now());
  }
};

// Starts the servers before the model loads: liveness SERVING and readiness NOT_SERVING, so an
// orchestrator sees the process up and not yet ready. Unavailable naming the address when a port
// cannot be had.
absl::StatusOr<Servers> StartServers(const std::string& model_dir, const Security& security,
                                     service::GenerationService& generation) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  const std::string host = absl::GetFlag(FLAGS_host);
  Servers servers;
  grpc::ServerBuilder builder;
  const std::string address = absl::StrCat(host, ":", absl::GetFlag(FLAGS_port));
  builder.AddListeningPort(address, security.credentials, &servers.port);
  builder.RegisterService(&generation);
  SetConnectionLimits(builder, MaxReceiveMessageBytes(model_dir));
  servers.main = builder.BuildAndStart();
  if (servers.main == nullptr || servers.port == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", address, " (port in use or bad address)"));
  }
  // The probe-only server: no GenerationService, no reflection, plaintext.
  if (absl::GetFlag(FLAGS_health_port) >= 0) {
    grpc::ServerBuilder health_builder;
    const std::string health_address = absl::StrCat(host, ":", absl::GetFlag(FLAGS_health_port));
    health_builder.AddListeningPort(health_address, grpc::InsecureServerCredentials(),
                                    &servers.health_port);
    SetConnectionLimits(health_builder, absl::GetFlag(FLAGS_max_receive_message_bytes));
    servers.health = health_builder.BuildAndStart();
    if (servers.health == nullptr || servers.health_port <= 0) {
      servers.main->Shutdown(std::chrono::system_clock::now());
      return absl::UnavailableError(absl::StrCat("--health_port: cannot listen on ", health_address,
                                                 " (port in use or bad address)"));
    }
  }
  // The HTTP API, answering 503 until the model is loaded (server/http/http_server.h).
  if (absl::GetFlag(FLAGS_http_port) >= 0) {
    absl::StatusOr<std::unique_ptr<ps::http::HttpServer>> http = ps::http::StartHttpServer(
        model_dir, generation.options().model_name, host, absl::GetFlag(FLAGS_http_port),
        absl::GetFlag(FLAGS_http_threads), security.tls_files,
        absl::GetFlag(FLAGS_max_receive_message_bytes), &generation);
    if (!http.ok()) {
      servers.Shutdown(std::chrono::system_clock::now());
      return http.status();
    }
    servers.http = *std::move(http);
  }
  servers.SetServing("", true);
  servers.SetServing(service::kReadinessServiceName, false);
  return servers;
}

// Keeps the scheduler's gauges in the metrics up to date: after every engine step (on the engine
// thread, through SchedulerOptions::on_step, which exists before the scheduler does), at start and
// at stop.
class EngineGauges {
 public:
  EngineGauges(ps::metrics::ServerMetrics* metrics, std::map<std::string, int64_t> bytes_per_slot)
      : metrics_(metrics), bytes_per_slot_(std::move(bytes_per_slot)) {}

  // The scheduler to read; nullptr before it exists and once it is gone.
  void SetScheduler(engine::Scheduler* scheduler) { scheduler_.store(scheduler); }

  void Refresh() {
    engine::Scheduler* scheduler = scheduler_.load();
    if (scheduler == nullptr) return;
    const engine::SchedulerStats stats = scheduler->Stats();
    metrics_->SetScheduler(stats);
    for (const auto& [kind, bytes] : bytes_per_slot_) {
      metrics_->SetAttentionMemory(kind, bytes * stats.slots_used);
    }
  }

 private:
  ps::metrics::ServerMetrics* const metrics_;
  const std::map<std::string, int64_t> bytes_per_slot_;
  std::atomic<engine::Scheduler*> scheduler_{nullptr};
};

// The model on its backend, run by the scheduler. Members are destroyed bottom up: the scheduler
// (and with it the model) before the gauges that read it and the backend it runs on.
struct LoadedEngine {
  std::unique_ptr<ps::kernels::Backend> backend;
  engine::ModelWeights weights;
  std::unique_ptr<EngineGauges> gauges;
  std::unique_ptr<engine::RedisStateTier> tier;  // --state_tier; outlives the scheduler
  std::unique_ptr<engine::Scheduler> scheduler;
};

// The --state_tier connection (null without the flag). A Redis that does not answer at start is
// not fatal: the server serves sessions from memory and the tier reconnects by itself.
absl::StatusOr<std::unique_ptr<engine::RedisStateTier>> ConnectStateTier() {
  const std::string address = absl::GetFlag(FLAGS_state_tier);
  if (address.empty()) return nullptr;
  engine::RedisTierOptions options;
  PS_RETURN_IF_ERROR(engine::ParseRedisAddress(address, "--state_tier", &options));
  options.timeout = absl::GetFlag(FLAGS_state_tier_timeout);
  options.chunk_bytes = absl::GetFlag(FLAGS_state_tier_chunk_bytes);
  if (const char* password = std::getenv("POLYSKETCH_STATE_TIER_PASSWORD")) {
    options.password = password;
  }
  PS_ASSIGN_OR_RETURN(std::unique_ptr<engine::RedisStateTier> tier,
                      engine::RedisStateTier::Create(std::move(options)));
  if (const absl::Status ping = tier->Ping(); ping.ok()) {
    std::fprintf(stderr, "polysketch-server: state tier %s reachable\n", tier->Describe().c_str());
  } else {
    std::fprintf(stderr,
                 "polysketch-server: state tier not reachable, serving sessions from memory "
                 "until it is: %s\n",
                 std::string(ping.message()).c_str());
  }
  return tier;
}

std::string ReplicaId() {
  std::string id = absl::GetFlag(FLAGS_replica_id);
  if (!id.empty()) return id;
  char host[256] = {};
  if (gethostname(host, sizeof(host) - 1) != 0) std::snprintf(host, sizeof(host), "replica");
  return absl::StrCat(host, "-", getpid());
}

// Loads the weights of `model_dir`, creates the --device backend, the model and the scheduler
// (its engine thread starts), whose steps feed `metrics`. A backend failure that stops the engine
// turns liveness and readiness of `servers` NOT_SERVING (watchdog_listener.h). Errors name the
// model directory or the flag at fault.
absl::StatusOr<LoadedEngine> BuildEngine(const std::string& model_dir, const Servers& servers,
                                         ps::metrics::ServerMetrics* metrics) {
  LoadedEngine loaded;
  absl::StatusOr<engine::ModelWeights> weights = engine::LoadWeights(model_dir);
  if (!weights.ok()) {
    return absl::Status(weights.status().code(), absl::StrCat("cannot load model ", model_dir, ": ",
                                                              weights.status().message()));
  }
  loaded.weights = *std::move(weights);
  absl::StatusOr<std::unique_ptr<ps::kernels::Backend>> backend =
      ps::kernels::CreateBackend(absl::GetFlag(FLAGS_device), absl::GetFlag(FLAGS_threads));
  if (!backend.ok()) {
    return absl::Status(backend.status().code(),
                        absl::StrCat("--device: ", backend.status().message()));
  }
  loaded.backend = *std::move(backend);
  std::fprintf(stderr, "polysketch-server: kernels on the %s backend\n",
               std::string(loaded.backend->name()).c_str());

  engine::ModelOptions model_options;
  model_options.num_slots = absl::GetFlag(FLAGS_slots);
  model_options.max_batch =
      absl::GetFlag(FLAGS_max_batch) > 0 ? absl::GetFlag(FLAGS_max_batch) : model_options.num_slots;
  model_options.prefill_chunk = absl::GetFlag(FLAGS_prefill_chunk);
  model_options.max_context = absl::GetFlag(FLAGS_max_context);
  PS_ASSIGN_OR_RETURN(model_options.weights_dtype,
                      engine::ResolveWeightsDtype(absl::GetFlag(FLAGS_weights_dtype),
                                                  loaded.weights, *loaded.backend));
  std::fprintf(stderr, "polysketch-server: linear weights in %s (--weights_dtype %s)\n",
               std::string(ps::kernels::WeightDtypeName(model_options.weights_dtype)).c_str(),
               absl::GetFlag(FLAGS_weights_dtype).c_str());
  PS_ASSIGN_OR_RETURN(
      model_options.kv_cache_dtype,
      engine::ResolveKvCacheDtype(absl::GetFlag(FLAGS_kv_cache_dtype), loaded.backend->name()));
  PS_ASSIGN_OR_RETURN(std::unique_ptr<engine::Model> model,
                      engine::Model::Create(loaded.weights, *loaded.backend, model_options));
  loaded.gauges = std::make_unique<EngineGauges>(metrics, BytesPerSlotByKind(model->layout()));

  engine::SchedulerOptions scheduler_options;
  scheduler_options.max_waiting = absl::GetFlag(FLAGS_max_waiting);
  scheduler_options.max_waiting_tokens = absl::GetFlag(FLAGS_max_waiting_tokens);
  scheduler_options.prefill_tokens_per_step = absl::GetFlag(FLAGS_prefill_tokens_per_step);
  scheduler_options.prefix_cache.budget_bytes = absl::GetFlag(FLAGS_prefix_cache_bytes);
  scheduler_options.prefix_cache.granularity = absl::GetFlag(FLAGS_prefix_cache_granularity);
  scheduler_options.prefix_cache.shared_across_owners = absl::GetFlag(FLAGS_prefix_cache_shared);
  scheduler_options.sessions.budget_bytes = absl::GetFlag(FLAGS_session_budget_bytes);
  scheduler_options.sessions.ttl = absl::GetFlag(FLAGS_session_ttl);
  scheduler_options.model_fingerprint = engine::ModelFingerprint(loaded.weights);
  PS_ASSIGN_OR_RETURN(loaded.tier, ConnectStateTier());
  scheduler_options.shared_tier = loaded.tier.get();
  scheduler_options.shared_tier_options.replica = ReplicaId();
  scheduler_options.shared_tier_options.lease = absl::GetFlag(FLAGS_state_tier_lease);
  scheduler_options.shared_tier_options.lease_wait = absl::GetFlag(FLAGS_state_tier_lease_wait);
  scheduler_options.shared_tier_options.max_queued_bytes =
      absl::GetFlag(FLAGS_state_tier_queue_bytes);
  scheduler_options.share_prefixes =
      absl::GetFlag(FLAGS_state_tier_prefix_ttl) > absl::ZeroDuration();
  if (scheduler_options.share_prefixes) {
    scheduler_options.shared_prefix_options.ttl = absl::GetFlag(FLAGS_state_tier_prefix_ttl);
  }
  scheduler_options.shared_prefix_options.max_queued_bytes =
      absl::GetFlag(FLAGS_state_tier_queue_bytes);
  scheduler_options.on_step = [metrics,
                               gauges = loaded.gauges.get()](const engine::StepStats& step) {
    metrics->EngineStep(step);
    gauges->Refresh();
  };
  scheduler_options.on_failure =
      service::MakeEngineFailureListener(servers.HealthServices(), metrics, servers.engine_health);
  PS_ASSIGN_OR_RETURN(loaded.scheduler,
                      engine::Scheduler::Create(std::move(model), scheduler_options));
  loaded.gauges->SetScheduler(loaded.scheduler.get());
  loaded.gauges->Refresh();
  return loaded;
}

// The engine progress watchdog (--watchdog_timeout; nullptr when 0): a stall turns liveness
// NOT_SERVING on both servers, sets the stalled gauge and logs a line (watchdog_listener.h).
absl::StatusOr<std::unique_ptr<engine::EngineWatchdog>> StartWatchdog(
    engine::Scheduler* scheduler, const Servers& servers, ps::metrics::ServerMetrics* metrics) {
  if (absl::GetFlag(FLAGS_watchdog_timeout) <= absl::ZeroDuration()) return nullptr;
  engine::WatchdogOptions watchdog_options;
  watchdog_options.timeout = absl::GetFlag(FLAGS_watchdog_timeout);
  PS_ASSIGN_OR_RETURN(
      std::unique_ptr<engine::EngineWatchdog> watchdog,
      engine::EngineWatchdog::Create(
          scheduler, watchdog_options,
          service::MakeWatchdogListener(servers.HealthServices(), metrics, servers.engine_health)));
  watchdog->Start();
  return watchdog;
}

// Waits for SIGTERM / SIGINT (blocked in every thread, so only sigwait sees them) and returns it.
// SIGHUP, or a changed tokens file with --auth_tokens_reload_interval, reloads the tokens of
// `authenticator` (null: none) and waits again; a bad file keeps the tokens in use.
int WaitForStopSignal(const sigset_t& signals, service::Authenticator* authenticator) {
  const std::string tokens_file = absl::GetFlag(FLAGS_auth_tokens_file);
  FileStamp tokens_stamp = Stamp(tokens_file);
  auto reload = [&](const char* why) {
    tokens_stamp = Stamp(tokens_file);
    if (authenticator == nullptr) {
      std::fprintf(stderr, "polysketch-server: %s: no --auth_tokens_file, nothing to reload\n",
                   why);
    } else if (const absl::Status reloaded = authenticator->Reload(); reloaded.ok()) {
      std::fprintf(stderr, "polysketch-server: %s: reloaded %zu bearer tokens\n", why,
                   authenticator->num_tokens());
    } else {
      std::fprintf(stderr, "polysketch-server: %s: reload failed, keeping %zu tokens: %s\n", why,
                   authenticator->num_tokens(), std::string(reloaded.message()).c_str());
    }
    std::fflush(stderr);
  };
  const absl::Duration reload_interval = absl::GetFlag(FLAGS_auth_tokens_reload_interval);
  const bool poll = authenticator != nullptr && reload_interval > absl::ZeroDuration();
  int signal_number = 0;
  for (;;) {
    if (poll) {
      const timespec wait = absl::ToTimespec(reload_interval);
      signal_number = sigtimedwait(&signals, nullptr, &wait);
      if (signal_number < 0) {  // the interval passed (EAGAIN) or EINTR
        if (!(Stamp(tokens_file) == tokens_stamp)) reload("tokens file changed");
        continue;
      }
    } else {
      sigwait(&signals, &signal_number);
    }
    if (signal_number != SIGHUP) return signal_number;
    reload("SIGHUP");
  }
}

// Readiness NOT_SERVING and no new requests (UNAVAILABLE); running ones get --drain_timeout to
// finish, then the rest are cancelled. True when everything finished in time.
bool Drain(engine::Scheduler& scheduler, const Servers& servers) {
  servers.SetServing(service::kReadinessServiceName, false);
  scheduler.StartDrain();
  const absl::Time drain_end = absl::Now() + absl::GetFlag(FLAGS_drain_timeout);
  while (!scheduler.Idle() && absl::Now() < drain_end) absl::SleepFor(absl::Milliseconds(20));
  const bool drained = scheduler.Idle();
  if (!drained) {
    // End what is left in the engine first, so that each call still sends its final message
    // (finish reason CANCELLED) and status CANCELLED before the transport closes; cutting the
    // calls with Shutdown alone left clients with UNAVAILABLE and no final message (fault test).
    scheduler.CancelAll();
    const absl::Time cancel_end = absl::Now() + absl::Seconds(2);
    while (!scheduler.Idle() && absl::Now() < cancel_end) absl::SleepFor(absl::Milliseconds(10));
  }
  return drained;
}

// Ends the servers, then the engine. Shutdown lets the calls flush their last messages for up to
// a second, then cancels those still open (a client that stopped reading); each cancelled call
// cancels its engine request (done within a step), so Shutdown returns once they have ended. The
// scheduler outlives every call; destroying it then ends anything left.
void Stop(Servers& servers, LoadedEngine& loaded,
          std::unique_ptr<engine::EngineWatchdog>& watchdog) {
  servers.Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  loaded.gauges->Refresh();
  watchdog.reset();  // it reads the scheduler
  loaded.gauges->SetScheduler(nullptr);
  loaded.scheduler.reset();
}

absl::Status Serve(const sigset_t& signals) {
  PS_RETURN_IF_ERROR(CheckFlags());
  const std::string model_dir = absl::GetFlag(FLAGS_model);
  PS_ASSIGN_OR_RETURN(Security security, LoadSecurity());
  service::ServiceOptions options = ServiceOptionsFromFlags(model_dir);
  options.authenticator = security.authenticator;
  const std::string metrics_address =
      absl::StrCat(absl::GetFlag(FLAGS_metrics_host), ":", absl::GetFlag(FLAGS_metrics_port));
  PS_ASSIGN_OR_RETURN(std::unique_ptr<ps::metrics::ServerMetrics> metrics,
                      ps::metrics::ServerMetrics::Create(metrics_address));
  service::GenerationService generation(options, metrics.get());

  PS_ASSIGN_OR_RETURN(Servers servers, StartServers(model_dir, security, generation));
  absl::StatusOr<LoadedEngine> loaded = BuildEngine(model_dir, servers, metrics.get());
  if (!loaded.ok()) {
    servers.Shutdown(std::chrono::system_clock::now());
    return loaded.status();
  }
  absl::StatusOr<std::unique_ptr<engine::EngineWatchdog>> watchdog =
      StartWatchdog(loaded->scheduler.get(), servers, metrics.get());
  if (!watchdog.ok()) {
    servers.Shutdown(std::chrono::system_clock::now());
    return watchdog.status();
  }
  generation.SetScheduler(loaded->scheduler.get());
  metrics->SetScrapeHook([gauges = loaded->gauges.get()] { gauges->Refresh(); });
  // Not when the engine already failed (its listener turned both NOT_SERVING for good).
  if (loaded->scheduler->failure().ok()) servers.SetServing(service::kReadinessServiceName, true);
  const std::string host = absl::GetFlag(FLAGS_host);
  const std::string health_note =
      servers.health == nullptr ? "" : absl::StrCat(", health on ", host, ":", servers.health_port);
  std::fprintf(stderr, "polysketch-server: serving %s on %s:%d, metrics on %s:%d%s\n",
               model_dir.c_str(), host.c_str(), servers.port,
               absl::GetFlag(FLAGS_metrics_host).c_str(), metrics->port(), health_note.c_str());
  std::fflush(stderr);

  const int signal_number = WaitForStopSignal(signals, security.authenticator.get());
  std::fprintf(stderr, "polysketch-server: %s: draining (up to %s)\n", strsignal(signal_number),
               absl::FormatDuration(absl::GetFlag(FLAGS_drain_timeout)).c_str());
  const bool drained = Drain(*loaded->scheduler, servers);
  if (loaded->tier != nullptr) {
    // Every completed turn was queued for the tier; wait for the writes before exiting.
    const absl::Status flushed = loaded->scheduler->FlushSessions(
        absl::Now() + absl::GetFlag(FLAGS_state_tier_flush_timeout));
    std::fprintf(stderr, "polysketch-server: session writes to the state tier: %s\n",
                 flushed.ok() ? "all done" : std::string(flushed.message()).c_str());
  }
  metrics->SetScrapeHook({});  // the gauges go with `loaded`
  Stop(servers, *loaded, *watchdog);
  std::fprintf(stderr, "polysketch-server: stopped (%s)\n",
               drained ? "drained" : "drain timeout: remaining requests cancelled");
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(kUsage);
  // --help lists the flags of files named like the program; ours live in server/main.cc.
  absl::FlagsUsageConfig usage_config;
  usage_config.contains_help_flags = [](absl::string_view file) {
    return absl::StrContains(file, "server/main");
  };
  usage_config.contains_helpshort_flags = usage_config.contains_help_flags;
  absl::SetFlagsUsageConfig(usage_config);
  const std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() > 1) {
    std::fprintf(stderr, "polysketch-server: unexpected argument '%s' (see --help)\n",
                 positional[1]);
    return 1;
  }
  // Block the drain signals before any thread starts, so every thread inherits the mask and the
  // main thread alone receives them through sigwait (no work in a signal handler).
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);  // reload of --auth_tokens_file
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  const absl::Status status = Serve(signals);
  if (!status.ok()) {
    std::fprintf(stderr, "polysketch-server: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  return 0;
}
