// One HTTP/1.1 connection: reads a request, routes it, answers, and reads the next one
// (keep-alive). A generation request is submitted to the scheduler with a RequestObserver (the
// Bridge) that queues the engine's events and posts the connection's strand; the connection turns
// them into bytes (ResponseBuilder) and writes them, one write at a time. While a request runs the
// connection keeps a read open on the socket, so a client that goes away is seen at once and its
// engine request cancelled. Everything of a connection runs on its strand.
#include "server/http/http_connection.h"

#include <array>
#include <chrono>
#include <cstdio>
#include <deque>
#include <optional>
#include <string>
#include <type_traits>

#include <absl/strings/match.h>
#include <absl/strings/str_cat.h>
#include <absl/time/clock.h>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/stream_traits.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl/ssl_stream.hpp>

#include "server/http/endpoints.h"
#include "server/http/openai_request.h"
#include "server/http/openai_response.h"

namespace ps::http {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
namespace ssl = boost::asio::ssl;
using tcp = boost::asio::ip::tcp;
using boost::system::error_code;

// Request headers (all of them together) a client may send.
constexpr uint32_t kMaxHeaderBytes = 16 << 10;
// A stream whose unsent output passes this holds back its request's prompt log-probabilities (as
// the gRPC streams do with kBackloggedMessages), for at most kMaxBacklogWait.
constexpr int64_t kBackloggedBytes = int64_t{1} << 20;
constexpr absl::Duration kMaxBacklogWait = absl::Seconds(30);
// After an error answer that closes the connection, unread request bytes are drained for this
// long, so that closing does not reset the connection before the client has read the answer.
constexpr std::chrono::seconds kLingerTime{2};

// The engine's events for one request, from the engine thread to the connection's strand.
// Accounting that must happen whatever became of the connection (metrics, the prompt-bytes
// budget) is done here, on the engine thread, as the gRPC calls do.
class Bridge final : public engine::RequestObserver {
 public:
  // Holds no pointer to the server (it may be gone before the last event): the service, which
  // outlives the scheduler, and the server's lifeline.
  Bridge(service::GenerationService* service, std::shared_ptr<Lifeline> lifeline,
         std::weak_ptr<ConnectionBase> connection, int64_t prompt_bytes)
      : service_(service),
        lifeline_(std::move(lifeline)),
        connection_(std::move(connection)),
        prompt_bytes_(prompt_bytes) {}

  void OnDelta(engine::StreamDelta delta) override {
    RecordTokens(static_cast<int64_t>(delta.tokens.size()));
    {
      std::lock_guard<std::mutex> lock(mu_);
      deltas_.push_back(std::move(delta));
    }
    Wake();
  }

  void OnFinish(engine::FinalResult result) override {
    if (metrics::ServerMetrics* m = service_->metrics(); m != nullptr) {
      m->RequestFinished(result);
    }
    ReleasePromptBytes();
    {
      std::lock_guard<std::mutex> lock(mu_);
      final_ = std::move(result);
    }
    Wake();
  }

  // See kBackloggedBytes.
  bool Backlogged() override {
    if (unsent_bytes.load(std::memory_order_relaxed) < kBackloggedBytes) {
      backlogged_since_ = absl::InfiniteFuture();
      return false;
    }
    const absl::Time now = absl::Now();
    if (backlogged_since_ == absl::InfiniteFuture()) backlogged_since_ = now;
    return now - backlogged_since_ < kMaxBacklogWait;
  }

  // Everything queued since the last call (connection strand).
  void Take(std::deque<engine::StreamDelta>* deltas, std::optional<engine::FinalResult>* final) {
    std::lock_guard<std::mutex> lock(mu_);
    wake_pending_ = false;
    for (engine::StreamDelta& d : deltas_) deltas->push_back(std::move(d));
    deltas_.clear();
    if (final_.has_value()) *final = std::move(final_);
    final_.reset();
  }

  // Gives the prompt's bytes back to the in-flight budget (once): when the request finishes, or
  // when it was never submitted.
  void ReleasePromptBytes() {
    const int64_t bytes = prompt_bytes_.exchange(0);
    if (bytes > 0) service_->ReleasePromptBytes(bytes);
  }

