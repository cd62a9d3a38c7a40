// The generation service over loopback, in process: a grpc::Server on 127.0.0.1:0 over a real
// Scheduler on a golden fixture model. Results equal the golden greedy continuation; streams,
// concurrency, cancellation (RPC and vanished client), deadlines, queue limits, validation over
// the wire, Tokenize / GetModelInfo, the health service's readiness, and liveness under the
// engine progress watchdog.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <absl/strings/str_cat.h>
#include <absl/time/clock.h>
#include <gmock/gmock.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <gtest/gtest.h>

#include "kernels/cpu/cpu_backend.h"
#include "server/engine/serving/watchdog.h"
#include "server/service/generation_service.h"
#include "server/service/watchdog_listener.h"
#include "tests/testing/faulty_backend.h"
#include "tests/testing/files.h"
#include "tests/testing/golden.h"
#include "tests/testing/health_check.h"
#include "tests/testing/prompt_logprobs_check.h"
#include "tests/testing/scheduler_fixture.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/wait.h"

namespace ps::service {
namespace {

namespace v1 = ::polysketch::v1;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

constexpr char kFixture[] = "polysketch-learned-local";
// max_new_tokens of requests that must still be running when cancelled or past their deadline
// (the fixture model generates thousands of tokens per second).
constexpr int kLong = 1 << 20;

// Counts what the metrics hear of refusals (by reason: polysketch_request_failure_total{reason})
// and of failures (the rest is metrics_test's).
class CountingMetrics final : public metrics::ServerMetrics {
 public:
  int port() const override { return 0; }
  void RequestFinished(const engine::FinalResult& result) override {
    if (result.reason == engine::FinishReason::kError) errors.fetch_add(1);
  }
  void InterTokenLatency(absl::Duration, int64_t) override {}
  void RequestRefused(metrics::FailureReason reason) override {
    std::lock_guard<std::mutex> lock(mu);
    ++refused[static_cast<int>(reason)];
  }
  void EngineStep(const engine::StepStats&) override {}
  void SetScheduler(const engine::SchedulerStats&) override {}
  void SetAttentionMemory(absl::string_view, int64_t) override {}
  void EngineFailed() override { failed.fetch_add(1); }
  int Refused(metrics::FailureReason reason) {
    std::lock_guard<std::mutex> lock(mu);
    return refused[static_cast<int>(reason)];
  }
  std::atomic<int> errors{0};
  std::atomic<int> failed{0};
  std::mutex mu;
  int refused[5] = {};
};

class ServerTest : public ::testing::Test {
 protected:
  void SetUp() override { Start(/*slots=*/4, /*max_waiting=*/256); }
  void TearDown() override { Stop(); }

  void Start(int64_t slots, int64_t max_waiting, int64_t prefill_chunk = 512) {
    PS_ASSERT_OK_AND_ASSIGN(golden_, test::LoadGoldenFixture(kFixture));
    backend_ = std::make_unique<kernels::cpu::CpuBackend>(2);
    // The CPU backend under another name, failing on demand (ModelInfo.device, backend errors).
    faulty_ = std::make_unique<test::FaultyBackend>(*backend_, "faulty-cpu");
    engine::ModelOptions model_options;
    model_options.num_slots = slots;
    model_options.max_batch = slots;
    model_options.prefill_chunk = prefill_chunk;
    engine::SchedulerOptions options;
    options.max_waiting = max_waiting;
    options.sessions.budget_bytes = int64_t{64} << 20;
    options.prefix_cache.budget_bytes = int64_t{64} << 20;
    // The step callback waits while a test holds the engine (the watchdog test's stuck step).
    options.on_step = [this](const engine::StepStats&) {
      std::unique_lock<std::mutex> lock(hold_mu_);
      hold_cv_.wait(lock, [this] { return !hold_engine_; });
    };
    // The server binary's wiring (main.cc): a failed engine turns the health services
    // NOT_SERVING. The server exists by the time a test makes the backend fail.
    options.on_failure = [this](const absl::Status& failure) {
      MakeEngineFailureListener({server_->GetHealthCheckService()}, &metrics_,
                                engine_health_)(failure);
    };
    scheduler_ = test::MakeModelScheduler(golden_.model_dir, *faulty_, model_options, options);
    ASSERT_NE(scheduler_, nullptr);
    ServiceOptions service_options;
    service_options.model_name = kFixture;
    service_options.max_prompt_tokens = 4096;
    service_options.max_new_tokens_limit = kLong;
    service_ = std::make_unique<GenerationService>(service_options, &metrics_);
    service_->SetScheduler(scheduler_.get());
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port, 0);
    server_->GetHealthCheckService()->SetServingStatus("", true);
    server_->GetHealthCheckService()->SetServingStatus(kReadinessServiceName, true);
    channel_ =
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials());
    stub_ = v1::GenerationService::NewStub(channel_);
  }

  void HoldEngine(bool hold) {
    {
      std::lock_guard<std::mutex> lock(hold_mu_);
      hold_engine_ = hold;
    }
    hold_cv_.notify_all();
  }

