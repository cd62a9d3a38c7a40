// TLS, bearer tokens and the per-request limits of the generation service over loopback: a real
// grpc::Server on 127.0.0.1:0 over a real Scheduler, with certificates made at test time by
// tests/testing/make_test_certs.sh (openssl). Checks TLS and mutual TLS end to end (and refusals
// without a trusted client certificate), UNAUTHENTICATED for a missing or wrong token with nothing
// leaked, health reachable without a token, the prompt-bytes limits, and a stream whose client
// never reads: cancelled with RESOURCE_EXHAUSTED, its slot back, counted in the metrics.
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include <absl/strings/str_cat.h>
#include <absl/time/clock.h>
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <gtest/gtest.h>

#include "kernels/cpu/cpu_backend.h"
#include "server/service/auth.h"
#include "server/service/generation_service.h"
#include "server/service/tls.h"
#include "tests/testing/files.h"
#include "tests/testing/golden.h"
#include "tests/testing/health_check.h"
#include "tests/testing/scheduler_fixture.h"
#include "tests/testing/status_matchers.h"

namespace ps::service {
namespace {

namespace v1 = ::polysketch::v1;
using test::StatusIs;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kFixture[] = "polysketch-learned-local";
constexpr int kLong = 1 << 20;
constexpr char kAliceToken[] = "alice-0123456789abcdef0123456789";
constexpr char kWrongToken[] = "alice-0123456789abcdef012345678X";

// Counts the security events; the rest of the interface is not under test here.
class CountingMetrics final : public metrics::ServerMetrics {
 public:
  int port() const override { return 0; }
  void RequestFinished(const engine::FinalResult&) override {}
  void InterTokenLatency(absl::Duration, int64_t) override {}
  void RequestRefused(metrics::FailureReason) override {}
  void EngineStep(const engine::StepStats&) override {}
  void SetScheduler(const engine::SchedulerStats&) override {}
  void SetAttentionMemory(absl::string_view, int64_t) override {}
  void AuthFailure() override { ++auth_failures; }
  void StreamBufferOverflow() override { ++stream_overflows; }
  std::atomic<int> auth_failures{0};
  std::atomic<int> stream_overflows{0};
};

std::string Read(const std::string& path) { return test::ReadFile(path); }

class SecurityTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    certs_ = new test::TempDir();
    const std::string command =
        absl::StrCat("bash ", test::SourcePath("tests/testing/make_test_certs.sh"), " ",
                     certs_->path(), " > /dev/null 2>&1");
    ASSERT_EQ(std::system(command.c_str()), 0) << "make_test_certs.sh failed (openssl?)";
  }
  static void TearDownTestSuite() {
    delete certs_;
    certs_ = nullptr;
  }
  static std::string Cert(const char* name) { return certs_->Join(name); }

  void TearDown() override { Stop(); }

  // A server with `options` (model fields filled in here) and `credentials`.
  void Start(ServiceOptions options, std::shared_ptr<grpc::ServerCredentials> credentials) {
    PS_ASSERT_OK_AND_ASSIGN(golden_, test::LoadGoldenFixture(kFixture));
    backend_ = std::make_unique<kernels::cpu::CpuBackend>(2);
    engine::ModelOptions model_options;
    model_options.num_slots = 2;
    model_options.max_batch = 2;
    engine::SchedulerOptions scheduler_options;
    scheduler_options.sessions.budget_bytes = int64_t{64} << 20;  // session calls are checked too
    scheduler_ =
        test::MakeModelScheduler(golden_.model_dir, *backend_, model_options, scheduler_options);
    ASSERT_NE(scheduler_, nullptr);
    options.model_name = kFixture;
    options.max_prompt_tokens = 4096;
    options.max_new_tokens_limit = kLong;
    service_ = std::make_unique<GenerationService>(options, &metrics_);
    service_->SetScheduler(scheduler_.get());
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", credentials, &port_);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port_, 0);
    server_->GetHealthCheckService()->SetServingStatus(kReadinessServiceName, true);
  }

  void Stop() {
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    server_.reset();
    scheduler_.reset();
    service_.reset();
  }