  // Output of this request not yet written to the client (set by the connection).
  std::atomic<int64_t> unsent_bytes{0};

 private:
  void Wake() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (wake_pending_) return;
      wake_pending_ = true;
    }
    WakeConnection(*lifeline_, connection_);
  }

  // Inter-token latency between deltas (engine thread only).
  void RecordTokens(int64_t num_tokens) {
    if (num_tokens == 0) return;
    const absl::Time now = absl::Now();
    metrics::ServerMetrics* m = service_->metrics();
    if (m != nullptr && last_tokens_ != absl::InfinitePast()) {
      m->InterTokenLatency(now - last_tokens_, num_tokens);
    }
    last_tokens_ = now;
  }

  service::GenerationService* const service_;
  const std::shared_ptr<Lifeline> lifeline_;
  const std::weak_ptr<ConnectionBase> connection_;
  std::atomic<int64_t> prompt_bytes_;
  absl::Time last_tokens_ = absl::InfinitePast();         // engine thread
  absl::Time backlogged_since_ = absl::InfiniteFuture();  // engine thread
  std::mutex mu_;
  std::deque<engine::StreamDelta> deltas_;
  std::optional<engine::FinalResult> final_;
  bool wake_pending_ = false;
};

// The route of a request, for polysketch_api_requests_total{endpoint} (a fixed set).
enum class Route {
  kCompletions,
  kChatCompletions,
  kModels,
  kHealth,
  kTokenize,
  kDetokenize,
  kSessions,
  kUnknown,
};

const char* RouteName(Route route) {
  switch (route) {
    case Route::kCompletions:
      return "completions";
    case Route::kChatCompletions:
      return "chat_completions";
    case Route::kModels:
      return "models";
    case Route::kHealth:
      return "health";
    case Route::kTokenize:
      return "tokenize";
    case Route::kDetokenize:
      return "detokenize";
    case Route::kSessions:
      return "sessions";
    case Route::kUnknown:
      break;
  }
  return "unknown";
}

constexpr char kSessionsPath[] = "/v1/sessions";

// The route of a request target (its path; a query string is ignored).
Route RouteOf(std::string_view target) {
  if (const size_t query = target.find('?'); query != std::string_view::npos) {
    target = target.substr(0, query);
  }
  if (target == "/health") return Route::kHealth;
  if (target == "/v1/completions") return Route::kCompletions;
  if (target == "/v1/chat/completions") return Route::kChatCompletions;
  if (target == "/v1/models") return Route::kModels;
  if (target == "/tokenize") return Route::kTokenize;
  if (target == "/detokenize") return Route::kDetokenize;
  if (target == kSessionsPath || target.starts_with(std::string(kSessionsPath) + "/")) {
    return Route::kSessions;
  }
  return Route::kUnknown;
}

// Debian's Abseil has its own string_view (not std's, which Beast uses).
absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

template <typename Stream>
class Connection final : public ConnectionBase {
 public:
  Connection(HttpServer::Core* core, Stream stream)
      : core_(core),
        stream_(std::move(stream)),
        timer_(stream_.get_executor()),
        linger_timer_(stream_.get_executor()) {
    core_->open_connections.fetch_add(1);
  }

  ~Connection() override {
    CancelEngineRequest();
    if (bridge_ != nullptr) bridge_->unsent_bytes.store(0);
    if (in_request_) core_->active_requests.fetch_sub(1);
    core_->open_connections.fetch_sub(1);
  }

  void Start() override {
    if constexpr (kTls) {
      Arm(core_->options.idle_timeout);
      stream_.async_handshake(ssl::stream_base::server, [self = Self()](const error_code& ec) {
        self->Disarm();
        if (ec) return self->CloseNow();
        self->ReadRequest();
      });
    } else {
      ReadRequest();
    }
  }

  void Close() override {
    net::post(stream_.get_executor(), [self = Self()] { self->CloseNow(); });
  }

  net::any_io_executor executor() override { return stream_.get_executor(); }

