// polysketch-server: serves one model directory over gRPC (GenerationService, grpc.health.v1,
// reflection) with Prometheus metrics on their own port. Wiring, flags, signals and the drain:
// SIGTERM / SIGINT -> readiness NOT_SERVING, no new requests (UNAVAILABLE), running ones get
// --drain_timeout to finish, the rest are cancelled, then exit 0. Errors at start (bad flag,
// model, busy port) print one line to stderr and exit 1.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <signal.h>
#include <string>
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
#include "server/engine/model.h"
#include "server/engine/scheduler.h"
#include "server/engine/weights.h"
#include "server/metrics/metrics.h"
#include "server/service/generation_service.h"

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
ABSL_FLAG(int64_t, prefill_tokens_per_step, 512,
          "Prompt tokens prefilled per engine step, interleaved with decode steps.");
ABSL_FLAG(int32_t, threads, 0, "CPU threads for the kernels; 0 = all cores.");
ABSL_FLAG(std::string, device, "auto",
          "Kernel backend: auto (CUDA when built with it and a GPU is visible, else CPU), cpu, "
          "cuda.");
ABSL_FLAG(absl::Duration, drain_timeout, absl::Seconds(30),
          "On SIGTERM/SIGINT: how long running requests may take to finish before they are "
          "cancelled.");

namespace {

namespace engine = ::ps::engine;
namespace service = ::ps::service;

constexpr char kUsage[] =
    "Serves a polysketch model over gRPC with Prometheus metrics.\n"
    "  polysketch-server --model DIR [--port 50051] [--metrics_port 9464] [flags]";

absl::Status CheckFlags() {
  if (absl::GetFlag(FLAGS_model).empty()) {
    return absl::InvalidArgumentError("--model is required (see --help)");
  }
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
           {"threads", absl::GetFlag(FLAGS_threads)}}) {
    if (value < 0) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, ": must be >= 0, got ", value));
    }
  }
  if (absl::GetFlag(FLAGS_max_new_tokens_limit) > int64_t{1} << 31) {
    return absl::InvalidArgumentError("--max_new_tokens_limit: must be at most 2^31");
  }
  if (absl::GetFlag(FLAGS_drain_timeout) < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--drain_timeout: must not be negative");
  }
  return absl::OkStatus();
}

// Attention memory per slot by kind name: what SetAttentionMemory reports times slots used.
std::map<std::string, int64_t> BytesPerSlotByKind(const engine::StateLayout& layout) {
  std::map<std::string, int64_t> bytes;
  for (const engine::LayerStateLayout& layer : layout.layers()) {
    bytes[std::string(engine::AttentionKindName(layer.kind))] += layer.bytes();
  }
  return bytes;
}

