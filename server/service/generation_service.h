// The gRPC generation service (proto/polysketch/v1/generation.proto) on the callback (reactor)
// API: no thread per request. Each Generate / GenerateStream call validates its request
// (request_convert.h), submits it to the engine's Scheduler, and receives the engine's events
// through a RequestObserver that never blocks: it queues the message under a mutex and starts a
// write when none is in flight. A client that cancels or disconnects makes the call cancel its
// engine request, so the slot frees within one engine step.
//
// Thread-safety: every method may be called from any thread (gRPC's and the engine's).
#ifndef POLYSKETCH_SERVER_SERVICE_GENERATION_SERVICE_H_
#define POLYSKETCH_SERVER_SERVICE_GENERATION_SERVICE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include <absl/status/status.h>
#include <grpcpp/grpcpp.h>

#include "polysketch/v1/generation.grpc.pb.h"
#include "server/engine/serving/scheduler.h"
#include "server/metrics/metrics.h"
#include "server/service/auth.h"
#include "server/service/request_convert.h"

namespace ps::service {

// The readiness service name of grpc.health.v1 (liveness is "").
inline constexpr char kReadinessServiceName[] = "polysketch.v1.GenerationService";

// Most messages one stream keeps queued while a write is in flight. Past it, new deltas are
// merged into the last queued message (nothing is dropped; a slow client gets larger messages
// and the engine never waits for it). The bytes they hold are bounded separately
// (ServiceOptions::max_stream_buffer_bytes).
inline constexpr size_t kMaxPendingStreamMessages = 32;

// Bytes a request's prompt counts for the prompt-bytes limits: the text's bytes, or 4 per token
// id (the engine holds each as an int32).
int64_t PromptBytes(const polysketch::v1::GenerateRequest& request);

// The id the engine knows a request by: `request_id` alone without authentication, else
// "<identity>:<request_id>". Request ids are thus per identity: one caller cannot cancel another's
// request or collide with its ids; clients only ever see their own request_id.
std::string EngineRequestId(absl::string_view identity, absl::string_view request_id);

struct ServiceOptions {
  std::string model_name;  // ModelInfo.name (ModelInfo.device is the scheduler's backend)
  int64_t max_prompt_tokens = int64_t{1} << 20;
  int64_t max_new_tokens_limit = 4096;
  int64_t max_waiting = 256;             // reported in ModelInfo.limits
  int64_t max_waiting_tokens = 1 << 22;  // reported in ModelInfo.limits
  // Largest prompt of one request (Generate, GenerateStream, Tokenize), in PromptBytes; past it
  // INVALID_ARGUMENT naming --max_prompt_bytes.
  int64_t max_prompt_bytes = int64_t{4} << 20;
  // Most PromptBytes of all requests in flight (from validation until their call ends); a
  // request that would pass it is RESOURCE_EXHAUSTED naming --max_inflight_prompt_bytes.
  int64_t max_inflight_prompt_bytes = int64_t{256} << 20;
  // Most bytes of output one stream keeps waiting for its client (beyond the write gRPC has in
  // flight). Past it the engine request is cancelled and the stream ends RESOURCE_EXHAUSTED
  // naming --max_stream_buffer_bytes.
  int64_t max_stream_buffer_bytes = int64_t{4} << 20;
  // Null: authentication off (every call is kAnonymousIdentity). Not owned exclusively: the
  // server's main reloads it on SIGHUP.
  std::shared_ptr<const Authenticator> authenticator;
};

// The gRPC status for a scheduler Submit error (InvalidArgument and OutOfRange ->
// INVALID_ARGUMENT, ResourceExhausted, Unavailable, AlreadyExists, NotFound as they are, anything
// else INTERNAL).
grpc::Status ToGrpcStatus(const absl::Status& status);  // + Unauthenticated, PermissionDenied

class GenerationService final : public polysketch::v1::GenerationService::CallbackService {
 public:
  // `metrics` may be null (no metrics). Neither pointer is owned; both must outlive the gRPC
  // server this service is registered with (destroy the scheduler only after Server::Shutdown).
  GenerationService(ServiceOptions options, metrics::ServerMetrics* metrics);

