// The HTTP API in process: an HttpServer on 127.0.0.1:0 over a real Scheduler on a golden
// fixture model, spoken to with plain sockets (so the tests control every byte, a client that
// vanishes or stops reading included). Greedy output equals the golden continuation; streams
// equal whole responses; every refusal has its status and OpenAI's error shape; a vanished or
// stalled client frees its slot; tokens, sessions, draining, loading and the metrics label.
#include "server/http/http_server.h"

#include <arpa/inet.h>
#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <netinet/in.h>
#include <string>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>
#include <vector>

#include <absl/strings/match.h>
#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_split.h>
#include <absl/time/clock.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "kernels/cpu/cpu_backend.h"
#include "server/engine/model_io/tokenizer.h"
#include "server/engine/model_io/weights.h"
#include "server/service/auth.h"
#include "tests/testing/faulty_backend.h"
#include "tests/testing/golden.h"
#include "tests/testing/status_matchers.h"

namespace ps::http {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;

constexpr char kFixture[] = "polysketch-learned-local";
constexpr int kLong = 1 << 20;
constexpr char kToken[] = "alice-0123456789abcdef0123456789";

// Records the metrics the HTTP side reports.
class RecordingMetrics final : public metrics::ServerMetrics {
 public:
  int port() const override { return 0; }
  void RequestFinished(const engine::FinalResult& result) override {
    std::lock_guard<std::mutex> lock(mu);
    ++finished[std::string(engine::FinishReasonName(result.reason))];
  }
  void InterTokenLatency(absl::Duration, int64_t) override {}
  void RequestRefused(metrics::FailureReason reason) override {
    std::lock_guard<std::mutex> lock(mu);
    ++refused[std::string(metrics::FailureReasonName(reason))];
  }
  void EngineStep(const engine::StepStats&) override {}
  void SetScheduler(const engine::SchedulerStats&) override {}
  void SetAttentionMemory(absl::string_view, int64_t) override {}
  void AuthFailure() override { ++auth_failures; }
  void StreamBufferOverflow() override { ++stream_overflows; }
  void ApiRequest(absl::string_view api, absl::string_view endpoint,
                  absl::string_view code) override {
    std::lock_guard<std::mutex> lock(mu);
    ++api_requests[absl::StrCat(api, " ", endpoint, " ", code)];
  }
  int Count(const std::map<std::string, int>& m, const std::string& key) {
    std::lock_guard<std::mutex> lock(mu);
    auto it = m.find(key);
    return it == m.end() ? 0 : it->second;
  }
  std::mutex mu;
  std::map<std::string, int> finished, refused, api_requests;
  std::atomic<int> auth_failures{0};
  std::atomic<int> stream_overflows{0};
};

struct Reply {
  int status = 0;
  std::string head;  // status line and headers
  std::string body;  // de-chunked
};

// A blocking client socket with a receive timeout, so a broken server fails the test instead of
// hanging it.
class Client {
 public:
  explicit Client(int port, int receive_buffer = 0) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    if (receive_buffer > 0) {
      setsockopt(fd_, SOL_SOCKET, SO_RCVBUF, &receive_buffer, sizeof(receive_buffer));
    }
    timeval timeout{30, 0};
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<uint16_t>(port));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = connect(fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0;
  }
  ~Client() { Close(); }
  void Close() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }
  bool connected() const { return connected_; }

  bool Send(absl::string_view bytes) {
    while (!bytes.empty()) {
      const ssize_t n = send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
      if (n <= 0) return false;
      bytes.remove_prefix(static_cast<size_t>(n));
    }
    return true;
  }
  void SendRequest(const std::string& method, const std::string& path, const std::string& body,
                   const std::string& headers = "", bool keep_alive = false) {
    Send(absl::StrCat(method, " ", path, " HTTP/1.1\r\nHost: test\r\n", headers,
                      keep_alive ? "" : "Connection: close\r\n",
                      "Content-Type: application/json\r\nContent-Length: ", body.size(), "\r\n\r\n",
                      body));
  }
  // Reads until `marker` has arrived (or the connection ends); returns everything read so far.
  std::string ReadUntil(absl::string_view marker) {
    while (!absl::StrContains(data_, marker)) {
      char buffer[4096];
      const ssize_t n = recv(fd_, buffer, sizeof(buffer), 0);
      if (n <= 0) break;
      data_.append(buffer, static_cast<size_t>(n));
    }
    return data_;
  }
  // One whole response (Content-Length or chunked) from what has arrived and what follows.
  Reply ReadReply() {
    Reply reply;
    std::string all = ReadUntil("\r\n\r\n");
    const size_t head_end = all.find("\r\n\r\n");
    if (head_end == std::string::npos) return reply;
    reply.head = all.substr(0, head_end);
    std::vector<std::string> parts = absl::StrSplit(reply.head, ' ');
    if (parts.size() >= 2 && !absl::SimpleAtoi(parts[1], &reply.status)) reply.status = -1;
    size_t pos = head_end + 4;
    if (absl::StrContains(reply.head, "Transfer-Encoding: chunked")) {
      for (;;) {
        std::string more = ReadUntil("\r\n");
        size_t line_end = data_.find("\r\n", pos);
        while (line_end == std::string::npos) {
          const size_t before = data_.size();
          ReadMore();
          if (data_.size() == before) return reply;
          line_end = data_.find("\r\n", pos);
        }
        size_t size = 0;
        if (!absl::SimpleHexAtoi(data_.substr(pos, line_end - pos), &size)) return reply;
        pos = line_end + 2;
        while (data_.size() < pos + size + 2) {
          const size_t before = data_.size();
          ReadMore();
          if (data_.size() == before) return reply;
        }
        reply.body += data_.substr(pos, size);
        pos += size + 2;
        if (size == 0) break;
      }
    } else {
      size_t length = 0;
      for (absl::string_view line : absl::StrSplit(reply.head, "\r\n")) {
        if (absl::ConsumePrefix(&line, "Content-Length: ")) {
          if (!absl::SimpleAtoi(line, &length)) length = 0;
        }
      }
      while (data_.size() < pos + length) {
        const size_t before = data_.size();
        ReadMore();
        if (data_.size() == before) break;
      }
      reply.body = data_.substr(pos, length);
      pos += length;
    }
    data_.erase(0, pos);
    return reply;
  }
  // True when the server has closed the connection (recv returns 0 or an error).
  bool ClosedByServer() {
    char c;
    return recv(fd_, &c, 1, 0) <= 0;
  }

 private:
  void ReadMore() {
    char buffer[65536];
    const ssize_t n = recv(fd_, buffer, sizeof(buffer), 0);
    if (n > 0) data_.append(buffer, static_cast<size_t>(n));
  }
  int fd_ = -1;
  bool connected_ = false;
  std::string data_;
};