absl::Status Serve(const sigset_t& signals) {
  PS_RETURN_IF_ERROR(CheckFlags());
  const std::string model_dir = absl::GetFlag(FLAGS_model);
  const std::string host = absl::GetFlag(FLAGS_host);
  const std::string metrics_host = absl::GetFlag(FLAGS_metrics_host);

  // The gRPC server first: liveness is SERVING and readiness NOT_SERVING while the model loads.
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

  const std::string metrics_address =
      absl::StrCat(metrics_host, ":", absl::GetFlag(FLAGS_metrics_port));
  PS_ASSIGN_OR_RETURN(std::unique_ptr<ps::metrics::ServerMetrics> metrics,
                      ps::metrics::ServerMetrics::Create(metrics_address));
  service::GenerationService generation(options, metrics.get());

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  const std::string address = absl::StrCat(host, ":", absl::GetFlag(FLAGS_port));
  int port = 0;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&generation);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", address, " (port in use or bad address)"));
  }
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  health->SetServingStatus("", true);
  health->SetServingStatus(service::kReadinessServiceName, false);

  // The model and the engine.
  absl::StatusOr<engine::ModelWeights> weights = engine::LoadWeights(model_dir);
  if (!weights.ok()) {
    server->Shutdown(std::chrono::system_clock::now());
    return absl::Status(weights.status().code(), absl::StrCat("cannot load model ", model_dir, ": ",
                                                              weights.status().message()));
  }
  absl::StatusOr<std::unique_ptr<ps::kernels::Backend>> backend_or =
      ps::kernels::CreateBackend(absl::GetFlag(FLAGS_device), absl::GetFlag(FLAGS_threads));
  if (!backend_or.ok()) {
    server->Shutdown(std::chrono::system_clock::now());
    return absl::Status(backend_or.status().code(),
                        absl::StrCat("--device: ", backend_or.status().message()));
  }
  ps::kernels::Backend& backend = **backend_or;
  std::fprintf(stderr, "polysketch-server: kernels on the %s backend\n",
               std::string(backend.name()).c_str());
  engine::ModelOptions model_options;
  model_options.num_slots = absl::GetFlag(FLAGS_slots);
  model_options.max_batch =
      absl::GetFlag(FLAGS_max_batch) > 0 ? absl::GetFlag(FLAGS_max_batch) : model_options.num_slots;
  model_options.prefill_chunk = absl::GetFlag(FLAGS_prefill_chunk);
  model_options.max_context = absl::GetFlag(FLAGS_max_context);
  absl::StatusOr<std::unique_ptr<engine::Model>> model =
      engine::Model::Create(*weights, backend, model_options);
  if (!model.ok()) {
    server->Shutdown(std::chrono::system_clock::now());
    return model.status();
  }
  const std::map<std::string, int64_t> bytes_per_slot = BytesPerSlotByKind((*model)->layout());

  std::atomic<engine::Scheduler*> scheduler_ptr{nullptr};
  ps::metrics::ServerMetrics* const metrics_raw = metrics.get();
  auto refresh_gauges = [&scheduler_ptr, metrics_raw, &bytes_per_slot] {
    engine::Scheduler* scheduler = scheduler_ptr.load();
    if (scheduler == nullptr) return;
    const engine::SchedulerStats stats = scheduler->Stats();
    metrics_raw->SetScheduler(stats);
    for (const auto& [kind, bytes] : bytes_per_slot) {
      metrics_raw->SetAttentionMemory(kind, bytes * stats.slots_used);
    }
  };
  engine::SchedulerOptions scheduler_options;
  scheduler_options.max_waiting = absl::GetFlag(FLAGS_max_waiting);
  scheduler_options.max_waiting_tokens = absl::GetFlag(FLAGS_max_waiting_tokens);
  scheduler_options.prefill_tokens_per_step = absl::GetFlag(FLAGS_prefill_tokens_per_step);
  scheduler_options.on_step = [metrics_raw, &refresh_gauges](const engine::StepStats& step) {
    metrics_raw->EngineStep(step);
    refresh_gauges();
  };
  absl::StatusOr<std::unique_ptr<engine::Scheduler>> scheduler =
      engine::Scheduler::Create(std::move(*model), scheduler_options);
  if (!scheduler.ok()) {
    server->Shutdown(std::chrono::system_clock::now());
    return scheduler.status();
  }
  scheduler_ptr.store(scheduler->get());
  refresh_gauges();
  generation.SetScheduler(scheduler->get());
  health->SetServingStatus(service::kReadinessServiceName, true);
  std::fprintf(stderr, "polysketch-server: serving %s on %s:%d, metrics on %s:%d\n",
               model_dir.c_str(), host.c_str(), port, metrics_host.c_str(), metrics->port());
  std::fflush(stderr);

  // Wait for SIGTERM / SIGINT (blocked in every thread, so only sigwait sees them).
  int signal_number = 0;
  sigwait(&signals, &signal_number);
  std::fprintf(stderr, "polysketch-server: %s: draining (up to %s)\n", strsignal(signal_number),
               absl::FormatDuration(absl::GetFlag(FLAGS_drain_timeout)).c_str());

  health->SetServingStatus(service::kReadinessServiceName, false);
  (*scheduler)->StartDrain();
  const absl::Time drain_end = absl::Now() + absl::GetFlag(FLAGS_drain_timeout);
  while (!(*scheduler)->Idle() && absl::Now() < drain_end) absl::SleepFor(absl::Milliseconds(20));
  const bool drained = (*scheduler)->Idle();
  // Shutdown cancels the calls still open after its deadline; each cancelled call cancels its
  // engine request (done within a step), so Shutdown returns once they have ended. The
  // scheduler outlives every call; destroying it then ends anything left.
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(drained ? 200 : 0));
  refresh_gauges();
  scheduler_ptr.store(nullptr);
  scheduler->reset();
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
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  const absl::Status status = Serve(signals);
  if (!status.ok()) {
    std::fprintf(stderr, "polysketch-server: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  return 0;
}