  void OnEngineEvents() override {
    if (bridge_ == nullptr) return;
    std::deque<engine::StreamDelta> deltas;
    std::optional<engine::FinalResult> final;
    bridge_->Take(&deltas, &final);
    if (closed_) return;
    if (streaming_) {
      for (const engine::StreamDelta& delta : deltas) out_ += builder_->StreamDelta(delta);
      if (final.has_value()) {
        out_ += builder_->StreamEnd(*final);
        engine_done_ = true;
      }
      if (OverflowCheck()) return;
      WriteMore();
      return;
    }
    for (const engine::StreamDelta& delta : deltas) builder_->Add(delta);
    if (!final.has_value()) return;
    engine_done_ = true;
    absl::StatusOr<std::string> body = builder_->Body(*final);
    if (body.ok()) {
      Respond(200, *std::move(body));
    } else {
      RespondError(ErrorResponse(body.status()));
    }
  }

 private:
  static constexpr bool kTls = !std::is_same_v<Stream, tcp::socket>;

  std::shared_ptr<Connection> Self() {
    return std::static_pointer_cast<Connection>(shared_from_this());
  }
  tcp::socket& socket() { return beast::get_lowest_layer(stream_); }

  // --- Timeouts: one timer for the phase at hand; a newer Arm makes an older expiry harmless.
  void Arm(absl::Duration timeout) {
    const uint64_t generation = ++timer_generation_;
    timer_.expires_after(absl::ToChronoNanoseconds(timeout));
    timer_.async_wait([self = Self(), generation](const error_code& ec) {
      if (ec || generation != self->timer_generation_) return;
      self->CloseNow();  // the pending operation fails and ends the connection
    });
  }
  void Disarm() {
    ++timer_generation_;
    timer_.cancel();
  }

  // --- Reading a request.
  void ReadRequest() {
    if (closed_) return;
    parser_.emplace();
    parser_->header_limit(kMaxHeaderBytes);
    parser_->body_limit(static_cast<uint64_t>(core_->options.max_body_bytes));
    Arm(core_->options.idle_timeout);
    bhttp::async_read_header(stream_, buffer_, *parser_,
                             [self = Self()](const error_code& ec, size_t) { self->OnHeader(ec); });
  }

  void OnHeader(const error_code& ec) {
    if (ec) return OnReadError(ec);
    // curl and others wait for "100 Continue" before sending a large body.
    const auto expect = parser_->get().find(bhttp::field::expect);
    if (expect != parser_->get().end() &&
        absl::EqualsIgnoreCase(Sv(expect->value()), "100-continue")) {
      auto reply =
          std::make_shared<bhttp::response<bhttp::empty_body>>(bhttp::status::continue_, 11);
      bhttp::async_write(stream_, *reply, [self = Self(), reply](const error_code& wec, size_t) {
        if (wec) return self->CloseNow();
        self->ReadBody();
      });
      return;
    }
    ReadBody();
  }

  void ReadBody() {
    bhttp::async_read(stream_, buffer_, *parser_, [self = Self()](const error_code& ec, size_t) {
      if (ec) return self->OnReadError(ec);
      self->Disarm();
      self->Handle(self->parser_->release());
    });
  }

  void OnReadError(const error_code& ec) {
    Disarm();
    keep_alive_ = false;
    // The route, for the metrics, when the headers were read.
    route_ = parser_.has_value() ? RouteOf(parser_->get().target()) : Route::kUnknown;
    if (ec == bhttp::error::body_limit) {
      return RespondError(ErrorResponse(
          413, "invalid_request_error",
          absl::StrCat("request body: must be at most ", core_->options.max_body_bytes,
                       " bytes (--max_receive_message_bytes)"),
          "", "request_too_large"));
    }
    if (ec == bhttp::error::header_limit) {
      return RespondError(ErrorResponse(
          431, "invalid_request_error",
          absl::StrCat("request headers: must be at most ", kMaxHeaderBytes, " bytes")));
    }
    // The client closed (between requests: the normal end of a connection) or the read timed
    // out (CloseNow already ran).
    if (ec == bhttp::error::end_of_stream || ec == net::error::eof ||
        ec == net::error::operation_aborted || ec == net::error::connection_reset || closed_ ||
        ec.category() == net::error::get_ssl_category() || ec == ssl::error::stream_truncated) {
      return CloseNow();
    }
    RespondError(ErrorResponse(400, "invalid_request_error",
                               absl::StrCat("malformed HTTP request: ", ec.message())));
  }

