// The service's calls. Each Generate / GenerateStream call is one reactor object kept alive by
// two owners: itself until gRPC says OnDone, and the RequestObserver the scheduler holds until
// the request ends, so neither gRPC nor the engine thread can see it destroyed under them.
// Calls end only through the engine's OnFinish once submitted (the scheduler guarantees exactly
// one), so a cancelled call still reports its final state and frees its slot first.
#include "server/service/generation_service.h"

#include <chrono>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <utility>

#include <absl/strings/str_cat.h>
#include <absl/time/clock.h>

#include "server/engine/tokenizer.h"

namespace ps::service {
namespace {

namespace v1 = ::polysketch::v1;

// A cancel this close to the request's deadline is taken as the deadline (CancelEngineRequest):
// above the delay between a client's deadline and the server's copy of it, which grows with the
// load (the soak saw a quarter of the expired requests misread with a 100 ms window). A client
// that cancels by itself this close to its deadline is counted as a deadline: the lesser error.
constexpr absl::Duration kDeadlineCancelWindow = absl::Seconds(1);

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

 private:
  std::shared_ptr<Call> call_;
};

// What both call kinds share: submission, cancellation and per-token metrics.
class CallBase {
 protected:
  CallBase(GenerationService* service, grpc::CallbackServerContext* context)
      : service_(service), context_(context) {}

  // Validates and submits; on error returns the status to finish the call with.
  template <typename Call>
  std::optional<grpc::Status> Submit(const v1::GenerateRequest& proto, std::shared_ptr<Call> self) {
    absl::StatusOr<ConvertedRequest> converted = service_->Prepare(context_, proto);
    if (!converted.ok()) return ToGrpcStatus(converted.status());
    id_ = converted->request.id;
    deadline_ = converted->request.deadline;
    converted->request.observer = std::make_shared<CallObserver<Call>>(std::move(self));
    absl::Status status = service_->scheduler()->Submit(std::move(converted->request));
    if (!status.ok()) {
      service_->CountRefusal(status);
      return ToGrpcStatus(status);
    }
    submitted_.store(true);
    return std::nullopt;
  }

  // gRPC cancelled the call (client cancel, disconnect, or its deadline): end the engine
  // request. Near or past the deadline, as a deadline: a client whose own deadline fired cancels
  // the stream (RST_STREAM) a little before the server's copy of that deadline, which starts only
  // when the headers arrive, and that must count as a deadline, not as a client cancel (found by
  // the fault test's deadline storm: a quarter of the expired requests were counted cancelled).
  void CancelEngineRequest() {
    if (!submitted_.load()) return;
    const engine::FinishReason reason = absl::Now() >= deadline_ - kDeadlineCancelWindow
                                            ? engine::FinishReason::kDeadline
                                            : engine::FinishReason::kCancelled;
    engine::Scheduler* scheduler = service_->scheduler();
    // NotFound: it has already ended.
    if (scheduler != nullptr) scheduler->Cancel(id_, reason).IgnoreError();
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

  GenerationService* const service_;
  grpc::CallbackServerContext* const context_;
  std::string id_;
  absl::Time deadline_ = absl::InfiniteFuture();
  std::atomic<bool> submitted_{false};
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
    if (std::optional<grpc::Status> error = call->Submit(*request, call)) call->Finish(*error);
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
  }

  void OnEngineFinish(engine::FinalResult result) {
    RecordFinish(result);
    {
      std::lock_guard<std::mutex> lock(mu_);
      response_->set_request_id(id_);
      FillFinalInfo(result, response_->mutable_final());
    }
    Finish(FinalStatus(result));
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
    if (client_gone_) return;
    v1::GenerateStreamResponse* message = MessageToAppend();
    message->mutable_text()->append(delta.text);
    AppendTokens(delta.tokens, message->mutable_tokens());
    Pump(lock);
  }

  void OnEngineFinish(engine::FinalResult result) {
    RecordFinish(result);
    std::unique_lock<std::mutex> lock(mu_);
    if (!client_gone_) FillFinalInfo(result, MessageToAppend()->mutable_final());
    final_status_ = FinalStatus(result);
    Pump(lock);
  }

  void OnWriteDone(bool ok) override {
    std::unique_lock<std::mutex> lock(mu_);
    writing_ = false;
    pending_.pop_front();
    if (!ok) {
      client_gone_ = true;
      pending_.clear();
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
  // The message new output goes into: the last queued one unless it is being written or the
  // queue has room for a new one. Called with mu_ held.
  v1::GenerateStreamResponse* MessageToAppend() {
    const bool back_in_flight = writing_ && pending_.size() == 1;
    if (pending_.empty() || back_in_flight || pending_.size() < kMaxPendingStreamMessages) {
      pending_.emplace_back().set_request_id(id_);
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
      const v1::GenerateStreamResponse* message = &pending_.front();  // stable: deque front
      lock.unlock();
      StartWrite(message);
      return;
    }
    if (final_status_.has_value()) {
      finished_ = true;
      const grpc::Status status = *final_status_;
      lock.unlock();
      Finish(status);
    }
  }

  std::mutex mu_;
  std::deque<v1::GenerateStreamResponse> pending_;  // front is in flight when writing_
  bool writing_ = false;
  bool client_gone_ = false;
  bool finished_ = false;
  std::optional<grpc::Status> final_status_;
  std::shared_ptr<StreamCall> self_;
};

}  // namespace

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
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kAlreadyExists:
      metrics_->RequestRefused(metrics::FailureReason::kValidation);
      break;
    default:
      metrics_->RequestRefused(metrics::FailureReason::kInternal);
      break;
  }
}

absl::StatusOr<ConvertedRequest> GenerationService::Prepare(grpc::CallbackServerContext* context,
                                                            const v1::GenerateRequest& request) {
  engine::Scheduler* sched = scheduler();
  if (sched == nullptr) {
    absl::Status status = absl::UnavailableError("the model is loading");
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
  absl::Time deadline = absl::InfiniteFuture();
  if (context->deadline() != std::chrono::system_clock::time_point::max()) {
    deadline = absl::FromChrono(context->deadline());
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
  engine::Scheduler* sched = scheduler();
  if (sched == nullptr) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is loading"));
    return reactor;
  }
  ModelInfoExtras extras;
  extras.name = options_.model_name;
  extras.device = options_.device;
  extras.state_bytes_per_request = sched->model().layout().bytes_per_slot();
  extras.limits.vocab_size = sched->config().vocab_size;
  extras.limits.max_context = sched->model().max_context();
  extras.limits.max_prompt_tokens = std::min(options_.max_prompt_tokens, extras.limits.max_context);
  extras.limits.max_new_tokens_limit = options_.max_new_tokens_limit;
  extras.state_slots = sched->model().options().num_slots;
  extras.max_waiting = options_.max_waiting;
  extras.max_waiting_tokens = options_.max_waiting_tokens;
  *response = BuildModelInfo(sched->config(), extras);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* GenerationService::Cancel(grpc::CallbackServerContext* context,
                                                    const v1::CancelRequest* request,
                                                    v1::CancelResponse* /*response*/) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  engine::Scheduler* sched = scheduler();
  if (request->request_id().empty()) {
    reactor->Finish(
        grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "request_id: must not be empty"));
  } else if (sched == nullptr) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is loading"));
  } else {
    reactor->Finish(ToGrpcStatus(sched->Cancel(request->request_id())));
  }
  return reactor;
}

}  // namespace ps::service