// The JSON of each "data: ..." event of a stream body ("[DONE]" as a string).
std::vector<json> Events(const std::string& body) {
  std::vector<json> out;
  for (absl::string_view event : absl::StrSplit(body, "\n\n", absl::SkipEmpty())) {
    if (!absl::ConsumePrefix(&event, "data: ")) {
      ADD_FAILURE() << "not an event: " << event;
      continue;
    }
    out.push_back(event == "[DONE]" ? json("[DONE]") : json::parse(event));
  }
  return out;
}

class HttpServerTest : public ::testing::Test {
 protected:
  void TearDown() override { Stop(); }

  struct Options {
    int64_t slots = 2;
    int64_t max_waiting = 256;
    int64_t max_body_bytes = int64_t{1} << 20;
    int64_t max_stream_buffer_bytes = int64_t{4} << 20;
    bool tokens = false;
    bool load_model = true;
  };

  void Start(Options o) {
    PS_ASSERT_OK_AND_ASSIGN(golden_, test::LoadGoldenFixture(kFixture));
    service::ServiceOptions service_options;
    service_options.model_name = kFixture;
    service_options.max_prompt_tokens = 4096;
    service_options.max_new_tokens_limit = kLong;
    service_options.max_stream_buffer_bytes = o.max_stream_buffer_bytes;
    if (o.tokens) {
      PS_ASSERT_OK_AND_ASSIGN(std::unique_ptr<service::Authenticator> auth,
                              service::Authenticator::FromText(absl::StrCat("alice:", kToken)));
      service_options.authenticator = std::move(auth);
    }
    service_ = std::make_unique<service::GenerationService>(service_options, &metrics_);
    if (o.load_model) {
      PS_ASSERT_OK_AND_ASSIGN(engine::ModelWeights weights, engine::LoadWeights(golden_.model_dir));
      backend_ = std::make_unique<kernels::cpu::CpuBackend>(2);
      faulty_ = std::make_unique<test::FaultyBackend>(*backend_);  // fails on demand
      engine::ModelOptions model_options;
      model_options.num_slots = o.slots;
      model_options.max_batch = o.slots;
      PS_ASSERT_OK_AND_ASSIGN(std::unique_ptr<engine::Model> model,
                              engine::Model::Create(weights, *faulty_, model_options));
      engine::SchedulerOptions options;
      options.max_waiting = o.max_waiting;
      options.sessions.budget_bytes = int64_t{64} << 20;
      options.prefix_cache.budget_bytes = int64_t{64} << 20;
      options.model_fingerprint = engine::ModelFingerprint(weights);
      // The step callback waits while a test holds the engine.
      options.on_step = [this](const engine::StepStats&) {
        std::unique_lock<std::mutex> lock(hold_mu_);
        hold_cv_.wait(lock, [this] { return !hold_engine_; });
      };
      PS_ASSERT_OK_AND_ASSIGN(scheduler_, engine::Scheduler::Create(std::move(model), options));
      service_->SetScheduler(scheduler_.get());
    }
    HttpServerOptions http_options;
    http_options.host = "127.0.0.1";
    http_options.port = 0;
    http_options.model_name = kFixture;
    http_options.max_body_bytes = o.max_body_bytes;
    http_options.write_timeout = absl::Seconds(20);
    PS_ASSERT_OK_AND_ASSIGN(server_, HttpServer::Start(http_options, service_.get()));
    port_ = server_->port();
  }