  // --- Routing.
  void Handle(bhttp::request<bhttp::string_body> request) {
    request_ = std::move(request);
    keep_alive_ = request_.keep_alive();
    std::string_view target = request_.target();
    if (const size_t query = target.find('?'); query != std::string_view::npos) {
      target = target.substr(0, query);
    }
    route_ = RouteOf(target);
    if (route_ == Route::kUnknown) {
      return RespondError(ErrorResponse(404, "not_found_error",
                                        absl::StrCat("no such endpoint: ", std::string(target))));
    }
    const bool session_path = route_ == Route::kSessions && target != kSessionsPath;
    allowed_ = route_ == Route::kHealth || route_ == Route::kModels ? bhttp::verb::get
               : session_path                                       ? bhttp::verb::delete_
                                                                    : bhttp::verb::post;
    if (request_.method() != allowed_) {
      return RespondError(
          ErrorResponse(405, "invalid_request_error",
                        absl::StrCat("method ", std::string(request_.method_string()),
                                     " is not allowed on ", std::string(target), " (use ",
                                     std::string(bhttp::to_string(allowed_)), ")")));
    }
    EndpointContext context;
    context.service = core_->service;
    context.model_name = core_->options.model_name;
    context.created_unix_seconds = core_->created_unix_seconds;
    context.chat_template = &core_->options.chat_template;
    if (route_ == Route::kHealth) return Answer(ps::http::Health(context));  // no token needed
    if (route_ == Route::kCompletions) return Generate(ApiKind::kCompletion);
    if (route_ == Route::kChatCompletions) return Generate(ApiKind::kChat);
    std::optional<std::string> identity = Authenticate();
    if (!identity) return;
    switch (route_) {
      case Route::kModels:
        return Answer(ps::http::Models(context));
      case Route::kTokenize:
        return Answer(ps::http::Tokenize(context, Sv(request_.body())));
      case Route::kDetokenize:
        return Answer(ps::http::Detokenize(context, Sv(request_.body())));
      case Route::kSessions:
        if (!session_path) return Answer(ps::http::OpenSession(context, *identity));
        return Answer(
            ps::http::CloseSession(context, *identity, Sv(target.substr(sizeof(kSessionsPath)))));
      case Route::kHealth:
      case Route::kCompletions:
      case Route::kChatCompletions:
      case Route::kUnknown:
        break;
    }
  }

  // The caller's identity, or an answer (401) and nullopt.
  std::optional<std::string> Authenticate() {
    std::optional<absl::string_view> value;
    if (const auto it = request_.find(bhttp::field::authorization); it != request_.end()) {
      value = absl::string_view(it->value().data(), it->value().size());
    }
    absl::StatusOr<std::string> identity = core_->service->AuthenticateHeader(value);
    if (!identity.ok()) {
      RespondError(ErrorResponse(identity.status()));
      return std::nullopt;
    }
    return *std::move(identity);
  }

  // A model named in the body must be the served one (404 model_not_found otherwise).
  bool CheckModel(const std::string& model) {
    if (model.empty() || model == core_->options.model_name) return true;
    RespondError(ErrorResponse(
        404, "invalid_request_error",
        absl::StrCat("model: the model \"", model, "\" does not exist; this server serves \"",
                     core_->options.model_name, "\""),
        "model", "model_not_found"));
    return false;
  }

  void Answer(ps::http::Answer answer) { Respond(answer.status, std::move(answer.body)); }