  // Makes the service serve `scheduler` (not owned). Until it is called every RPC answers
  // UNAVAILABLE ("the model is loading"). Call once.
  void SetScheduler(engine::Scheduler* scheduler);

  grpc::ServerUnaryReactor* Generate(grpc::CallbackServerContext* context,
                                     const polysketch::v1::GenerateRequest* request,
                                     polysketch::v1::GenerateResponse* response) override;
  grpc::ServerWriteReactor<polysketch::v1::GenerateStreamResponse>* GenerateStream(
      grpc::CallbackServerContext* context,
      const polysketch::v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const polysketch::v1::TokenizeRequest* request,
                                     polysketch::v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const polysketch::v1::GetModelInfoRequest* request,
                                         polysketch::v1::ModelInfo* response) override;
  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* context,
                                   const polysketch::v1::CancelRequest* request,
                                   polysketch::v1::CancelResponse* response) override;
  grpc::ServerUnaryReactor* OpenSession(grpc::CallbackServerContext* context,
                                        const polysketch::v1::OpenSessionRequest* request,
                                        polysketch::v1::OpenSessionResponse* response) override;
  grpc::ServerUnaryReactor* CloseSession(grpc::CallbackServerContext* context,
                                         const polysketch::v1::CloseSessionRequest* request,
                                         polysketch::v1::CloseSessionResponse* response) override;
  grpc::ServerUnaryReactor* ExportState(grpc::CallbackServerContext* context,
                                        const polysketch::v1::ExportStateRequest* request,
                                        polysketch::v1::ExportStateResponse* response) override;
  grpc::ServerUnaryReactor* ImportState(grpc::CallbackServerContext* context,
                                        const polysketch::v1::ImportStateRequest* request,
                                        polysketch::v1::ImportStateResponse* response) override;

  // The caller's identity (the name of its token; kAnonymousIdentity with authentication off).
  // Unauthenticated (no detail beyond "missing" / "invalid") otherwise, counted in the metrics.
  // Every GenerationService call passes through it first (session calls included); health and
  // reflection do not (probes need no token). Sessions and engine requests are owned by this
  // identity (EngineRequest::owner, EngineRequestId).
  absl::StatusOr<std::string> Authenticate(const grpc::ServerContextBase& context);
  // The same from the value of an `authorization` header (nullopt: none), for the HTTP API
  // (server/http/), which shares the tokens, the identities and the metric.
  absl::StatusOr<std::string> AuthenticateHeader(std::optional<absl::string_view> authorization);

  // For the calls: validates `request` and prepares the engine request (id, deadline from the
  // gRPC deadline and time_limit_ms). On error the refusal is counted in the metrics.
  absl::StatusOr<ConvertedRequest> Prepare(grpc::CallbackServerContext* context,
                                           const polysketch::v1::GenerateRequest& request);
  // The same without a gRPC call (the HTTP API): `deadline` is the caller's (InfiniteFuture for
  // none); the request's time_limit_ms applies as well.
  absl::StatusOr<ConvertedRequest> Prepare(const polysketch::v1::GenerateRequest& request,
                                           absl::Time deadline);
  // Takes `bytes` from the in-flight prompt budget (max_inflight_prompt_bytes); give them back
  // with ReleasePromptBytes when the call ends. ResourceExhausted (counted) when they do not fit.
  absl::Status ReservePromptBytes(int64_t bytes);
  void ReleasePromptBytes(int64_t bytes);
  int64_t inflight_prompt_bytes() const { return inflight_prompt_bytes_.load(); }
  const ServiceOptions& options() const { return options_; }
  engine::Scheduler* scheduler() const { return scheduler_.load(std::memory_order_acquire); }
  metrics::ServerMetrics* metrics() const { return metrics_; }
  // Counts a Submit refusal in the metrics (by its code).
  void CountRefusal(const absl::Status& status);

 private:
  const ServiceOptions options_;
  metrics::ServerMetrics* const metrics_;
  std::atomic<engine::Scheduler*> scheduler_{nullptr};
  std::atomic<uint64_t> next_id_{0};
  std::atomic<int64_t> inflight_prompt_bytes_{0};
  const uint64_t id_salt_;
};

}  // namespace ps::service

#endif  // POLYSKETCH_SERVER_SERVICE_GENERATION_SERVICE_H_