  void Stop() {
    HoldEngine(false);
    if (server_ != nullptr) server_->Shutdown(absl::Now() + absl::Seconds(1));
    server_.reset();
    scheduler_.reset();
    service_.reset();
  }

  void HoldEngine(bool hold) {
    {
      std::lock_guard<std::mutex> lock(hold_mu_);
      hold_engine_ = hold;
    }
    hold_cv_.notify_all();
  }

  Reply Call(const std::string& method, const std::string& path, const std::string& body = "",
             const std::string& headers = "") {
    Client client(port_);
    EXPECT_TRUE(client.connected());
    client.SendRequest(method, path, body, headers);
    return client.ReadReply();
  }
  Reply Post(const std::string& path, const json& body, const std::string& headers = "") {
    return Call("POST", path, body.dump(), headers);
  }

  // The golden prompt, greedy, for as many tokens as the golden continuation has.
  json GreedyRequest() const {
    return json{
        {"prompt", golden_.tokens}, {"temperature", 0}, {"max_tokens", golden_.greedy.size()}};
  }

  // Waits (up to 10 s) until `used` slots are in use.
  bool WaitSlots(int64_t used) {
    for (int i = 0; i < 1000; ++i) {
      if (scheduler_->Stats().slots_used == used) return true;
      absl::SleepFor(absl::Milliseconds(10));
    }
    return false;
  }
  bool WaitOpenConnections(int64_t open) {
    for (int i = 0; i < 1000; ++i) {
      if (server_->open_connections() == open) return true;
      absl::SleepFor(absl::Milliseconds(10));
    }
    return false;
  }

  test::GoldenFixture golden_;
  RecordingMetrics metrics_;
  std::unique_ptr<kernels::cpu::CpuBackend> backend_;
  std::unique_ptr<test::FaultyBackend> faulty_;
  std::unique_ptr<engine::Scheduler> scheduler_;
  std::unique_ptr<service::GenerationService> service_;
  std::unique_ptr<HttpServer> server_;
  int port_ = 0;
  std::mutex hold_mu_;
  std::condition_variable hold_cv_;
  bool hold_engine_ = false;
};