  // --- Generation: one request path into the scheduler, shared with gRPC.
  void Generate(ApiKind kind) {
    std::optional<std::string> identity = Authenticate();
    if (!identity) return;
    service::GenerationService* service = core_->service;
    absl::StatusOr<ApiRequest> api =
        ParseApiRequest(request_.body(), kind, core_->options.chat_template);
    if (!api.ok()) {
      service->CountRefusal(api.status());
      return RespondError(ErrorResponse(api.status()));
    }
    if (!CheckModel(api->model)) return;
    absl::StatusOr<service::ConvertedRequest> converted =
        service->Prepare(api->proto, absl::InfiniteFuture());
    if (!converted.ok())
      return RespondError(ErrorResponse(RenameProtoField(converted.status(), kind)));
    const int64_t prompt_bytes = service::PromptBytes(api->proto);
    if (absl::Status reserved = service->ReservePromptBytes(prompt_bytes); !reserved.ok()) {
      return RespondError(ErrorResponse(reserved));
    }
    engine::EngineRequest& request = converted->request;
    ResponseInfo info;
    info.kind = kind;
    info.id = absl::StrCat(kind == ApiKind::kChat ? "chatcmpl-" : "cmpl-", request.id);
    info.created = absl::ToUnixSeconds(absl::Now());
    info.model = core_->options.model_name;
    info.include_usage = api->include_usage;
    info.echo = api->echo;
    info.logprobs = api->logprobs;
    if (api->echo) info.prompt = request.prompt;
    response_id_ = info.id;
    engine_id_ = service::EngineRequestId(*identity, request.id);
    request.id = engine_id_;
    request.owner = *identity;
    bridge_ = std::make_shared<Bridge>(service, core_->lifeline, weak_from_this(), prompt_bytes);
    request.observer = bridge_;
    engine::Scheduler* scheduler = service->scheduler();
    absl::Status submitted = scheduler == nullptr ? absl::UnavailableError("the model is loading")
                                                  : scheduler->Submit(std::move(request));
    if (!submitted.ok()) {
      bridge_->ReleasePromptBytes();
      bridge_.reset();
      engine_id_.clear();
      service->CountRefusal(submitted);
      return RespondError(ErrorResponse(submitted));
    }
    in_request_ = true;
    // Alive until the answer is written or the connection closes, even with no I/O pending (the
    // engine's events only hold a weak reference).
    self_ = shared_from_this();
    core_->active_requests.fetch_add(1);
    engine_done_ = false;
    builder_.emplace(std::move(info));
    streaming_ = api->stream;
    WatchClient();
    if (streaming_) StartStream();
  }

  // Keeps a read open while a request runs: its failure means the client went away (cancel the
  // request now); bytes that arrive are a pipelined next request, kept in buffer_.
  void WatchClient() {
    // Bytes already buffered are a pipelined request: its client is there, and a read now would
    // wait for bytes it will not send before it has its answers.
    if (watching_ || closed_ || buffer_.size() > 0) return;
    watching_ = true;
    stream_.async_read_some(buffer_.prepare(4096), [self = Self()](const error_code& ec, size_t n) {
      self->watching_ = false;
      self->buffer_.commit(n);
      if (ec) return self->CloseNow();
      if (self->in_request_) return self->WatchClient();
      // The response is complete and the next request has started to arrive.
      if (self->waiting_for_next_) {
        self->waiting_for_next_ = false;
        self->ReadRequest();
      }
    });
  }

  void StartStream() {
    stream_head_.emplace(bhttp::status::ok, 11);
    stream_head_->set(bhttp::field::server, "polysketch");
    stream_head_->set(bhttp::field::content_type, "text/event-stream");
    stream_head_->set(bhttp::field::cache_control, "no-cache");
    stream_head_->set("X-Request-Id", response_id_);
    stream_head_->keep_alive(keep_alive_);
    stream_head_->chunked(true);
    stream_serializer_.emplace(*stream_head_);
    CountApi(200);
    // First in the body (engine events that come during the header write queue behind it).
    out_ = builder_->StreamStart();
    writing_ = true;
    Arm(core_->options.write_timeout);
    bhttp::async_write_header(stream_, *stream_serializer_,
                              [self = Self()](const error_code& ec, size_t) {
                                self->writing_ = false;
                                if (ec) return self->CloseNow();
                                self->Disarm();
                                self->WriteMore();
                              });
  }

