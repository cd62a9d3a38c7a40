// The service's calls. Each Generate / GenerateStream call is one reactor object kept alive by
// two owners: itself until gRPC says OnDone, and the RequestObserver the scheduler holds until
// the request ends, so neither gRPC nor the engine thread can see it destroyed under them.
// Calls end only through the engine's OnFinish once submitted (the scheduler guarantees exactly
// one), so a cancelled call still reports its final state and frees its slot first. A stream
// whose client stops reading is the exception: past its buffer bound it finishes at once with
// RESOURCE_EXHAUSTED (its write may never complete) and cancels its engine request.
#include "server/service/generation_service.h"

#include <chrono>
#include <deque>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <utility>

#include <absl/strings/str_cat.h>
#include <absl/time/clock.h>

#include "server/engine/model_io/tokenizer.h"

namespace ps::service {
namespace {

namespace v1 = ::polysketch::v1;

// A cancel this close to the request's deadline is taken as the deadline (CancelEngineRequest):
// above the delay between a client's deadline and the server's copy of it, which grows with the
// load (the soak saw a quarter of the expired requests misread with a 100 ms window). A client
// that cancels by itself this close to its deadline is counted as a deadline: the lesser error.
constexpr absl::Duration kDeadlineCancelWindow = absl::Seconds(1);

// A stream with this many messages queued holds back its request's prompt log-probabilities
// (StreamCall::Backlogged), well below kMaxPendingStreamMessages where messages merge; for at
// most kMaxBacklogWait without its client reading anything.
constexpr size_t kBackloggedMessages = 8;
constexpr absl::Duration kMaxBacklogWait = absl::Seconds(30);

// The name of a gRPC status code, as polysketch_api_requests_total{code} shows it.
const char* StatusCodeName(grpc::StatusCode code) {
  static constexpr const char* kNames[] = {"OK",
                                           "CANCELLED",
                                           "UNKNOWN",
                                           "INVALID_ARGUMENT",
                                           "DEADLINE_EXCEEDED",
                                           "NOT_FOUND",
                                           "ALREADY_EXISTS",
                                           "PERMISSION_DENIED",
                                           "RESOURCE_EXHAUSTED",
                                           "FAILED_PRECONDITION",
                                           "ABORTED",
                                           "OUT_OF_RANGE",
                                           "UNIMPLEMENTED",
                                           "INTERNAL",
                                           "UNAVAILABLE",
                                           "DATA_LOSS",
                                           "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  return i >= 0 && i < static_cast<int>(std::size(kNames)) ? kNames[i] : "UNKNOWN";
}

// The gRPC status a request that finished with `result` ends with.
grpc::Status FinalStatus(const engine::FinalResult& result) {
  switch (result.reason) {
    case engine::FinishReason::kLength:
    case engine::FinishReason::kStopString:
    case engine::FinishReason::kStopToken:
      return grpc::Status::OK;
    case engine::FinishReason::kCancelled:
      return grpc::Status(
          grpc::StatusCode::CANCELLED,
          absl::StrCat("request cancelled after ", result.generated_tokens, " generated tokens"));
    case engine::FinishReason::kDeadline:
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                          absl::StrCat("deadline or time limit reached after ",
                                       result.generated_tokens, " generated tokens"));
    case engine::FinishReason::kError:
      break;
  }
  return grpc::Status(grpc::StatusCode::INTERNAL, std::string(result.error.message()));
}

void AppendTokens(const std::vector<engine::TokenOutput>& tokens,
                  google::protobuf::RepeatedPtrField<v1::GeneratedToken>* out) {
  for (const engine::TokenOutput& token : tokens) {
    v1::GeneratedToken* t = out->Add();
    t->set_token_id(token.token_id);
    t->set_logprob(token.logprob);
    for (const engine::TokenLogprob& alt : token.top_logprobs) {
      v1::TokenLogprob* a = t->add_top_logprobs();
      a->set_token_id(alt.token_id);
      a->set_logprob(alt.logprob);
    }
  }
}

// Forwards the engine's events to a call; the scheduler owns it, it co-owns the call.
template <typename Call>
class CallObserver final : public engine::RequestObserver {
 public:
  explicit CallObserver(std::shared_ptr<Call> call) : call_(std::move(call)) {}
  void OnDelta(engine::StreamDelta delta) override { call_->OnEngineDelta(std::move(delta)); }
  void OnFinish(engine::FinalResult result) override { call_->OnEngineFinish(std::move(result)); }
  bool Backlogged() override { return call_->Backlogged(); }