TEST_F(HttpServerTest, GreedyCompletionIsTheGoldenContinuation) {
  Start({});
  const Reply reply = Post("/v1/completions", GreedyRequest());
  ASSERT_EQ(reply.status, 200) << reply.body;
  const json j = json::parse(reply.body);
  PS_ASSERT_OK_AND_ASSIGN(engine::ByteTokenizer tokenizer, engine::ByteTokenizer::Create(256));
  PS_ASSERT_OK_AND_ASSIGN(std::string expected, tokenizer.Decode(golden_.greedy));
  EXPECT_EQ(j["choices"][0]["text"], expected);
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(j["usage"]["prompt_tokens"], golden_.tokens.size());
  EXPECT_EQ(j["usage"]["completion_tokens"], golden_.greedy.size());
  EXPECT_EQ(j["model"], kFixture);
  EXPECT_THAT(reply.head, HasSubstr("X-Request-Id: cmpl-"));
  EXPECT_EQ(metrics_.Count(metrics_.api_requests, "http completions 200"), 1);
  EXPECT_EQ(metrics_.Count(metrics_.finished, "length"), 1);
}

TEST_F(HttpServerTest, StreamEqualsTheWholeResponse) {
  Start({});
  json request = {{"prompt", "In the beginning"}, {"max_tokens", 40}, {"seed", 7}};
  const Reply whole = Post("/v1/completions", request);
  ASSERT_EQ(whole.status, 200) << whole.body;
  request["stream"] = true;
  request["stream_options"] = {{"include_usage", true}};
  const Reply stream = Post("/v1/completions", request);
  ASSERT_EQ(stream.status, 200);
  EXPECT_THAT(stream.head, HasSubstr("Content-Type: text/event-stream"));
  const std::vector<json> events = Events(stream.body);
  ASSERT_GE(events.size(), 3u);
  std::string text;
  for (size_t i = 0; i + 2 < events.size(); ++i) {
    text += events[i]["choices"][0]["text"].get<std::string>();
  }
  EXPECT_EQ(text, json::parse(whole.body)["choices"][0]["text"]);
  EXPECT_EQ(events[events.size() - 3]["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(events[events.size() - 2]["usage"]["completion_tokens"], 40);
  EXPECT_EQ(events.back(), "[DONE]");
}

TEST_F(HttpServerTest, ChatWholeAndStreamed) {
  Start({});
  json request = {{"messages", {{{"role", "user"}, {"content", "Who said it?"}}}},
                  {"max_tokens", 12},
                  {"seed", 3}};
  const Reply whole = Post("/v1/chat/completions", request);
  ASSERT_EQ(whole.status, 200) << whole.body;
  const json j = json::parse(whole.body);
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["choices"][0]["message"]["role"], "assistant");
  // The rendered prompt: "User: Who said it?\nAssistant:" (default template).
  EXPECT_EQ(j["usage"]["prompt_tokens"], 29);
  request["stream"] = true;
  const std::vector<json> events = Events(Post("/v1/chat/completions", request).body);
  ASSERT_GE(events.size(), 3u);
  EXPECT_EQ(events[0]["choices"][0]["delta"]["role"], "assistant");
  std::string text;
  for (const json& e : events) {
    if (e.is_object() && e["choices"][0]["delta"].contains("content")) {
      text += e["choices"][0]["delta"]["content"].get<std::string>();
    }
  }
  EXPECT_EQ(text, j["choices"][0]["message"]["content"]);
}

TEST_F(HttpServerTest, EchoWithLogprobsScoresThePrompt) {
  Start({});
  const Reply reply =
      Post("/v1/completions",
           {{"prompt", "And God said"}, {"max_tokens", 0}, {"echo", true}, {"logprobs", 2}});
  ASSERT_EQ(reply.status, 200) << reply.body;
  const json choice = json::parse(reply.body)["choices"][0];
  EXPECT_EQ(choice["text"], "And God said");
  ASSERT_EQ(choice["logprobs"]["tokens"].size(), 12u);
  EXPECT_TRUE(choice["logprobs"]["token_logprobs"][0].is_null());
  for (size_t i = 1; i < 12; ++i) {
    EXPECT_LE(choice["logprobs"]["token_logprobs"][i].get<double>(), 0.0);
    EXPECT_EQ(choice["logprobs"]["top_logprobs"][i].size(), 2u);
  }
}

TEST_F(HttpServerTest, RefusalsHaveTheirStatusAndNameTheField) {
  Start({.max_body_bytes = 4096});
  Reply r = Post("/v1/completions", {{"prompt", "x"}, {"temperature", "hot"}});
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(json::parse(r.body)["error"]["param"], "temperature");
  r = Post("/v1/completions", {{"prompt", "x"}, {"top_p", 0}});
  EXPECT_EQ(r.status, 400);
  EXPECT_THAT(json::parse(r.body)["error"]["message"].get<std::string>(),
              HasSubstr("top_p: must be in (0, 1]"));
  r = Call("POST", "/v1/completions", "{\"prompt\": ");
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(json::parse(r.body)["error"]["param"], "body");
  r = Post("/v1/completions", {{"prompt", "x"}, {"model", "gpt-4"}});
  EXPECT_EQ(r.status, 404);
  EXPECT_EQ(json::parse(r.body)["error"]["code"], "model_not_found");
  EXPECT_EQ(Call("GET", "/v2/nothing").status, 404);
  r = Call("GET", "/v1/completions");
  EXPECT_EQ(r.status, 405);
  EXPECT_THAT(r.head, HasSubstr("Allow: POST"));
  // A body over the limit is refused from its Content-Length, before it is sent.
  Client big(port_);
  big.Send("POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n");
  r = big.ReadReply();
  EXPECT_EQ(r.status, 413);
  EXPECT_EQ(json::parse(r.body)["error"]["code"], "request_too_large");
  // The same without a Content-Length (chunked): refused once the limit is passed.
  Client chunked(port_);
  chunked.Send("POST /v1/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
  chunked.Send(absl::StrCat("2000\r\n", std::string(0x2000, 'x'), "\r\n"));
  EXPECT_EQ(chunked.ReadReply().status, 413);
  // Not HTTP at all.
  Client garbage(port_);
  garbage.Send("\x01\x02 nonsense\r\n\r\n");
  EXPECT_EQ(garbage.ReadReply().status, 400);
  EXPECT_GE(metrics_.Count(metrics_.refused, "validation"), 3);
  EXPECT_EQ(metrics_.Count(metrics_.api_requests, "http completions 413"), 2);
}

TEST_F(HttpServerTest, BearerTokens) {
  Start({.tokens = true});
  Reply r = Post("/v1/completions", {{"prompt", "x"}, {"max_tokens", 1}});
  EXPECT_EQ(r.status, 401);
  EXPECT_EQ(json::parse(r.body)["error"]["code"], "invalid_api_key");
  r = Post("/v1/completions", {{"prompt", "x"}, {"max_tokens", 1}},
           "Authorization: Bearer wrong-token-wrong-token\r\n");
  EXPECT_EQ(r.status, 401);
  EXPECT_EQ(metrics_.auth_failures.load(), 2);
  r = Post("/v1/completions", {{"prompt", "x"}, {"max_tokens", 1}},
           absl::StrCat("Authorization: Bearer ", kToken, "\r\n"));
  EXPECT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(Call("GET", "/v1/models").status, 401);
  // Probes need no token.
  EXPECT_EQ(Call("GET", "/health").status, 200);
}

TEST_F(HttpServerTest, FullQueueIs429) {
  Start({.slots = 1, .max_waiting = 1});
  HoldEngine(true);
  // One request takes the slot (the engine is held in its first step), one waits.
  Client first(port_), second(port_);
  first.SendRequest("POST", "/v1/completions", R"({"prompt": "a", "max_tokens": 1000})");
  ASSERT_TRUE(WaitSlots(1));
  second.SendRequest("POST", "/v1/completions", R"({"prompt": "b", "max_tokens": 1})");
  for (int i = 0; i < 1000 && scheduler_->Stats().waiting < 1; ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_EQ(scheduler_->Stats().waiting, 1);
  const Reply third = Post("/v1/completions", {{"prompt", "c"}, {"max_tokens", 1}});
  EXPECT_EQ(third.status, 429) << third.body;
  EXPECT_EQ(json::parse(third.body)["error"]["type"], "rate_limit_error");
  HoldEngine(false);
  EXPECT_EQ(first.ReadReply().status, 200);
  EXPECT_EQ(second.ReadReply().status, 200);
}

TEST_F(HttpServerTest, LoadingAndDraining) {
  Start({.load_model = false});
  Reply r = Call("GET", "/health");
  EXPECT_EQ(r.status, 503);
  EXPECT_EQ(json::parse(r.body)["status"], "loading");
  EXPECT_EQ(Post("/v1/completions", {{"prompt", "x"}}).status, 503);
  Stop();
  Start({});
  EXPECT_EQ(Call("GET", "/health").status, 200);
  scheduler_->StartDrain();
  r = Call("GET", "/health");
  EXPECT_EQ(r.status, 503);
  EXPECT_EQ(json::parse(r.body)["status"], "draining");
  r = Post("/v1/completions", {{"prompt", "x"}, {"max_tokens", 1}});
  EXPECT_EQ(r.status, 503);
  EXPECT_EQ(json::parse(r.body)["error"]["type"], "service_unavailable");
}

// A backend that failed for good: the request it ran is a 500 naming the backend's error, then
// /health is 503 "failed" and new requests are 503 (docs/serving.md, "Device").
TEST_F(HttpServerTest, AFailedBackendIs500ThenHealthSaysFailed) {
  Start({});
  faulty_->InjectFailure(absl::InternalError("device lost"), /*sticky=*/true);
  Reply r = Post("/v1/completions", {{"prompt", "And God said"}, {"max_tokens", 4}});
  EXPECT_EQ(r.status, 500);
  EXPECT_THAT(r.body, ::testing::HasSubstr("device lost"));
  r = Call("GET", "/health");
  EXPECT_EQ(r.status, 503);
  EXPECT_EQ(json::parse(r.body)["status"], "failed");
  r = Post("/v1/completions", {{"prompt", "x"}, {"max_tokens", 1}});
  EXPECT_EQ(r.status, 503);
  EXPECT_THAT(r.body, ::testing::HasSubstr("the engine failed"));
}

TEST_F(HttpServerTest, VanishedClientFreesItsSlot) {
  Start({});
  for (const bool stream : {false, true}) {
    const int64_t cancelled_before = metrics_.Count(metrics_.finished, "cancelled");
    Client client(port_);
    client.SendRequest("POST", "/v1/completions",
                       json{{"prompt", "x"}, {"max_tokens", kLong}, {"stream", stream}}.dump());
    ASSERT_TRUE(WaitSlots(1));
    if (stream) client.ReadUntil("data: ");
    client.Close();
    EXPECT_TRUE(WaitSlots(0)) << "stream " << stream;
    for (int i = 0; i < 1000 && metrics_.Count(metrics_.finished, "cancelled") == cancelled_before;
         ++i) {
      absl::SleepFor(absl::Milliseconds(10));
    }
    EXPECT_EQ(metrics_.Count(metrics_.finished, "cancelled"), cancelled_before + 1);
    EXPECT_TRUE(WaitOpenConnections(0));
    EXPECT_EQ(server_->active_requests(), 0);
    EXPECT_EQ(service_->inflight_prompt_bytes(), 0);
  }
}

TEST_F(HttpServerTest, ClientThatStopsReadingIsCancelled) {
  Start({.max_stream_buffer_bytes = 64 << 10});
  Client client(port_, /*receive_buffer=*/4096);
  client.SendRequest(
      "POST", "/v1/completions",
      json{{"prompt", "x"}, {"max_tokens", kLong}, {"stream", true}, {"logprobs", 20}}.dump());
  // Never reads: the unsent output passes the bound (within milliseconds: the model is fast),
  // and the request is cancelled.
  for (int i = 0; i < 1000 && metrics_.Count(metrics_.finished, "cancelled") == 0; ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(metrics_.Count(metrics_.finished, "cancelled"), 1);
  EXPECT_EQ(metrics_.stream_overflows.load(), 1);
  EXPECT_TRUE(WaitSlots(0));
  EXPECT_TRUE(WaitOpenConnections(0));
  EXPECT_EQ(service_->inflight_prompt_bytes(), 0);
}

TEST_F(HttpServerTest, KeepAliveAndPipelining) {
  Start({});
  Client client(port_);
  const std::string body = R"({"prompt": "And", "max_tokens": 3, "seed": 1})";
  // Two requests back to back on one connection, the second sent before the first is answered.
  client.SendRequest("POST", "/v1/completions", body, "", /*keep_alive=*/true);
  client.SendRequest("POST", "/v1/completions", body, "", /*keep_alive=*/true);
  const Reply a = client.ReadReply();
  const Reply b = client.ReadReply();
  ASSERT_EQ(a.status, 200);
  ASSERT_EQ(b.status, 200);
  EXPECT_EQ(json::parse(a.body)["choices"][0]["text"], json::parse(b.body)["choices"][0]["text"]);
  client.SendRequest("GET", "/health", "");
  EXPECT_EQ(client.ReadReply().status, 200);
  EXPECT_TRUE(client.ClosedByServer());  // Connection: close
}

TEST_F(HttpServerTest, ModelsTokenizeDetokenize) {
  Start({});
  Reply r = Call("GET", "/v1/models");
  ASSERT_EQ(r.status, 200);
  EXPECT_EQ(json::parse(r.body)["data"][0]["id"], kFixture);
  r = Post("/tokenize", {{"prompt", "Hi"}});
  ASSERT_EQ(r.status, 200);
  EXPECT_EQ(json::parse(r.body)["tokens"], json::parse("[72, 105]"));
  r = Post("/detokenize", {{"tokens", {72, 105, 0xE2}}});
  ASSERT_EQ(r.status, 200);
  EXPECT_EQ(json::parse(r.body)["prompt"], "Hi\xEF\xBF\xBD");  // a cut character: U+FFFD
  EXPECT_EQ(Post("/detokenize", {{"tokens", {300}}}).status, 400);
}

TEST_F(HttpServerTest, SessionsContinueAConversation) {
  Start({});
  Reply r = Call("POST", "/v1/sessions");
  ASSERT_EQ(r.status, 200) << r.body;
  const std::string id = json::parse(r.body)["id"];
  const json turn = {{"prompt", "In the beginning God created"},
                     {"max_tokens", 4},
                     {"session_id", id},
                     {"temperature", 0}};
  ASSERT_EQ(Post("/v1/completions", turn).status, 200);
  r = Post("/v1/completions", turn);
  ASSERT_EQ(r.status, 200) << r.body;
  // The second turn starts from the state the first left: every earlier token is cached.
  EXPECT_GT(json::parse(r.body)["usage"]["prompt_tokens_details"]["cached_tokens"], 25);
  EXPECT_EQ(Call("DELETE", absl::StrCat("/v1/sessions/", id)).status, 200);
  EXPECT_EQ(Call("DELETE", absl::StrCat("/v1/sessions/", id)).status, 404);
  EXPECT_EQ(Post("/v1/completions", turn).status, 404);
}

TEST_F(HttpServerTest, ShutdownWithAStreamOpenDoesNotHang) {
  Start({});
  Client client(port_);
  client.SendRequest("POST", "/v1/completions",
                     json{{"prompt", "x"}, {"max_tokens", kLong}, {"stream", true}}.dump());
  client.ReadUntil("data: ");
  scheduler_->CancelAll();
  server_->Shutdown(absl::Now() + absl::Seconds(5));
  EXPECT_EQ(server_->open_connections(), 0);
  EXPECT_THAT(client.ReadUntil("[DONE]"), HasSubstr("\"finish_reason\":\"cancelled\""));
}

TEST_F(HttpServerTest, RequestsMayOutliveTheServer) {
  Start({});
  HoldEngine(true);  // the request stays in the engine past the server's end
  Client client(port_);
  client.SendRequest("POST", "/v1/completions",
                     json{{"prompt", "x"}, {"max_tokens", kLong}, {"stream", true}}.dump());
  ASSERT_TRUE(WaitSlots(1));
  server_->Shutdown(absl::Now());
  server_.reset();  // its connection cancels the request; the engine ends it after
  HoldEngine(false);
  EXPECT_TRUE(WaitSlots(0));
  for (int i = 0; i < 1000 && metrics_.Count(metrics_.finished, "cancelled") == 0; ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(metrics_.Count(metrics_.finished, "cancelled"), 1);
  EXPECT_EQ(service_->inflight_prompt_bytes(), 0);
}

}  // namespace
}  // namespace ps::http