  // Client not reading: its unsent output passed --max_stream_buffer_bytes. Returns true when
  // the connection was closed for it.
  bool OverflowCheck() {
    const int64_t unsent = static_cast<int64_t>(out_.size() + in_flight_.size());
    bridge_->unsent_bytes.store(unsent, std::memory_order_relaxed);
    if (unsent <= core_->service->options().max_stream_buffer_bytes) return false;
    if (metrics::ServerMetrics* m = core_->service->metrics(); m != nullptr) {
      m->StreamBufferOverflow();
    }
    CloseNow();
    return true;
  }

  // Writes what is queued as one chunk; after the engine's last event, the last chunk.
  void WriteMore() {
    if (writing_ || closed_) return;
    if (out_.empty()) {
      if (!engine_done_) return;
      writing_ = true;
      Arm(core_->options.write_timeout);
      net::async_write(stream_, bhttp::make_chunk_last(),
                       [self = Self()](const error_code& ec, size_t) {
                         self->writing_ = false;
                         if (ec) return self->CloseNow();
                         self->Disarm();
                         self->EndRequest();
                       });
      return;
    }
    in_flight_ = std::move(out_);
    out_.clear();
    writing_ = true;
    Arm(core_->options.write_timeout);
    net::async_write(stream_, bhttp::make_chunk(net::buffer(in_flight_)),
                     [self = Self()](const error_code& ec, size_t) {
                       self->writing_ = false;
                       self->in_flight_.clear();
                       if (ec) return self->CloseNow();
                       self->Disarm();
                       if (self->bridge_ != nullptr) {
                         self->bridge_->unsent_bytes.store(static_cast<int64_t>(self->out_.size()),
                                                           std::memory_order_relaxed);
                       }
                       self->WriteMore();
                     });
  }

  // --- Answers.
  void CountApi(int status) {
    if (metrics::ServerMetrics* m = core_->service->metrics(); m != nullptr) {
      m->ApiRequest("http", RouteName(route_), absl::StrCat(status));
    }
  }

  void RespondError(const HttpError& error) { Respond(error.status, error.body); }

  void Respond(int status, std::string body) {
    if (closed_) return;
    CountApi(status);
    auto response = std::make_shared<bhttp::response<bhttp::string_body>>(
        static_cast<bhttp::status>(status), 11);
    response->set(bhttp::field::server, "polysketch");
    response->set(bhttp::field::content_type, "application/json");
    if (!response_id_.empty()) response->set("X-Request-Id", response_id_);
    if (status == 405) {
      response->set(bhttp::field::allow, bhttp::to_string(allowed_));
    }
    response->keep_alive(keep_alive_);
    response->body() = std::move(body);
    response->prepare_payload();
    writing_ = true;
    Arm(core_->options.write_timeout);
    bhttp::async_write(stream_, *response, [self = Self(), response](const error_code& ec, size_t) {
      self->writing_ = false;
      if (ec) return self->CloseNow();
      self->Disarm();
      self->EndRequest();
    });
  }

  // The answer is written: the next request, or the end of the connection.
  void EndRequest() {
    if (in_request_) {
      in_request_ = false;
      core_->active_requests.fetch_sub(1);
    }
    // The handler running this holds the connection; the reads and timers started below do next.
    self_.reset();
    bridge_.reset();
    builder_.reset();
    stream_serializer_.reset();
    stream_head_.reset();
    engine_id_.clear();
    response_id_.clear();
    streaming_ = false;
    if (!keep_alive_) return Linger();
    if (watching_) {
      // The read that watched the client goes on as the start of the next request.
      waiting_for_next_ = true;
      Arm(core_->options.idle_timeout);
      return;
    }
    ReadRequest();
  }

  // Closes after an answer that ends the connection: shut our side, drain what the client still
  // sends for a moment, then close, so the client reads the answer before the connection ends.
  void Linger() {
    if (closed_) return;
    error_code ignored;
    if constexpr (!kTls) {
      socket().shutdown(tcp::socket::shutdown_send, ignored);
      linger_timer_.expires_after(kLingerTime);
      linger_timer_.async_wait([self = Self()](const error_code&) { self->CloseNow(); });
      Drain();
    } else {
      CloseNow();  // no half-close in TLS
    }
  }