 private:
  std::shared_ptr<Call> call_;
};

// What both call kinds share: submission, cancellation and per-token metrics.
class CallBase {
 protected:
  CallBase(GenerationService* service, grpc::CallbackServerContext* context)
      : service_(service), context_(context) {}
  ~CallBase() { ReleasePromptBytes(); }

  // Authenticates, validates, reserves the prompt's bytes and submits; on error returns the
  // status to finish the call with.
  template <typename Call>
  std::optional<grpc::Status> Submit(const v1::GenerateRequest& proto, std::shared_ptr<Call> self) {
    absl::StatusOr<std::string> identity = service_->Authenticate(*context_);
    if (!identity.ok()) return ToGrpcStatus(identity.status());
    identity_ = *std::move(identity);
    absl::StatusOr<ConvertedRequest> converted = service_->Prepare(context_, proto);
    if (!converted.ok()) return ToGrpcStatus(converted.status());
    const int64_t prompt_bytes = PromptBytes(proto);
    if (absl::Status reserved = service_->ReservePromptBytes(prompt_bytes); !reserved.ok()) {
      return ToGrpcStatus(reserved);
    }
    reserved_prompt_bytes_.store(prompt_bytes);
    id_ = converted->request.id;
    // The engine keys requests by identity and id, so that one caller can neither cancel nor
    // collide with another's request ids.
    converted->request.id = EngineRequestId(identity_, id_);
    engine_id_ = converted->request.id;
    deadline_ = converted->request.deadline;
    converted->request.observer = std::make_shared<CallObserver<Call>>(std::move(self));
    converted->request.owner = identity_;  // sessions are visible to their owner only
    absl::Status status = service_->scheduler()->Submit(std::move(converted->request));
    if (status.code() == absl::StatusCode::kAlreadyExists) {  // name the client's id, not ours
      status = absl::AlreadyExistsError(absl::StrCat("request_id \"", id_, "\" is already in use"));
    }
    if (!status.ok()) {
      ReleasePromptBytes();
      service_->CountRefusal(status);
      return ToGrpcStatus(status);
    }
    submitted_.store(true);
    return std::nullopt;
  }

  // Gives the prompt's bytes back to the in-flight budget (once; the engine no longer needs the
  // prompt when the request has finished).
  void ReleasePromptBytes() {
    const int64_t bytes = reserved_prompt_bytes_.exchange(0);
    if (bytes > 0) service_->ReleasePromptBytes(bytes);
  }

  // gRPC cancelled the call (client cancel, disconnect, or its deadline), or the client stopped
  // reading: end the engine request. Near or past the deadline, as a deadline: a client whose
  // own deadline fired cancels the stream (RST_STREAM) a little before the server's copy of that
  // deadline, which starts only when the headers arrive, and that must count as a deadline, not
  // as a client cancel (found by the fault test's deadline storm: a quarter of the expired
  // requests were counted cancelled).
  void CancelEngineRequest() {
    if (!submitted_.load()) return;
    const engine::FinishReason reason = absl::Now() >= deadline_ - kDeadlineCancelWindow
                                            ? engine::FinishReason::kDeadline
                                            : engine::FinishReason::kCancelled;
    engine::Scheduler* scheduler = service_->scheduler();
    // NotFound: it has already ended.
    if (scheduler != nullptr) scheduler->Cancel(engine_id_, reason).IgnoreError();
  }

  // Inter-token latency between this delta and the previous one. Engine thread only.
  void RecordTokens(int64_t num_tokens) {
    if (num_tokens == 0) return;
    const absl::Time now = absl::Now();
    if (service_->metrics() != nullptr && last_tokens_ != absl::InfinitePast()) {
      service_->metrics()->InterTokenLatency(now - last_tokens_, num_tokens);
    }
    last_tokens_ = now;
  }