  void Stop() {
    HoldEngine(false);
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    server_.reset();
    scheduler_.reset();
    service_.reset();
  }

  v1::GenerateRequest GreedyRequest(int max_new_tokens = 0) const {
    v1::GenerateRequest request;
    request.mutable_token_ids()->mutable_ids()->Assign(golden_.tokens.begin(),
                                                       golden_.tokens.end());
    request.mutable_sampling()->set_temperature(0);
    request.set_max_new_tokens(max_new_tokens > 0 ? max_new_tokens
                                                  : static_cast<int>(golden_.greedy.size()));
    return request;
  }

  // Reads a stream; returns its status, collects tokens and text, counts finals.
  struct StreamResult {
    grpc::Status status;
    std::vector<int32_t> tokens;
    std::string text;
    int messages = 0;
    int finals = 0;
    // Prompt log-probabilities, in order; messages that had some; the most in one message; and
    // whether any came after (or with) a generated token.
    std::vector<v1::GeneratedToken> prompt_logprobs;
    int prompt_messages = 0;
    int largest_prompt_message = 0;
    bool prompt_after_tokens = false;
    bool final_last = false;
    v1::FinalInfo final;
  };
  StreamResult ReadStream(grpc::ClientContext* context, const v1::GenerateRequest& request,
                          const std::function<void(int)>& after_message = nullptr) {
    StreamResult result;
    auto reader = stub_->GenerateStream(context, request);
    v1::GenerateStreamResponse message;
    while (reader->Read(&message)) {
      ++result.messages;
      if (message.prompt_logprobs_size() > 0) {
        ++result.prompt_messages;
        result.largest_prompt_message =
            std::max(result.largest_prompt_message, message.prompt_logprobs_size());
        result.prompt_after_tokens |= !result.tokens.empty() || message.tokens_size() > 0;
        result.prompt_logprobs.insert(result.prompt_logprobs.end(),
                                      message.prompt_logprobs().begin(),
                                      message.prompt_logprobs().end());
      }
      for (const v1::GeneratedToken& t : message.tokens()) result.tokens.push_back(t.token_id());
      result.text += message.text();
      result.final_last = message.has_final();
      if (message.has_final()) {
        ++result.finals;
        result.final = message.final();
      }
      if (after_message) after_message(result.messages);
    }
    result.status = reader->Finish();
    return result;
  }

  // Starts a long greedy stream, injects `failure` into the backend once the stream has a token,
  // and returns the status the stream ends with.
  grpc::Status FailWhileStreaming(const absl::Status& failure, bool sticky) {
    grpc::ClientContext context;
    auto stream = stub_->GenerateStream(&context, GreedyRequest(kLong));
    v1::GenerateStreamResponse message;
    if (!stream->Read(&message)) {
      ADD_FAILURE() << "the stream ended before its first token";
      return stream->Finish();
    }
    faulty_->InjectFailure(failure, sticky);
    while (stream->Read(&message)) {
    }
    return stream->Finish();
  }

  std::mutex hold_mu_;
  std::condition_variable hold_cv_;
  bool hold_engine_ = false;
  test::GoldenFixture golden_;
  CountingMetrics metrics_;  // declared before service_, so it outlives it
  std::shared_ptr<EngineHealth> engine_health_ = std::make_shared<EngineHealth>();
  std::unique_ptr<kernels::cpu::CpuBackend> backend_;
  std::unique_ptr<test::FaultyBackend> faulty_;
  std::unique_ptr<engine::Scheduler> scheduler_;
  std::unique_ptr<GenerationService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::GenerationService::Stub> stub_;
};

TEST_F(ServerTest, UnaryGreedyEqualsGolden) {
  grpc::ClientContext context;
  v1::GenerateResponse response;
  const grpc::Status status = stub_->Generate(&context, GreedyRequest(), &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  std::vector<int32_t> tokens;
  for (const v1::GeneratedToken& t : response.tokens()) tokens.push_back(t.token_id());
  EXPECT_THAT(tokens, ElementsAreArray(golden_.greedy));
  EXPECT_EQ(response.final().finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(response.final().prompt_tokens(), golden_.tokens.size());
  EXPECT_EQ(response.final().generated_tokens(), golden_.greedy.size());
  EXPECT_FALSE(response.request_id().empty());
}

TEST_F(ServerTest, StreamEqualsUnaryWithFinalOnLastMessageOnly) {
  grpc::ClientContext unary_context;
  v1::GenerateResponse unary;
  ASSERT_TRUE(stub_->Generate(&unary_context, GreedyRequest(), &unary).ok());
  grpc::ClientContext context;
  const StreamResult stream = ReadStream(&context, GreedyRequest());
  ASSERT_TRUE(stream.status.ok()) << stream.status.error_message();
  EXPECT_THAT(stream.tokens, ElementsAreArray(golden_.greedy));
  EXPECT_EQ(stream.text, unary.text());
  EXPECT_EQ(stream.finals, 1);
  EXPECT_TRUE(stream.final_last);
  EXPECT_EQ(stream.final.finish_reason(), v1::FINISH_REASON_LENGTH);
}

TEST_F(ServerTest, SixteenConcurrentStreamsEachEqualTheirUnaryResult) {
  constexpr int kStreams = 16;
  auto request_for = [&](int i) {
    v1::GenerateRequest request = GreedyRequest(24);
    request.mutable_sampling()->set_temperature(0.9f);
    request.mutable_sampling()->set_seed(1000 + i);
    return request;
  };
  std::vector<std::vector<int32_t>> expected(kStreams);
  for (int i = 0; i < kStreams; ++i) {
    grpc::ClientContext context;
    v1::GenerateResponse response;
    ASSERT_TRUE(stub_->Generate(&context, request_for(i), &response).ok());
    for (const v1::GeneratedToken& t : response.tokens()) expected[i].push_back(t.token_id());
  }
  std::vector<StreamResult> results(kStreams);
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] {
      grpc::ClientContext context;
      results[i] = ReadStream(&context, request_for(i));
    });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < kStreams; ++i) {
    EXPECT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    EXPECT_THAT(results[i].tokens, ElementsAreArray(expected[i])) << "stream " << i;
  }
}