  std::shared_ptr<grpc::Channel> Plaintext() {
    return grpc::CreateChannel(absl::StrCat("127.0.0.1:", port_),
                               grpc::InsecureChannelCredentials());
  }
  // TLS to "localhost" (the name in server.crt), optionally with a client certificate.
  std::shared_ptr<grpc::Channel> Tls(const char* client_cert = nullptr,
                                     const char* client_key = nullptr) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = Read(Cert("ca.crt"));
    if (client_cert != nullptr) {
      ssl.pem_cert_chain = Read(Cert(client_cert));
      ssl.pem_private_key = Read(Cert(client_key));
    }
    return grpc::CreateChannel(absl::StrCat("localhost:", port_), grpc::SslCredentials(ssl));
  }

  v1::GenerateRequest Request(int max_new_tokens) const {
    v1::GenerateRequest request;
    request.set_text("In the beginning");
    request.mutable_sampling()->set_temperature(0);
    request.set_max_new_tokens(max_new_tokens);
    return request;
  }

  grpc::Status Generate(const std::shared_ptr<grpc::Channel>& channel,
                        const v1::GenerateRequest& request, const std::string& authorization = "") {
    auto stub = v1::GenerationService::NewStub(channel);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    if (!authorization.empty()) context.AddMetadata("authorization", authorization);
    v1::GenerateResponse response;
    return stub->Generate(&context, request, &response);
  }

  static test::TempDir* certs_;
  test::GoldenFixture golden_;
  CountingMetrics metrics_;
  std::unique_ptr<kernels::cpu::CpuBackend> backend_;
  std::unique_ptr<engine::Scheduler> scheduler_;
  std::unique_ptr<GenerationService> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

test::TempDir* SecurityTest::certs_ = nullptr;

TEST_F(SecurityTest, ServerCredentialsRefuseBadFilesWithClearErrors) {
  TlsFiles files;
  EXPECT_THAT(MakeServerCredentials(files), test::IsOk());  // plaintext
  files.cert = Cert("server.crt");
  EXPECT_THAT(MakeServerCredentials(files),
              StatusIs(absl::StatusCode::kInvalidArgument, "--tls_cert and --tls_key go together"));
  files.key = Cert("other.key");
  EXPECT_THAT(MakeServerCredentials(files),
              StatusIs(absl::StatusCode::kInvalidArgument, "is not the key of the certificate"));
  files.key = Cert("no-such.key");
  EXPECT_THAT(MakeServerCredentials(files), StatusIs(absl::StatusCode::kNotFound, "no-such.key"));
  files.cert = Cert("server.key");  // a key where the certificate should be
  files.key = Cert("server.key");
  EXPECT_THAT(MakeServerCredentials(files),
              StatusIs(absl::StatusCode::kInvalidArgument, "holds no PEM certificate"));
  files.cert = Cert("server.crt");
  files.client_ca = Cert("ca.key");
  EXPECT_THAT(MakeServerCredentials(files),
              StatusIs(absl::StatusCode::kInvalidArgument, "--tls_client_ca"));
}

TEST_F(SecurityTest, TlsEndToEndAndPlaintextClientRefused) {
  PS_ASSERT_OK_AND_ASSIGN(auto credentials,
                          MakeServerCredentials({Cert("server.crt"), Cert("server.key"), ""}));
  Start(ServiceOptions(), credentials);
  const grpc::Status ok = Generate(Tls(), Request(8));
  EXPECT_TRUE(ok.ok()) << ok.error_message();
  EXPECT_EQ(test::HealthStatus(Tls()), 1);
  EXPECT_EQ(Generate(Plaintext(), Request(8)).error_code(), grpc::StatusCode::UNAVAILABLE);
}