  void RecordFinish(const engine::FinalResult& result) {
    if (service_->metrics() != nullptr) service_->metrics()->RequestFinished(result);
  }

  // polysketch_api_requests_total{api="grpc"} for the call ending with `status`.
  void CountCall(const char* method, const grpc::Status& status) {
    if (service_->metrics() != nullptr) {
      service_->metrics()->ApiRequest("grpc", method, StatusCodeName(status.error_code()));
    }
  }

  GenerationService* const service_;
  grpc::CallbackServerContext* const context_;
  std::string id_;         // the request id the client sees
  std::string engine_id_;  // EngineRequestId(identity_, id_)
  std::string identity_;   // the caller (Authenticate): owner of the request and its session
  absl::Time deadline_ = absl::InfiniteFuture();
  std::atomic<bool> submitted_{false};
  std::atomic<int64_t> reserved_prompt_bytes_{0};
  absl::Time last_tokens_ = absl::InfinitePast();
};

// Generate: accumulates every delta into the response, finishes on the engine's OnFinish.
class UnaryCall final : public grpc::ServerUnaryReactor, public CallBase {
 public:
  static grpc::ServerUnaryReactor* Start(GenerationService* service,
                                         grpc::CallbackServerContext* context,
                                         const v1::GenerateRequest* request,
                                         v1::GenerateResponse* response) {
    auto call = std::make_shared<UnaryCall>(service, context, response);
    call->self_ = call;
    if (std::optional<grpc::Status> error = call->Submit(*request, call)) {
      call->CountCall("Generate", *error);
      call->Finish(*error);
    }
    return call.get();
  }

  UnaryCall(GenerationService* service, grpc::CallbackServerContext* context,
            v1::GenerateResponse* response)
      : CallBase(service, context), response_(response) {}

  void OnEngineDelta(engine::StreamDelta delta) {
    RecordTokens(static_cast<int64_t>(delta.tokens.size()));
    std::lock_guard<std::mutex> lock(mu_);
    response_->mutable_text()->append(delta.text);
    AppendTokens(delta.tokens, response_->mutable_tokens());
    AppendTokens(delta.prompt_logprobs, response_->mutable_prompt_logprobs());
  }

  // The whole response is one message: nothing is waiting for a client to read.
  bool Backlogged() { return false; }

  void OnEngineFinish(engine::FinalResult result) {
    RecordFinish(result);
    ReleasePromptBytes();
    {
      std::lock_guard<std::mutex> lock(mu_);
      response_->set_request_id(id_);
      FillFinalInfo(result, response_->mutable_final());
    }
    const grpc::Status status = FinalStatus(result);
    CountCall("Generate", status);
    Finish(status);
  }

  void OnCancel() override { CancelEngineRequest(); }
  void OnDone() override {
    std::shared_ptr<UnaryCall> keep = std::move(self_);  // may be the last owner
  }