TEST_F(ServerTest, CancelRpcEndsStreamAndFreesSlot) {
  v1::GenerateRequest request = GreedyRequest(kLong);
  request.set_request_id("cancel-me");
  grpc::ClientContext context;
  std::atomic<bool> cancelled{false};
  const StreamResult stream = ReadStream(&context, request, [&](int messages) {
    if (messages == 2 && !cancelled.exchange(true)) {
      grpc::ClientContext cancel_context;
      v1::CancelRequest cancel;
      cancel.set_request_id("cancel-me");
      v1::CancelResponse cancel_response;
      EXPECT_TRUE(stub_->Cancel(&cancel_context, cancel, &cancel_response).ok());
    }
  });
  EXPECT_EQ(stream.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_LT(stream.tokens.size(), static_cast<size_t>(kLong));
  EXPECT_EQ(stream.final.finish_reason(), v1::FINISH_REASON_CANCELLED);
  EXPECT_TRUE(test::WaitSlotsFree(*scheduler_));
  // Cancel of an unknown id: NOT_FOUND.
  grpc::ClientContext cancel_context;
  v1::CancelRequest cancel;
  cancel.set_request_id("cancel-me");
  v1::CancelResponse cancel_response;
  EXPECT_EQ(stub_->Cancel(&cancel_context, cancel, &cancel_response).error_code(),
            grpc::StatusCode::NOT_FOUND);
}

TEST_F(ServerTest, VanishedClientFreesSlot) {
  grpc::ClientContext context;
  const StreamResult stream = ReadStream(&context, GreedyRequest(kLong), [&](int messages) {
    if (messages == 2) context.TryCancel();
  });
  EXPECT_EQ(stream.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(test::WaitSlotsFree(*scheduler_));
  EXPECT_EQ(scheduler_->Stats().running, 0);
}

TEST_F(ServerTest, GrpcDeadlineEndsRequestAndFreesSlot) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
  v1::GenerateResponse response;
  const grpc::Status status = stub_->Generate(&context, GreedyRequest(kLong), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(test::WaitSlotsFree(*scheduler_));
}

TEST_F(ServerTest, TimeLimitEndsStreamWithDeadlineExceeded) {
  v1::GenerateRequest request = GreedyRequest(kLong);
  request.set_time_limit_ms(200);
  grpc::ClientContext context;
  const StreamResult stream = ReadStream(&context, request);
  EXPECT_EQ(stream.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_EQ(stream.final.finish_reason(), v1::FINISH_REASON_DEADLINE);
  EXPECT_TRUE(test::WaitSlotsFree(*scheduler_));
}

TEST_F(ServerTest, FullQueueIsResourceExhausted) {
  Stop();
  Start(/*slots=*/1, /*max_waiting=*/1);
  // One running, one queued: the third is refused at once.
  grpc::ClientContext c1, c2;
  auto s1 = stub_->GenerateStream(&c1, GreedyRequest(kLong));
  v1::GenerateStreamResponse message;
  ASSERT_TRUE(s1->Read(&message));  // running
  auto s2 = stub_->GenerateStream(&c2, GreedyRequest(kLong));
  for (int i = 0; i < 250 && scheduler_->Stats().waiting == 0; ++i) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  ASSERT_EQ(scheduler_->Stats().waiting, 1);
  grpc::ClientContext c3;
  v1::GenerateResponse response;
  const grpc::Status status = stub_->Generate(&c3, GreedyRequest(4), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
  c1.TryCancel();
  c2.TryCancel();
  while (s1->Read(&message)) {
  }
  while (s2->Read(&message)) {
  }
  s1->Finish().IgnoreError();
  s2->Finish().IgnoreError();
  EXPECT_TRUE(test::WaitSlotsFree(*scheduler_));
}

TEST_F(ServerTest, InvalidFieldsAreInvalidArgumentOverTheWire) {
  struct Case {
    std::string field;
    std::function<void(v1::GenerateRequest&)> mutate;
  };
  const std::vector<Case> cases = {
      {"prompt", [](v1::GenerateRequest& r) { r.clear_prompt(); }},
      {"prompt", [](v1::GenerateRequest& r) { r.mutable_token_ids()->clear_ids(); }},
      {"prompt.token_ids[1]",
       [](v1::GenerateRequest& r) { r.mutable_token_ids()->set_ids(1, 256); }},
      {"prompt", [](v1::GenerateRequest& r) { r.set_text(std::string(5000, 'a')); }},
      {"prompt.text", [](v1::GenerateRequest& r) { r.set_text("ok \xff\xfe"); }},
      {"stop.stop_strings[0]",
       // One byte, built without a string literal: GCC 12's -Wrestrict misfires on the inlined
       // copy of a one-character literal here.
       [](v1::GenerateRequest& r) {
         *r.mutable_stop()->add_stop_strings() = std::string(1, '\xc3');
       }},
      {"request_id", [](v1::GenerateRequest& r) { r.set_request_id("bad\x01id"); }},
      {"sampling.temperature",
       [](v1::GenerateRequest& r) { r.mutable_sampling()->set_temperature(-1); }},
      {"sampling.top_k", [](v1::GenerateRequest& r) { r.mutable_sampling()->set_top_k(-1); }},
      {"sampling.top_p", [](v1::GenerateRequest& r) { r.mutable_sampling()->set_top_p(0); }},
      {"sampling.min_p", [](v1::GenerateRequest& r) { r.mutable_sampling()->set_min_p(2); }},
      {"sampling.repetition_penalty",
       [](v1::GenerateRequest& r) { r.mutable_sampling()->set_repetition_penalty(0); }},
      {"sampling.presence_penalty",
       [](v1::GenerateRequest& r) { r.mutable_sampling()->set_presence_penalty(3); }},
      {"sampling.frequency_penalty",
       [](v1::GenerateRequest& r) { r.mutable_sampling()->set_frequency_penalty(-3); }},
      {"max_new_tokens", [](v1::GenerateRequest& r) { r.set_max_new_tokens(kLong + 1); }},
      {"min_new_tokens", [](v1::GenerateRequest& r) { r.set_min_new_tokens(99); }},
      {"top_logprobs",
       [](v1::GenerateRequest& r) { r.set_logprobs(true), r.set_top_logprobs(21); }},
      {"top_logprobs", [](v1::GenerateRequest& r) { r.set_top_logprobs(2); }},
      {"prompt_top_logprobs",
       [](v1::GenerateRequest& r) { r.set_prompt_logprobs(true), r.set_prompt_top_logprobs(21); }},
      {"prompt_top_logprobs", [](v1::GenerateRequest& r) { r.set_prompt_top_logprobs(1); }},
      // Refused before the session is looked up: the message says why, whatever the session.
      {"prompt_logprobs",
       [](v1::GenerateRequest& r) { r.set_prompt_logprobs(true), r.set_session_id("any"); }},
      {"request_id", [](v1::GenerateRequest& r) { r.set_request_id(std::string(129, 'x')); }},
      {"request_id", [](v1::GenerateRequest& r) { r.set_request_id("a\nb"); }},
      {"stop.stop_strings[0]",
       [](v1::GenerateRequest& r) { r.mutable_stop()->add_stop_strings(""); }},
      {"stop.stop_token_ids[0]",
       [](v1::GenerateRequest& r) { r.mutable_stop()->add_stop_token_ids(-1); }},
  };
  for (const Case& c : cases) {
    v1::GenerateRequest request = GreedyRequest(8);
    c.mutate(request);
    grpc::ClientContext context;
    v1::GenerateResponse response;
    const grpc::Status status = stub_->Generate(&context, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.field;
    EXPECT_THAT(status.error_message(), HasSubstr(c.field + ":"));
    grpc::ClientContext stream_context;
    const StreamResult stream = ReadStream(&stream_context, request);
    EXPECT_EQ(stream.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.field;
    EXPECT_EQ(stream.messages, 0);
  }
  EXPECT_EQ(scheduler_->Stats().steps, 0);  // nothing reached the engine
}

// The engine's prompt log-probabilities as protos (for the golden check).
std::vector<engine::TokenOutput> FromProto(const std::vector<v1::GeneratedToken>& entries) {
  std::vector<engine::TokenOutput> out;
  for (const v1::GeneratedToken& e : entries) {
    engine::TokenOutput& t = out.emplace_back();
    t.token_id = e.token_id();
    t.logprob = e.logprob();
    for (const v1::TokenLogprob& alt : e.top_logprobs()) {
      t.top_logprobs.push_back({alt.token_id(), alt.logprob()});
    }
  }
  return out;
}

// Prompt log-probabilities over the wire, with 16-token prefill chunks: unary returns them all in
// its one message; the stream in one message per chunk (at most 16 entries), all before the first
// generated token, equal to the unary ones; both equal the reference's teacher-forced
// log-probabilities with alternatives most likely first; generation after them is unchanged.
TEST_F(ServerTest, PromptLogprobsUnaryAndStream) {
  Stop();
  Start(/*slots=*/4, /*max_waiting=*/256, /*prefill_chunk=*/16);
  constexpr int kTop = 4;
  const size_t n = golden_.tokens.size();
  for (const int max_new : {0, 5}) {
    SCOPED_TRACE(absl::StrCat("max_new_tokens ", max_new));
    v1::GenerateRequest request = GreedyRequest();
    request.set_max_new_tokens(static_cast<uint32_t>(max_new));  // explicit 0: scoring only
    request.set_prompt_logprobs(true);
    request.set_prompt_top_logprobs(kTop);
    grpc::ClientContext context;
    v1::GenerateResponse unary;
    ASSERT_TRUE(stub_->Generate(&context, request, &unary).ok());
    ASSERT_EQ(unary.prompt_logprobs_size(), static_cast<int>(n - 1));
    const std::vector<v1::GeneratedToken> unary_entries(unary.prompt_logprobs().begin(),
                                                        unary.prompt_logprobs().end());
    test::ExpectPromptLogprobsMatchGolden(golden_, FromProto(unary_entries), kTop, 1e-4);
    EXPECT_EQ(unary.final().finish_reason(), v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(unary.final().generated_tokens(), static_cast<uint32_t>(max_new));
    EXPECT_EQ(unary.final().cached_tokens(), 0u);
    ASSERT_EQ(unary.tokens_size(), max_new);
    for (int i = 0; i < max_new; ++i) EXPECT_EQ(unary.tokens(i).token_id(), golden_.greedy[i]);

    grpc::ClientContext stream_context;
    const StreamResult stream = ReadStream(&stream_context, request);
    ASSERT_TRUE(stream.status.ok()) << stream.status.error_message();
    ASSERT_EQ(stream.prompt_logprobs.size(), n - 1);
    EXPECT_FALSE(stream.prompt_after_tokens);
    EXPECT_LE(stream.largest_prompt_message, 16);
    EXPECT_EQ(stream.prompt_messages, static_cast<int>((n - 1 + 15) / 16));
    for (size_t i = 0; i + 1 < n; ++i) {
      EXPECT_EQ(stream.prompt_logprobs[i].SerializeAsString(), unary_entries[i].SerializeAsString())
          << "entry " << i;
    }
    EXPECT_EQ(stream.final.generated_tokens(), static_cast<uint32_t>(max_new));
    EXPECT_EQ(stream.final.finish_reason(), v1::FINISH_REASON_LENGTH);
    EXPECT_TRUE(stream.final_last);
  }
  // Without the field set, max_new_tokens is the server default; without prompt_logprobs there
  // are none.
  v1::GenerateRequest plain = GreedyRequest();
  plain.clear_max_new_tokens();
  plain.mutable_stop()->add_stop_token_ids(golden_.greedy[3]);  // ends it early
  grpc::ClientContext plain_context;
  v1::GenerateResponse response;
  ASSERT_TRUE(stub_->Generate(&plain_context, plain, &response).ok());
  EXPECT_EQ(response.prompt_logprobs_size(), 0);
  EXPECT_GE(response.tokens_size(), 1);
  // A one-token prompt has nothing to score.
  v1::GenerateRequest one;
  one.set_text("A");
  one.set_max_new_tokens(0);
  one.set_prompt_logprobs(true);
  one.set_prompt_top_logprobs(2);
  grpc::ClientContext one_context;
  ASSERT_TRUE(stub_->Generate(&one_context, one, &response).ok());
  EXPECT_EQ(response.prompt_logprobs_size(), 0);
  EXPECT_EQ(response.final().generated_tokens(), 0u);
  EXPECT_EQ(response.text(), "");
}

// The prefix cache holds the prompt (a plain request shows the hit), yet a request with
// prompt_logprobs prefills and scores all of it.
TEST_F(ServerTest, PromptLogprobsTakeNoPrefixCacheHit) {
  v1::GenerateRequest plain = GreedyRequest(2);
  for (int i = 0; i < 2; ++i) {
    grpc::ClientContext context;
    v1::GenerateResponse response;
    ASSERT_TRUE(stub_->Generate(&context, plain, &response).ok());
    if (i == 1) {
      EXPECT_GT(response.final().cached_tokens(), 0u);
    }
  }
  v1::GenerateRequest scored = GreedyRequest(2);
  scored.set_prompt_logprobs(true);
  grpc::ClientContext context;
  v1::GenerateResponse response;
  ASSERT_TRUE(stub_->Generate(&context, scored, &response).ok());
  EXPECT_EQ(response.final().cached_tokens(), 0u);
  const std::vector<v1::GeneratedToken> entries(response.prompt_logprobs().begin(),
                                                response.prompt_logprobs().end());
  test::ExpectPromptLogprobsMatchGolden(golden_, FromProto(entries), 0, 1e-4);
}

TEST_F(ServerTest, DuplicateRequestIdIsAlreadyExists) {
  v1::GenerateRequest request = GreedyRequest(kLong);
  request.set_request_id("same");
  grpc::ClientContext c1;
  auto s1 = stub_->GenerateStream(&c1, request);
  v1::GenerateStreamResponse message;
  ASSERT_TRUE(s1->Read(&message));
  grpc::ClientContext c2;
  v1::GenerateResponse response;
  EXPECT_EQ(stub_->Generate(&c2, request, &response).error_code(),
            grpc::StatusCode::ALREADY_EXISTS);
  c1.TryCancel();
  while (s1->Read(&message)) {
  }
  s1->Finish().IgnoreError();
}

TEST_F(ServerTest, TokenizeAndModelInfo) {
  grpc::ClientContext context;
  v1::TokenizeRequest request;
  request.set_text("h\xC3\xA9");
  v1::TokenizeResponse response;
  ASSERT_TRUE(stub_->Tokenize(&context, request, &response).ok());
  EXPECT_THAT(response.token_ids(), ElementsAreArray({104, 0xC3, 0xA9}));
  grpc::ClientContext bad_context;
  request.set_text("h\xC3");  // a lead byte without its continuation
  const grpc::Status bad = stub_->Tokenize(&bad_context, request, &response);
  EXPECT_EQ(bad.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(bad.error_message(), ::testing::HasSubstr("text: not valid UTF-8 at byte 1"));

  grpc::ClientContext info_context;
  v1::ModelInfo info;
  ASSERT_TRUE(stub_->GetModelInfo(&info_context, v1::GetModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.name(), kFixture);
  EXPECT_EQ(info.architecture(), "polysketchformer");
  EXPECT_EQ(info.vocab_size(), static_cast<uint32_t>(golden_.vocab_size));
  EXPECT_EQ(info.attention_kinds_size(), static_cast<int>(scheduler_->config().n_layers));
  EXPECT_EQ(info.state_bytes_per_request(),
            static_cast<uint64_t>(scheduler_->model().layout().bytes_per_slot()));
  EXPECT_GT(info.state_bytes_per_request(), 0u);
  EXPECT_EQ(info.limits().state_slots(), 4u);
  EXPECT_EQ(info.limits().max_new_tokens(), static_cast<uint32_t>(kLong));
  EXPECT_EQ(info.tokenizer(), "bytes");
  // The backend the model runs on, not a default.
  EXPECT_EQ(info.device(), "faulty-cpu");
}

TEST_F(ServerTest, HealthAndReadinessTransitions) {
  EXPECT_EQ(test::HealthStatus(channel_), 1);
  EXPECT_EQ(test::HealthStatus(channel_, kReadinessServiceName), 1);
  // Drain as the server binary does: readiness NOT_SERVING, new requests UNAVAILABLE.
  server_->GetHealthCheckService()->SetServingStatus(kReadinessServiceName, false);
  scheduler_->StartDrain();
  EXPECT_EQ(test::HealthStatus(channel_, kReadinessServiceName), 2);
  EXPECT_EQ(test::HealthStatus(channel_), 1);
  grpc::ClientContext context;
  v1::GenerateResponse response;
  EXPECT_EQ(stub_->Generate(&context, GreedyRequest(4), &response).error_code(),
            grpc::StatusCode::UNAVAILABLE);
}

// A passing backend failure ends the running requests with INTERNAL (final message with finish
// reason ERROR, the backend named) and the metrics count them; the server stays SERVING and
// serves the next request.
TEST_F(ServerTest, BackendFailureEndsRunningRequestsWithInternal) {
  const grpc::Status status =
      FailWhileStreaming(absl::InternalError("kernel launch failed"), /*sticky=*/false);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INTERNAL);
  EXPECT_THAT(status.error_message(), HasSubstr("the faulty-cpu backend failed"));
  EXPECT_THAT(status.error_message(), HasSubstr("kernel launch failed"));
  EXPECT_EQ(metrics_.errors.load(), 1);
  EXPECT_EQ(metrics_.failed.load(), 0);
  EXPECT_EQ(test::HealthStatus(channel_), 1);
  EXPECT_EQ(test::HealthStatus(channel_, kReadinessServiceName), 1);
  grpc::ClientContext next_context;
  v1::GenerateResponse response;
  const grpc::Status next = stub_->Generate(&next_context, GreedyRequest(), &response);
  EXPECT_TRUE(next.ok()) << next.error_message();
}

// A sticky backend failure (a CUDA error) ends the running requests with INTERNAL, turns liveness
// and readiness NOT_SERVING for good, sets the failed metric, and new requests get UNAVAILABLE.
TEST_F(ServerTest, StickyBackendFailureTurnsTheServerNotServing) {
  const grpc::Status status =
      FailWhileStreaming(absl::InternalError("device lost"), /*sticky=*/true);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INTERNAL);
  EXPECT_THAT(status.error_message(), HasSubstr("device lost"));
  ASSERT_TRUE(test::WaitUntil([&] { return metrics_.failed.load() != 0; }))
      << "the failed metric was not set";
  EXPECT_EQ(metrics_.failed.load(), 1);
  EXPECT_EQ(metrics_.errors.load(), 1);
  EXPECT_EQ(test::HealthStatus(channel_), 2);
  EXPECT_EQ(test::HealthStatus(channel_, kReadinessServiceName), 2);
  grpc::ClientContext next_context;
  v1::GenerateResponse response;
  const grpc::Status next = stub_->Generate(&next_context, GreedyRequest(), &response);
  EXPECT_EQ(next.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(next.error_message(), HasSubstr("the engine failed"));
}

TEST_F(ServerTest, AStuckEngineTurnsLivenessNotServingUntilItMoves) {
  // The server binary's wiring (main.cc): the watchdog's listener drives liveness. The watchdog
  // is checked with the test's clock; the engine is held in its step callback.
  engine::WatchdogOptions options;
  options.timeout = absl::Seconds(30);
  PS_ASSERT_OK_AND_ASSIGN(
      std::unique_ptr<engine::EngineWatchdog> watchdog,
      engine::EngineWatchdog::Create(scheduler_.get(), options,
                                     MakeWatchdogListener({server_->GetHealthCheckService()},
                                                          /*metrics=*/nullptr, engine_health_)));
  HoldEngine(true);
  grpc::ClientContext context;
  auto stream = stub_->GenerateStream(&context, GreedyRequest(kLong));
  for (int i = 0; i < 3000 && scheduler_->Progress().phase != engine::EnginePhase::kStepCallback;
       ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_EQ(scheduler_->Progress().phase, engine::EnginePhase::kStepCallback);
  const absl::Time t0 = absl::Now();
  EXPECT_FALSE(watchdog->Check(t0));
  EXPECT_EQ(test::HealthStatus(channel_), 1);
  EXPECT_TRUE(watchdog->Check(t0 + absl::Seconds(30)));
  EXPECT_EQ(test::HealthStatus(channel_), 2);                         // liveness NOT_SERVING
  EXPECT_EQ(test::HealthStatus(channel_, kReadinessServiceName), 1);  // readiness is the drain's
  const uint64_t stuck_at = scheduler_->Progress().sequence;
  HoldEngine(false);
  for (int i = 0; i < 3000 && scheduler_->Progress().sequence == stuck_at; ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_FALSE(watchdog->Check(t0 + absl::Seconds(31)));
  EXPECT_EQ(test::HealthStatus(channel_), 1);
  context.TryCancel();
  v1::GenerateStreamResponse message;
  while (stream->Read(&message)) {
  }
  EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(test::WaitSlotsFree(*scheduler_));
}

// A failure is for good: the watchdog's listener, told that the engine moves again (as it does
// when a failed engine ends its requests), leaves liveness NOT_SERVING and says so.
TEST_F(ServerTest, AWatchdogRecoveryAfterAnEngineFailureLeavesLivenessNotServing) {
  const engine::EngineWatchdog::Listener watchdog =
      MakeWatchdogListener({server_->GetHealthCheckService()}, /*metrics=*/nullptr, engine_health_);
  engine::WatchdogEvent stalled;
  stalled.stalled = true;
  watchdog(stalled);
  EXPECT_EQ(test::HealthStatus(channel_), 2);
  engine::WatchdogEvent moving;
  watchdog(moving);  // before a failure, a recovery turns liveness SERVING again
  EXPECT_EQ(test::HealthStatus(channel_), 1);

  EXPECT_EQ(FailWhileStreaming(absl::InternalError("device lost"), /*sticky=*/true).error_code(),
            grpc::StatusCode::INTERNAL);
  ASSERT_TRUE(test::WaitUntil([&] { return metrics_.failed.load() == 1; }));
  EXPECT_EQ(test::HealthStatus(channel_), 2);
  watchdog(stalled);
  watchdog(moving);
  EXPECT_EQ(test::HealthStatus(channel_), 2);
  EXPECT_EQ(test::HealthStatus(channel_, kReadinessServiceName), 2);
  EXPECT_EQ(WatchdogLogLine(moving, /*engine_failed=*/true),
            "watchdog: engine progressing again after 0 without progress; liveness stays "
            "NOT_SERVING (the engine failed)");
}

TEST(WatchdogLogLineTest, SaysHowLongWhereAndWhat) {
  engine::WatchdogEvent event;
  event.stalled = true;
  event.without_progress = absl::Milliseconds(30250);
  event.phase = engine::EnginePhase::kDecoding;
  event.running = 4;
  EXPECT_EQ(WatchdogLogLine(event),
            "watchdog: engine stalled: no progress for 30.2s while decoding, 4 requests running; "
            "liveness NOT_SERVING");
  event.running = 1;
  EXPECT_EQ(WatchdogLogLine(event),
            "watchdog: engine stalled: no progress for 30.2s while decoding, 1 request running; "
            "liveness NOT_SERVING");
  event.stalled = false;
  event.without_progress = absl::Seconds(42);
  EXPECT_EQ(WatchdogLogLine(event),
            "watchdog: engine progressing again after 42s without progress; liveness SERVING");
}

TEST(ServerLoadingTest, UnavailableUntilSchedulerIsSet) {
  GenerationService service(ServiceOptions{}, nullptr);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  auto stub = v1::GenerationService::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  v1::GenerateRequest request;
  request.set_text("hi");
  v1::GenerateResponse response;
  EXPECT_EQ(stub->Generate(&context, request, &response).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  server->Shutdown();
}

// Sessions over the wire: two turns of a session equal one request over the whole conversation,
// an exported state imported as a new session continues identically, and the errors are the
// documented codes.
TEST_F(ServerTest, SessionsExportAndImportOverTheWire) {
  auto generate = [&](const std::vector<int32_t>& prompt, const std::string& session, int n,
                      v1::GenerateResponse* response) {
    v1::GenerateRequest request;
    request.mutable_token_ids()->mutable_ids()->Assign(prompt.begin(), prompt.end());
    request.mutable_sampling()->set_temperature(0);
    request.set_max_new_tokens(n);
    request.set_session_id(session);
    grpc::ClientContext context;
    return stub_->Generate(&context, request, response);
  };
  auto ids = [](const v1::GenerateResponse& r) {
    std::vector<int32_t> out;
    for (const auto& t : r.tokens()) out.push_back(t.token_id());
    return out;
  };
  v1::OpenSessionResponse opened;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(stub_->OpenSession(&context, {}, &opened).ok());
  }
  const std::vector<int32_t> turn1(golden_.tokens.begin(), golden_.tokens.begin() + 20);
  const std::vector<int32_t> turn2 = {5, 6, 7, 8, 9, 10};
  v1::GenerateResponse r1, r2, whole;
  ASSERT_TRUE(generate(turn1, opened.session_id(), 8, &r1).ok());
  ASSERT_TRUE(generate(turn2, opened.session_id(), 8, &r2).ok());
  EXPECT_EQ(r2.final().cached_tokens(), 20u + 7u);
  std::vector<int32_t> conversation = turn1;
  for (int32_t t : ids(r1)) conversation.push_back(t);
  conversation.insert(conversation.end(), turn2.begin(), turn2.end());
  ASSERT_TRUE(generate(conversation, "", 8, &whole).ok());
  EXPECT_EQ(ids(r2), ids(whole));

  v1::ExportStateRequest export_request;
  export_request.set_session_id(opened.session_id());
  v1::ExportStateResponse exported;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(stub_->ExportState(&context, export_request, &exported).ok());
  }
  EXPECT_EQ(exported.tokens(), 20u + 8u + 6u + 8u);
  v1::ImportStateRequest import_request;
  import_request.set_state(exported.state());
  v1::ImportStateResponse imported;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(stub_->ImportState(&context, import_request, &imported).ok());
  }
  EXPECT_NE(imported.session_id(), opened.session_id());
  v1::GenerateResponse a, b;
  ASSERT_TRUE(generate({11, 12, 13}, opened.session_id(), 6, &a).ok());
  ASSERT_TRUE(generate({11, 12, 13}, imported.session_id(), 6, &b).ok());
  EXPECT_EQ(ids(a), ids(b));

  // Errors.
  v1::GenerateResponse ignored;
  EXPECT_EQ(generate({1}, "0123456789abcdef0123456789abcdef", 2, &ignored).error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(generate({1}, "bad\nid", 2, &ignored).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  import_request.mutable_state()->back() ^= 1;
  {
    grpc::ClientContext context;
    const grpc::Status status = stub_->ImportState(&context, import_request, &imported);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(status.error_message(), HasSubstr("checksum"));
  }
  v1::CloseSessionRequest close;
  close.set_session_id(opened.session_id());
  v1::CloseSessionResponse closed;
  {
    grpc::ClientContext context;
    EXPECT_TRUE(stub_->CloseSession(&context, close, &closed).ok());
  }
  {
    grpc::ClientContext context;
    EXPECT_EQ(stub_->CloseSession(&context, close, &closed).error_code(),
              grpc::StatusCode::NOT_FOUND);
  }
  v1::ModelInfo info;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(stub_->GetModelInfo(&context, {}, &info).ok());
  }
  EXPECT_EQ(info.state_reuse().model_fingerprint().size(), 16u);
  EXPECT_EQ(info.state_reuse().session_budget_bytes(), uint64_t{64} << 20);
  EXPECT_GT(info.state_reuse().session_bytes(), info.state_bytes_per_request());
  EXPECT_TRUE(test::WaitSlotsFree(*scheduler_));
}

// A session the server does not know is the caller's error: the refusal counts as validation
// (polysketch_request_failure_total{reason="validation"}), never as internal, which pages.
TEST_F(ServerTest, UnknownSessionIsCountedAsAClientErrorNotInternal) {
  v1::GenerateRequest request = GreedyRequest(2);
  request.set_session_id("0123456789abcdef0123456789abcdef");
  v1::GenerateResponse response;
  {
    grpc::ClientContext context;
    const grpc::Status status = stub_->Generate(&context, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
    EXPECT_THAT(status.error_message(), HasSubstr("not found"));
  }
  {
    grpc::ClientContext context;
    auto stream = stub_->GenerateStream(&context, request);
    v1::GenerateStreamResponse message;
    while (stream->Read(&message)) {
    }
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::NOT_FOUND);
  }
  EXPECT_EQ(metrics_.Refused(metrics::FailureReason::kValidation), 2);
  EXPECT_EQ(metrics_.Refused(metrics::FailureReason::kInternal), 0);
}

}  // namespace
}  // namespace ps::service