  void Drain() {
    if (closed_ || watching_) return;
    watching_ = true;
    auto scratch = std::make_shared<std::array<char, 4096>>();
    socket().async_read_some(net::buffer(*scratch),
                             [self = Self(), scratch](const error_code& ec, size_t) {
                               self->watching_ = false;
                               if (ec) return self->CloseNow();
                               self->Drain();
                             });
  }

  void CancelEngineRequest() {
    if (engine_id_.empty() || engine_done_) return;
    if (engine::Scheduler* scheduler = core_->service->scheduler(); scheduler != nullptr) {
      scheduler->Cancel(engine_id_).IgnoreError();  // NotFound: it has just finished
    }
    engine_done_ = true;
  }

  // Ends the connection now: the client is gone, a timeout passed, or the server shuts down.
  void CloseNow() {
    if (closed_) return;
    closed_ = true;
    CancelEngineRequest();
    Disarm();
    linger_timer_.cancel();
    error_code ignored;
    socket().close(ignored);
    // Pending handlers (they fail now) hold the connection until they have run.
    self_.reset();
  }

  HttpServer::Core* const core_;
  Stream stream_;
  net::steady_timer timer_;
  net::steady_timer linger_timer_;
  uint64_t timer_generation_ = 0;
  beast::flat_buffer buffer_;
  std::optional<bhttp::request_parser<bhttp::string_body>> parser_;
  bhttp::request<bhttp::string_body> request_;
  Route route_ = Route::kUnknown;
  bhttp::verb allowed_ = bhttp::verb::post;  // the method of route_ (405's Allow)
  bool keep_alive_ = true;
  bool closed_ = false;
  bool writing_ = false;
  bool watching_ = false;          // a read is open on the socket (WatchClient or Drain)
  bool waiting_for_next_ = false;  // that read is the start of the next request
  // The request in progress.
  bool in_request_ = false;
  bool streaming_ = false;
  bool engine_done_ = true;  // its engine request has finished (or was never submitted)
  std::string engine_id_;
  std::string response_id_;
  std::shared_ptr<Bridge> bridge_;
  std::shared_ptr<ConnectionBase> self_;  // set while a request is in progress
  std::optional<ResponseBuilder> builder_;
  std::optional<bhttp::response<bhttp::empty_body>> stream_head_;
  std::optional<bhttp::response_serializer<bhttp::empty_body>> stream_serializer_;
  std::string out_;        // stream output not yet written
  std::string in_flight_;  // stream output being written
};

}  // namespace

void WakeConnection(Lifeline& lifeline, const std::weak_ptr<ConnectionBase>& connection) {
  std::lock_guard<std::mutex> lock(lifeline.mu);
  if (!lifeline.alive) return;
  std::shared_ptr<ConnectionBase> target = connection.lock();
  if (target == nullptr) return;
  net::any_io_executor executor = target->executor();
  net::post(executor, [target = std::move(target)] { target->OnEngineEvents(); });
}

void HttpServer::Core::Register(const std::shared_ptr<ConnectionBase>& connection) {
  std::lock_guard<std::mutex> lock(mu);
  // Forget connections that have ended, now and then (amortised O(1) per connection).
  if (connections.size() >= 64 && connections.size() % 64 == 0) {
    std::erase_if(connections, [](const std::weak_ptr<ConnectionBase>& c) { return c.expired(); });
  }
  connections.push_back(connection);
}

std::shared_ptr<ConnectionBase> MakeConnection(HttpServer::Core* core, tcp::socket socket) {
  if (core->tls != nullptr) {
    return std::make_shared<Connection<beast::ssl_stream<tcp::socket>>>(
        core, beast::ssl_stream<tcp::socket>(std::move(socket), *core->tls));
  }
  return std::make_shared<Connection<tcp::socket>>(core, std::move(socket));
}

}  // namespace ps::http