 private:
  std::mutex mu_;
  v1::GenerateResponse* const response_;  // gRPC's, valid until Finish
  std::shared_ptr<UnaryCall> self_;
};

// GenerateStream: each engine delta becomes one message; a bounded queue, one write in flight.
class StreamCall final : public grpc::ServerWriteReactor<v1::GenerateStreamResponse>,
                         public CallBase {
 public:
  static grpc::ServerWriteReactor<v1::GenerateStreamResponse>* Start(
      GenerationService* service, grpc::CallbackServerContext* context,
      const v1::GenerateRequest* request) {
    auto call = std::make_shared<StreamCall>(service, context);
    call->self_ = call;
    if (std::optional<grpc::Status> error = call->Submit(*request, call)) {
      std::unique_lock<std::mutex> lock(call->mu_);
      call->final_status_ = *error;
      call->Pump(lock);
    }
    return call.get();
  }

  StreamCall(GenerationService* service, grpc::CallbackServerContext* context)
      : CallBase(service, context) {}

  void OnEngineDelta(engine::StreamDelta delta) {
    RecordTokens(static_cast<int64_t>(delta.tokens.size()));
    std::unique_lock<std::mutex> lock(mu_);
    if (client_gone_ || overflowed_) return;
    Pending* pending = MessageToAppend();
    pending->message.mutable_text()->append(delta.text);
    AppendTokens(delta.tokens, pending->message.mutable_tokens());
    AppendTokens(delta.prompt_logprobs, pending->message.mutable_prompt_logprobs());
    const int64_t bytes = DeltaBytes(delta);
    pending->bytes += bytes;
    pending_bytes_ += bytes;
    if (pending_bytes_ > service_->options().max_stream_buffer_bytes) {
      Overflow(lock);
      return;
    }
    Pump(lock);
  }

  void OnEngineFinish(engine::FinalResult result) {
    RecordFinish(result);
    ReleasePromptBytes();
    std::unique_lock<std::mutex> lock(mu_);
    if (overflowed_) return;  // already finished with RESOURCE_EXHAUSTED
    if (!client_gone_) FillFinalInfo(result, MessageToAppend()->message.mutable_final());
    final_status_ = FinalStatus(result);
    Pump(lock);
  }

  // Prompt log-probabilities come in bulk (a chunk's worth per engine delta, a long prompt's worth
  // faster than a client may read): past kBackloggedMessages queued messages the engine holds
  // this request's prefill back (RequestObserver::Backlogged), so the queue never merges them
  // into one large message. A client that reads nothing for kMaxBacklogWait is no longer waited
  // for: output piles up again and max_stream_buffer_bytes ends the call, as for any slow reader.
  bool Backlogged() {
    std::lock_guard<std::mutex> lock(mu_);
    if (client_gone_ || overflowed_ || pending_.size() < kBackloggedMessages) {
      backlogged_since_ = absl::InfiniteFuture();
      return false;
    }
    const absl::Time now = absl::Now();
    if (backlogged_since_ == absl::InfiniteFuture()) backlogged_since_ = now;
    return now - backlogged_since_ < kMaxBacklogWait;
  }

  void OnWriteDone(bool ok) override {
    std::unique_lock<std::mutex> lock(mu_);
    writing_ = false;
    pending_bytes_ -= pending_.front().bytes;
    pending_.pop_front();
    if (!ok) {
      client_gone_ = true;
      pending_.clear();
      pending_bytes_ = 0;
    }
    Pump(lock);
  }

  void OnCancel() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      client_gone_ = true;
    }
    CancelEngineRequest();
  }

  void OnDone() override {
    std::shared_ptr<StreamCall> keep = std::move(self_);  // may be the last owner
  }

 private:
  // A message queued for the client and the bytes of output it holds (DeltaBytes).
  struct Pending {
    v1::GenerateStreamResponse message;
    int64_t bytes = 0;
  };

  // About the bytes `delta` adds to a message on the wire: its text, and per token the id,
  // logprob and each alternative with their tags (an upper estimate, not the exact encoding,
  // so that the bound costs O(delta) and not a re-serialisation of the queued message).
  static int64_t DeltaBytes(const engine::StreamDelta& delta) {
    int64_t bytes = static_cast<int64_t>(delta.text.size());
    for (const auto* tokens : {&delta.tokens, &delta.prompt_logprobs}) {
      for (const engine::TokenOutput& token : *tokens) {
        bytes += 16 + 16 * static_cast<int64_t>(token.top_logprobs.size());
      }
    }
    return bytes;
  }

  // The client has let more than max_stream_buffer_bytes pile up: drop what it has not been
  // sent, end the engine request and finish the call now with RESOURCE_EXHAUSTED. Finish does
  // not wait for the write in flight, which may never complete while the client does not read.
  // Called with mu_ held; releases it.
  void Overflow(std::unique_lock<std::mutex>& lock) {
    overflowed_ = true;
    const int64_t limit = service_->options().max_stream_buffer_bytes;
    // The front message is gRPC's while a write is in flight: keep it.
    while (pending_.size() > (writing_ ? 1u : 0u)) pending_.pop_back();
    pending_bytes_ = pending_.empty() ? 0 : pending_.front().bytes;
    const bool finish_now = !finished_;
    finished_ = true;
    lock.unlock();
    if (service_->metrics() != nullptr) service_->metrics()->StreamBufferOverflow();
    CancelEngineRequest();
    if (finish_now) {
      const grpc::Status status(
          grpc::StatusCode::RESOURCE_EXHAUSTED,
          absl::StrCat("the client is not reading: more than ", limit,
                       " bytes of output waited to be sent (--max_stream_buffer_bytes); the "
                       "request was cancelled"));
      CountCall("GenerateStream", status);
      Finish(status);
    }
  }