TEST_F(SecurityTest, MutualTlsNeedsAClientCertificateFromTheClientCa) {
  PS_ASSERT_OK_AND_ASSIGN(
      auto credentials,
      MakeServerCredentials({Cert("server.crt"), Cert("server.key"), Cert("ca.crt")}));
  Start(ServiceOptions(), credentials);
  const grpc::Status ok = Generate(Tls("client.crt", "client.key"), Request(8));
  EXPECT_TRUE(ok.ok()) << ok.error_message();
  EXPECT_EQ(Generate(Tls(), Request(8)).error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(Generate(Tls("rogue-client.crt", "rogue-client.key"), Request(8)).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(test::HealthStatus(Tls()), 1);  // no certificate, no connection at all
}

TEST_F(SecurityTest, TokensMissingWrongAndRightAndHealthWithoutToken) {
  PS_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Authenticator> auth,
                          Authenticator::FromText(absl::StrCat("alice:", kAliceToken)));
  ServiceOptions options;
  options.authenticator = std::move(auth);
  Start(options, grpc::InsecureServerCredentials());
  auto channel = Plaintext();

  const grpc::Status missing = Generate(channel, Request(4));
  EXPECT_EQ(missing.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_THAT(missing.error_message(), HasSubstr("missing credentials"));
  const grpc::Status wrong = Generate(channel, Request(4), absl::StrCat("Bearer ", kWrongToken));
  EXPECT_EQ(wrong.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(wrong.error_message(), "invalid credentials");  // no echo, no hint
  const grpc::Status right = Generate(channel, Request(4), absl::StrCat("Bearer ", kAliceToken));
  EXPECT_TRUE(right.ok()) << right.error_message();
  EXPECT_EQ(metrics_.auth_failures.load(), 2);

  // Every GenerationService method needs the token; the stream is refused before any message.
  auto stub = v1::GenerationService::NewStub(channel);
  {
    grpc::ClientContext context;
    auto reader = stub->GenerateStream(&context, Request(4));
    v1::GenerateStreamResponse message;
    EXPECT_FALSE(reader->Read(&message));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext context;
    v1::TokenizeRequest request;
    request.set_text("hi");
    v1::TokenizeResponse response;
    EXPECT_EQ(stub->Tokenize(&context, request, &response).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext context;
    v1::ModelInfo info;
    EXPECT_EQ(stub->GetModelInfo(&context, v1::GetModelInfoRequest(), &info).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext context;
    v1::CancelRequest request;
    request.set_request_id("x");
    v1::CancelResponse response;
    EXPECT_EQ(stub->Cancel(&context, request, &response).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  EXPECT_EQ(test::HealthStatus(channel), 1);  // probes need no token
}

TEST_F(SecurityTest, RequestIdsArePerIdentity) {
  constexpr char kBobToken[] = "bob-0123456789abcdef0123456789ab";
  PS_ASSERT_OK_AND_ASSIGN(
      std::unique_ptr<Authenticator> auth,
      Authenticator::FromText(absl::StrCat("alice:", kAliceToken, "\nbob:", kBobToken)));
  ServiceOptions options;
  options.authenticator = std::move(auth);
  Start(options, grpc::InsecureServerCredentials());
  auto stub = v1::GenerationService::NewStub(Plaintext());
  const std::string alice = absl::StrCat("Bearer ", kAliceToken);
  const std::string bob = absl::StrCat("Bearer ", kBobToken);
  auto cancel = [&](const std::string& authorization) {
    grpc::ClientContext context;
    context.AddMetadata("authorization", authorization);
    v1::CancelRequest request;
    request.set_request_id("job-1");
    v1::CancelResponse response;
    return stub->Cancel(&context, request, &response);
  };

  v1::GenerateRequest request = Request(kLong);
  request.set_request_id("job-1");
  grpc::ClientContext alice_context;
  alice_context.AddMetadata("authorization", alice);
  auto alice_stream = stub->GenerateStream(&alice_context, request);
  v1::GenerateStreamResponse message;
  ASSERT_TRUE(alice_stream->Read(&message));
  EXPECT_EQ(message.request_id(), "job-1");  // the client's id, without the identity
  // Bob can neither cancel alice's job-1 (it does not exist for him) nor collide with it.
  const grpc::Status bob_cancel = cancel(bob);
  EXPECT_EQ(bob_cancel.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(bob_cancel.error_message(), "no unfinished request has id \"job-1\"");
  request.set_max_new_tokens(4);
  const grpc::Status bob_job = Generate(Plaintext(), request, bob);
  EXPECT_TRUE(bob_job.ok()) << bob_job.error_message();
  // Alice's own duplicate is refused, naming her id; her cancel works.
  const grpc::Status duplicate = Generate(Plaintext(), request, alice);
  EXPECT_EQ(duplicate.error_code(), grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_EQ(duplicate.error_message(), "request_id \"job-1\" is already in use");
  EXPECT_TRUE(cancel(alice).ok());
  while (alice_stream->Read(&message)) {
  }
  EXPECT_EQ(alice_stream->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(test::WaitSlotsFree(*scheduler_));
}

TEST_F(SecurityTest, SessionCallsNeedATokenAndSessionsBelongToTheirIdentity) {
  constexpr char kBobToken[] = "bob-0123456789abcdef0123456789ab";
  PS_ASSERT_OK_AND_ASSIGN(
      std::unique_ptr<Authenticator> auth,
      Authenticator::FromText(absl::StrCat("alice:", kAliceToken, "\nbob:", kBobToken)));
  ServiceOptions options;
  options.authenticator = std::move(auth);
  Start(options, grpc::InsecureServerCredentials());
  auto stub = v1::GenerationService::NewStub(Plaintext());
  auto open = [&](const std::string& authorization, std::string* id) {
    grpc::ClientContext context;
    if (!authorization.empty()) context.AddMetadata("authorization", authorization);
    v1::OpenSessionResponse response;
    const grpc::Status status = stub->OpenSession(&context, v1::OpenSessionRequest(), &response);
    *id = response.session_id();
    return status;
  };
  auto do_export = [&](const std::string& authorization, const std::string& id) {
    grpc::ClientContext context;
    if (!authorization.empty()) context.AddMetadata("authorization", authorization);
    v1::ExportStateRequest request;
    request.set_session_id(id);
    v1::ExportStateResponse response;
    return stub->ExportState(&context, request, &response);
  };
  std::string id;
  EXPECT_EQ(open("", &id).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  const std::string alice = absl::StrCat("Bearer ", kAliceToken);
  const std::string bob = absl::StrCat("Bearer ", kBobToken);
  ASSERT_TRUE(open(alice, &id).ok());
  EXPECT_EQ(do_export("", id).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(do_export(bob, id).error_code(), grpc::StatusCode::NOT_FOUND);  // not his
  // Generating in alice's session: bob cannot, alice can.
  v1::GenerateRequest request = Request(4);
  request.set_session_id(id);
  EXPECT_EQ(Generate(Plaintext(), request, bob).error_code(), grpc::StatusCode::NOT_FOUND);
  const grpc::Status in_session = Generate(Plaintext(), request, alice);
  EXPECT_TRUE(in_session.ok()) << in_session.error_message();
  const grpc::Status exported = do_export(alice, id);
  EXPECT_TRUE(exported.ok()) << exported.error_message();
  {
    grpc::ClientContext context;
    context.AddMetadata("authorization", bob);
    v1::CloseSessionRequest close;
    close.set_session_id(id);
    v1::CloseSessionResponse response;
    EXPECT_EQ(stub->CloseSession(&context, close, &response).error_code(),
              grpc::StatusCode::NOT_FOUND);
  }
}

TEST_F(SecurityTest, PromptBytesPerRequestAndInFlight) {
  ServiceOptions options;
  options.max_prompt_bytes = 1000;
  options.max_inflight_prompt_bytes = 1500;
  Start(options, grpc::InsecureServerCredentials());
  auto channel = Plaintext();

  v1::GenerateRequest big = Request(4);
  big.set_text(std::string(1001, 'a'));
  grpc::Status status = Generate(channel, big);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("--max_prompt_bytes"));
  v1::GenerateRequest ids = Request(4);
  for (int i = 0; i < 251; ++i) ids.mutable_token_ids()->add_ids(97);  // 1004 bytes as int32
  EXPECT_EQ(Generate(channel, ids).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  {
    auto stub = v1::GenerationService::NewStub(channel);
    grpc::ClientContext context;
    v1::TokenizeRequest request;
    request.set_text(std::string(1001, 'a'));
    v1::TokenizeResponse response;
    const grpc::Status tokenize = stub->Tokenize(&context, request, &response);
    EXPECT_EQ(tokenize.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(tokenize.error_message(), HasSubstr("--max_prompt_bytes"));
  }

  // 1000 bytes held by a running stream: another 600 do not fit 1500, until it ends.
  v1::GenerateRequest running = Request(kLong);
  running.set_text(std::string(1000, 'a'));
  auto stub = v1::GenerationService::NewStub(channel);
  grpc::ClientContext context;
  auto reader = stub->GenerateStream(&context, running);
  v1::GenerateStreamResponse message;
  ASSERT_TRUE(reader->Read(&message));
  EXPECT_EQ(service_->inflight_prompt_bytes(), 1000);
  v1::GenerateRequest second = Request(4);
  second.set_text(std::string(600, 'b'));
  status = Generate(channel, second);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(status.error_message(), HasSubstr("--max_inflight_prompt_bytes=1500"));
  context.TryCancel();
  while (reader->Read(&message)) {
  }
  reader->Finish().IgnoreError();
  EXPECT_TRUE(test::WaitSlotsFree(*scheduler_));
  for (int i = 0; i < 250 && service_->inflight_prompt_bytes() != 0; ++i) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_EQ(service_->inflight_prompt_bytes(), 0);
  status = Generate(channel, second);
  EXPECT_TRUE(status.ok()) << status.error_message();
}

TEST_F(SecurityTest, StreamClientThatNeverReadsIsCancelledAndCounted) {
  ServiceOptions options;
  options.max_stream_buffer_bytes = 64 << 10;
  Start(options, grpc::InsecureServerCredentials());
  auto stub = v1::GenerationService::NewStub(Plaintext());
  v1::GenerateRequest request = Request(kLong);
  request.mutable_sampling()->set_temperature(1);
  request.set_logprobs(true);
  request.set_top_logprobs(20);  // ~350 bytes per token: the bound is reached within seconds
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  auto reader = stub->GenerateStream(&context, request);  // and no Read for now
  for (int i = 0; i < 3000 && metrics_.stream_overflows.load() == 0; ++i) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  ASSERT_EQ(metrics_.stream_overflows.load(), 1) << "the server kept buffering";
  EXPECT_TRUE(test::WaitSlotsFree(*scheduler_));  // the engine request was cancelled
  // The client finally reads: what was in flight, then the status naming the limit.
  v1::GenerateStreamResponse message;
  while (reader->Read(&message)) {
  }
  const grpc::Status status = reader->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(status.error_message(), HasSubstr("--max_stream_buffer_bytes"));
  EXPECT_EQ(metrics_.stream_overflows.load(), 1);
}

}  // namespace
}  // namespace ps::service