  // The message new output goes into: the last queued one unless it is being written or the
  // queue has room for a new one. Called with mu_ held.
  Pending* MessageToAppend() {
    const bool back_in_flight = writing_ && pending_.size() == 1;
    if (pending_.empty() || back_in_flight || pending_.size() < kMaxPendingStreamMessages) {
      pending_.emplace_back().message.set_request_id(id_);
    }
    return &pending_.back();
  }

  // Starts the next write, or finishes the call once the final status is known and everything
  // queued was written (or the client is gone). Called with mu_ held; releases it before calling
  // into gRPC.
  void Pump(std::unique_lock<std::mutex>& lock) {
    if (writing_ || finished_) return;
    if (!pending_.empty() && !client_gone_) {
      writing_ = true;
      const v1::GenerateStreamResponse* message = &pending_.front().message;  // stable: front
      lock.unlock();
      StartWrite(message);
      return;
    }
    if (final_status_.has_value()) {
      finished_ = true;
      const grpc::Status status = *final_status_;
      lock.unlock();
      CountCall("GenerateStream", status);
      Finish(status);
    }
  }

  std::mutex mu_;
  std::deque<Pending> pending_;  // front is in flight when writing_
  int64_t pending_bytes_ = 0;    // sum of pending_[i].bytes
  bool writing_ = false;
  bool client_gone_ = false;
  bool overflowed_ = false;  // finished for max_stream_buffer_bytes
  bool finished_ = false;
  absl::Time backlogged_since_ = absl::InfiniteFuture();  // Backlogged(): since when
  std::optional<grpc::Status> final_status_;
  std::shared_ptr<StreamCall> self_;
};

}  // namespace

std::string EngineRequestId(absl::string_view identity, absl::string_view request_id) {
  // Token names have no ':', so the prefix cannot be forged with a request id.
  if (identity.empty()) return std::string(request_id);
  return absl::StrCat(identity, ":", request_id);
}

int64_t PromptBytes(const v1::GenerateRequest& request) {
  if (request.prompt_case() == v1::GenerateRequest::kTokenIds) {
    return int64_t{4} * request.token_ids().ids_size();
  }
  return static_cast<int64_t>(request.text().size());
}

grpc::Status ToGrpcStatus(const absl::Status& status) {
  grpc::StatusCode code = grpc::StatusCode::INTERNAL;
  switch (status.code()) {
    case absl::StatusCode::kOk:
      return grpc::Status::OK;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
      code = grpc::StatusCode::INVALID_ARGUMENT;
      break;
    case absl::StatusCode::kResourceExhausted:
      code = grpc::StatusCode::RESOURCE_EXHAUSTED;
      break;
    case absl::StatusCode::kUnavailable:
      code = grpc::StatusCode::UNAVAILABLE;
      break;
    case absl::StatusCode::kAlreadyExists:
      code = grpc::StatusCode::ALREADY_EXISTS;
      break;
    case absl::StatusCode::kNotFound:
      code = grpc::StatusCode::NOT_FOUND;
      break;
    case absl::StatusCode::kUnauthenticated:
      code = grpc::StatusCode::UNAUTHENTICATED;
      break;
    case absl::StatusCode::kPermissionDenied:
      code = grpc::StatusCode::PERMISSION_DENIED;
      break;
    case absl::StatusCode::kFailedPrecondition:
      code = grpc::StatusCode::FAILED_PRECONDITION;
      break;
    case absl::StatusCode::kDataLoss:
      // Only client bytes are decoded (an imported state): damaged input, not lost server data.
      code = grpc::StatusCode::INVALID_ARGUMENT;
      break;
    default:
      break;
  }
  return grpc::Status(code, std::string(status.message()));
}

GenerationService::GenerationService(ServiceOptions options, metrics::ServerMetrics* metrics)
    : options_(std::move(options)), metrics_(metrics), id_salt_(std::random_device{}()) {}

void GenerationService::SetScheduler(engine::Scheduler* scheduler) {
  scheduler_.store(scheduler, std::memory_order_release);
}

void GenerationService::CountRefusal(const absl::Status& status) {
  if (metrics_ == nullptr) return;
  switch (status.code()) {
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kUnavailable:
      metrics_->RequestRefused(metrics::FailureReason::kRejected);
      break;
    // The caller's errors, not the server's: a bad field, an id in use, and a session the
    // caller named that this server does not know (NotFound: unknown, expired, closed or
    // another identity's) or cannot use now (FailedPrecondition: a turn of it in progress,
    // sessions off). Counting them as internal would page whoever watches that alert.
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kFailedPrecondition:
      metrics_->RequestRefused(metrics::FailureReason::kValidation);
      break;
    default:
      metrics_->RequestRefused(metrics::FailureReason::kInternal);
      break;
  }
}

absl::StatusOr<std::string> GenerationService::Authenticate(
    const grpc::ServerContextBase& context) {
  if (options_.authenticator == nullptr) return std::string(kAnonymousIdentity);
  absl::StatusOr<std::string> identity = options_.authenticator->Authenticate(context);
  if (!identity.ok() && metrics_ != nullptr) metrics_->AuthFailure();
  return identity;
}

absl::Status GenerationService::ReservePromptBytes(int64_t bytes) {
  const int64_t limit = options_.max_inflight_prompt_bytes;
  int64_t held = inflight_prompt_bytes_.load();
  do {
    if (held + bytes > limit) {
      absl::Status status = absl::ResourceExhaustedError(
          absl::StrCat("prompts in flight hold ", held, " bytes; this prompt's ", bytes,
                       " bytes would pass --max_inflight_prompt_bytes=", limit, "; retry later"));
      CountRefusal(status);
      return status;
    }
  } while (!inflight_prompt_bytes_.compare_exchange_weak(held, held + bytes));
  return absl::OkStatus();
}

void GenerationService::ReleasePromptBytes(int64_t bytes) {
  inflight_prompt_bytes_.fetch_sub(bytes);
}

absl::StatusOr<std::string> GenerationService::AuthenticateHeader(
    std::optional<absl::string_view> authorization) {
  if (options_.authenticator == nullptr) return std::string(kAnonymousIdentity);
  absl::StatusOr<std::string> identity = options_.authenticator->AuthenticateValue(authorization);
  if (!identity.ok() && metrics_ != nullptr) metrics_->AuthFailure();
  return identity;
}

absl::StatusOr<ConvertedRequest> GenerationService::Prepare(grpc::CallbackServerContext* context,
                                                            const v1::GenerateRequest& request) {
  absl::Time deadline = absl::InfiniteFuture();
  if (context->deadline() != std::chrono::system_clock::time_point::max()) {
    deadline = absl::FromChrono(context->deadline());
  }
  return Prepare(request, deadline);
}

absl::StatusOr<ConvertedRequest> GenerationService::Prepare(const v1::GenerateRequest& request,
                                                            absl::Time deadline) {
  engine::Scheduler* sched = scheduler();
  if (sched == nullptr) {
    absl::Status status = absl::UnavailableError("the model is loading");
    CountRefusal(status);
    return status;
  }
  // Before the conversion, which copies the prompt.
  if (const int64_t bytes = PromptBytes(request); bytes > options_.max_prompt_bytes) {
    absl::Status status = absl::InvalidArgumentError(
        absl::StrCat("prompt: must be at most ", options_.max_prompt_bytes,
                     " bytes (--max_prompt_bytes; text bytes, or 4 per token id), got ", bytes));
    CountRefusal(status);
    return status;
  }
  RequestLimits limits;
  limits.vocab_size = sched->config().vocab_size;
  limits.max_context = sched->model().max_context();
  limits.max_prompt_tokens = options_.max_prompt_tokens;
  limits.max_new_tokens_limit = options_.max_new_tokens_limit;
  absl::StatusOr<ConvertedRequest> converted = ConvertGenerateRequest(request, limits);
  if (!converted.ok()) {
    CountRefusal(converted.status());
    return converted;
  }
  engine::EngineRequest& engine_request = converted->request;
  if (engine_request.id.empty()) {
    engine_request.id = absl::StrCat("ps-", absl::Hex(id_salt_), "-", next_id_.fetch_add(1));
  }
  if (converted->time_limit != absl::InfiniteDuration()) {
    deadline = std::min(deadline, absl::Now() + converted->time_limit);
  }
  engine_request.deadline = deadline;
  return converted;
}

grpc::ServerUnaryReactor* GenerationService::Generate(grpc::CallbackServerContext* context,
                                                      const v1::GenerateRequest* request,
                                                      v1::GenerateResponse* response) {
  return UnaryCall::Start(this, context, request, response);
}

grpc::ServerWriteReactor<v1::GenerateStreamResponse>* GenerationService::GenerateStream(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  return StreamCall::Start(this, context, request);
}

grpc::ServerUnaryReactor* GenerationService::Tokenize(grpc::CallbackServerContext* context,
                                                      const v1::TokenizeRequest* request,
                                                      v1::TokenizeResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (absl::StatusOr<std::string> identity = Authenticate(*context); !identity.ok()) {
    reactor->Finish(ToGrpcStatus(identity.status()));
    return reactor;
  }
  if (const int64_t bytes = static_cast<int64_t>(request->text().size());
      bytes > options_.max_prompt_bytes) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                 absl::StrCat("text: must be at most ", options_.max_prompt_bytes,
                                              " bytes (--max_prompt_bytes), got ", bytes)));
    return reactor;
  }
  if (const int64_t bad = FirstInvalidUtf8Byte(request->text()); bad >= 0) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                 absl::StrCat("text: not valid UTF-8 at byte ", bad)));
    return reactor;
  }
  // The byte tokenizer: one id per byte, whatever the model (ByteTokenizer::Encode).
  for (const char c : request->text()) response->add_token_ids(static_cast<unsigned char>(c));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* GenerationService::GetModelInfo(
    grpc::CallbackServerContext* context, const v1::GetModelInfoRequest* /*request*/,
    v1::ModelInfo* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (absl::StatusOr<std::string> identity = Authenticate(*context); !identity.ok()) {
    reactor->Finish(ToGrpcStatus(identity.status()));
    return reactor;
  }
  engine::Scheduler* sched = scheduler();
  if (sched == nullptr) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is loading"));
    return reactor;
  }
  ModelInfoExtras extras;
  extras.name = options_.model_name;
  // The backend the model actually runs on (--device auto picks one at start).
  extras.device = std::string(sched->model().backend().name());
  extras.state_bytes_per_request = sched->model().layout().bytes_per_slot();
  extras.limits.vocab_size = sched->config().vocab_size;
  extras.limits.max_context = sched->model().max_context();
  extras.limits.max_prompt_tokens = std::min(options_.max_prompt_tokens, extras.limits.max_context);
  extras.limits.max_new_tokens_limit = options_.max_new_tokens_limit;
  extras.state_slots = sched->model().options().num_slots;
  extras.max_waiting = options_.max_waiting;
  extras.max_waiting_tokens = options_.max_waiting_tokens;
  *response = BuildModelInfo(sched->config(), extras);
  v1::StateReuse* reuse = response->mutable_state_reuse();
  reuse->set_model_fingerprint(
      absl::StrCat(absl::Hex(sched->identity().fingerprint, absl::kZeroPad16)));
  const engine::SchedulerOptions& so = sched->options();
  reuse->set_prefix_cache_bytes(static_cast<uint64_t>(so.prefix_cache.budget_bytes));
  reuse->set_prefix_cache_granularity(static_cast<uint32_t>(sched->prefix_cache_granularity()));
  reuse->set_session_budget_bytes(static_cast<uint64_t>(so.sessions.budget_bytes));
  reuse->set_session_bytes(static_cast<uint64_t>(sched->sessions().bytes_per_session()));
  reuse->set_session_ttl_seconds(absl::ToDoubleSeconds(so.sessions.ttl));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* GenerationService::Cancel(grpc::CallbackServerContext* context,
                                                    const v1::CancelRequest* request,
                                                    v1::CancelResponse* /*response*/) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::StatusOr<std::string> identity = Authenticate(*context);
  if (!identity.ok()) {
    reactor->Finish(ToGrpcStatus(identity.status()));
    return reactor;
  }
  engine::Scheduler* sched = scheduler();
  if (request->request_id().empty()) {
    reactor->Finish(
        grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "request_id: must not be empty"));
  } else if (sched == nullptr) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is loading"));
  } else {
    // Only the caller's own requests: another identity's id is NOT_FOUND, as if it did not exist.
    const absl::Status cancelled = sched->Cancel(EngineRequestId(*identity, request->request_id()));
    if (cancelled.code() == absl::StatusCode::kNotFound) {
      reactor->Finish(grpc::Status(
          grpc::StatusCode::NOT_FOUND,
          absl::StrCat("no unfinished request has id \"", request->request_id(), "\"")));
    } else {
      reactor->Finish(ToGrpcStatus(cancelled));
    }
  }
  return reactor;
}

namespace {

// Runs `body` on the scheduler of a session call for its authenticated caller (the sessions'
// owner), or answers UNAUTHENTICATED without valid credentials, UNAVAILABLE while loading.
template <typename Body>
grpc::ServerUnaryReactor* SessionCall(GenerationService* service,
                                      grpc::CallbackServerContext* context, Body body) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::StatusOr<std::string> owner = service->Authenticate(*context);
  engine::Scheduler* sched = service->scheduler();
  if (!owner.ok()) {
    reactor->Finish(ToGrpcStatus(owner.status()));
  } else if (sched == nullptr) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is loading"));
  } else {
    reactor->Finish(ToGrpcStatus(body(*sched, *owner)));
  }
  return reactor;
}

absl::Status CheckSessionId(absl::string_view id) {
  if (id.empty()) return absl::InvalidArgumentError("session_id: must not be empty");
  return ValidateId("session_id", id);
}

}  // namespace

grpc::ServerUnaryReactor* GenerationService::OpenSession(grpc::CallbackServerContext* context,
                                                         const v1::OpenSessionRequest* /*request*/,
                                                         v1::OpenSessionResponse* response) {
  return SessionCall(this, context, [&](engine::Scheduler& sched, const std::string& owner) {
    absl::StatusOr<std::string> id = sched.OpenSession(owner);
    if (!id.ok()) return id.status();
    response->set_session_id(*id);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* GenerationService::CloseSession(grpc::CallbackServerContext* context,
                                                          const v1::CloseSessionRequest* request,
                                                          v1::CloseSessionResponse* /*response*/) {
  return SessionCall(this, context, [&](engine::Scheduler& sched, const std::string& owner) {
    absl::Status valid = CheckSessionId(request->session_id());
    if (!valid.ok()) return valid;
    return sched.CloseSession(request->session_id(), owner);
  });
}

grpc::ServerUnaryReactor* GenerationService::ExportState(grpc::CallbackServerContext* context,
                                                         const v1::ExportStateRequest* request,
                                                         v1::ExportStateResponse* response) {
  return SessionCall(this, context, [&](engine::Scheduler& sched, const std::string& owner) {
    absl::Status valid = CheckSessionId(request->session_id());
    if (!valid.ok()) return valid;
    absl::StatusOr<engine::Scheduler::SessionState> exported =
        sched.ExportSession(request->session_id(), owner);
    if (!exported.ok()) return exported.status();
    response->set_tokens(static_cast<uint64_t>(exported->tokens));
    response->set_state(std::move(exported->bytes));
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* GenerationService::ImportState(grpc::CallbackServerContext* context,
                                                         const v1::ImportStateRequest* request,
                                                         v1::ImportStateResponse* response) {
  return SessionCall(this, context, [&](engine::Scheduler& sched, const std::string& owner) {
    absl::StatusOr<engine::Scheduler::SessionState> imported =
        sched.ImportSession(request->state(), owner);
    if (!imported.ok()) return imported.status();
    response->set_session_id(imported->id);
    response->set_tokens(static_cast<uint64_t>(imported->tokens));
    return absl::OkStatus();
  });
}

}  // namespace ps::service
