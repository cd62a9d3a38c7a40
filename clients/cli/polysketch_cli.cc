// polysketch-cli: a command-line client for polysketch.v1.GenerationService.
// Subcommands: generate (streaming by default, --unary for Generate), info, health, tokenize,
// cancel. Generated text goes to stdout as it arrives; final info and diagnostics to stderr.
// Exit codes: 0 ok, 1 RPC error (the gRPC code name and message are printed), 2 usage.

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <future>
#include <iostream>
#include <iterator>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unistd.h>
#include <vector>

#include <absl/flags/flag.h>
#include <absl/flags/parse.h>
#include <absl/flags/reflection.h>
#include <absl/flags/usage.h>
#include <absl/flags/usage_config.h>
#include <absl/strings/escaping.h>
#include <absl/strings/match.h>
#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_join.h>
#include <absl/strings/str_split.h>
#include <absl/strings/strip.h>
#include <absl/time/time.h>
#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <google/protobuf/wire_format_lite.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/stub_options.h>

#include "clients/common/connection.h"
#include "clients/common/connection_flags.h"
#include "polysketch/v1/generation.grpc.pb.h"

// --- Connection: --target, TLS and token flags in clients/common/connection_flags.h -------------
ABSL_FLAG(absl::Duration, timeout, absl::ZeroDuration(),
          "gRPC deadline for each call (e.g. 30s, 500ms); 0 means none.");

// --- Prompt (generate, tokenize) ----------------------------------------------------------------
ABSL_FLAG(std::string, prompt, "", "Prompt text (generate, tokenize).");
ABSL_FLAG(std::string, prompt_file, "",
          "Read the prompt text from this file instead of --prompt ('-' reads stdin).");
ABSL_FLAG(std::vector<std::string>, prompt_token_ids, {},
          "generate: send these comma-separated token ids as the prompt instead of text.");

// --- generate -----------------------------------------------------------------------------------
ABSL_FLAG(bool, unary, false, "generate: use the unary Generate RPC instead of GenerateStream.");
ABSL_FLAG(std::string, request_id, "",
          "generate: client request id (server assigns one when empty); cancel: the id to cancel.");
ABSL_FLAG(int64_t, max_new_tokens, -1,
          "Most tokens to generate; -1 leaves it unset (server default 256); 0 generates nothing "
          "(scoring a prompt with --prompt_logprobs).");
ABSL_FLAG(int64_t, min_new_tokens, 0, "Stops within the first N generated tokens are ignored.");
ABSL_FLAG(std::string, temperature, "",
          "Sampling temperature, 0 = greedy; empty leaves it unset (server default 1.0).");
ABSL_FLAG(int32_t, top_k, 0, "Top-k sampling; 0 = off.");
ABSL_FLAG(std::string, top_p, "", "Top-p (nucleus) sampling in (0, 1]; empty leaves it unset.");
ABSL_FLAG(double, min_p, 0.0, "Min-p sampling in [0, 1]; 0 = off.");
ABSL_FLAG(std::string, repetition_penalty, "",
          "Repetition penalty in (0, 10]; empty leaves it unset (1.0 = off).");
ABSL_FLAG(double, presence_penalty, 0.0, "Presence penalty in [-2, 2].");
ABSL_FLAG(double, frequency_penalty, 0.0, "Frequency penalty in [-2, 2].");
ABSL_FLAG(std::string, seed, "",
          "Sampling seed (unsigned 64-bit); empty lets the server pick one (reported at the end).");
ABSL_FLAG(std::vector<std::string>, stop, {},
          "Comma-separated stop strings; C escapes such as \\n are decoded.");
ABSL_FLAG(std::vector<std::string>, stop_token_ids, {}, "Comma-separated stop token ids.");
ABSL_FLAG(bool, ignore_eos, false, "Keep generating past the end-of-sequence token.");
ABSL_FLAG(bool, include_stop_string, false, "Keep the matched stop string in the output.");
ABSL_FLAG(bool, logprobs, false, "Request log-probabilities; printed per token to stderr.");
ABSL_FLAG(int64_t, top_logprobs, 0, "Also request this many top alternatives per token (0..20).");
ABSL_FLAG(bool, prompt_logprobs, false,
          "Request the log-probability of every prompt token after the first (teacher-forced); "
          "printed per prompt token to stderr before the generated text's.");
ABSL_FLAG(int64_t, prompt_top_logprobs, 0,
          "Also request this many top alternatives per prompt position (0..20; needs "
          "--prompt_logprobs).");
ABSL_FLAG(int64_t, time_limit_ms, 0, "Server-side time limit in milliseconds; 0 = none.");
ABSL_FLAG(bool, quiet, false, "generate: do not print the final info to stderr.");
ABSL_FLAG(std::string, cache_salt, "",
          "generate: the request's cache salt (GenerateRequest.cache_salt): it shares prefix-cache "
          "hits only with requests of the same salt.");
ABSL_FLAG(std::string, session, "",
          "generate: continue this session (open-session prints one); close-session, "
          "export-state: the session.");
ABSL_FLAG(std::string, state_file, "",
          "export-state: write the state here; import-state: read it from here.");

namespace {

namespace pb = ::polysketch::v1;

constexpr int kExitOk = 0;
constexpr int kExitRpcError = 1;
constexpr int kExitUsage = 2;

constexpr char kUsage[] =
    "polysketch-cli <subcommand> [flags]\n"
    "\n"
    "Subcommands:\n"
    "  generate   Generate text (streams by default; --unary for one response).\n"
    "             Text goes to stdout as it arrives; finish reason, token counts, seed and\n"
    "             timings go to stderr.\n"
    "  info       Print the served model (GetModelInfo).\n"
    "  health     Check grpc.health.v1 for \"\" and \"polysketch.v1.GenerationService\";\n"
    "             exit 0 only when both are SERVING.\n"
    "  tokenize   Print the token ids of --prompt / --prompt_file.\n"
    "  cancel     Cancel the running request --request_id.\n"
    "  open-session    Open a session; prints its id (use with generate --session).\n"
    "  close-session   Close --session.\n"
    "  export-state    Write the state of --session to --state_file.\n"
    "  import-state    Make a new session from --state_file; prints its id.\n"
    "\n"
    "Exit codes: 0 ok, 1 RPC error (gRPC code name and message on stderr), 2 usage.\n"
    "Example: polysketch-cli generate --prompt 'Once upon' --max_new_tokens 64 --temperature 0";

// A usage error: message to stderr, exit code 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

const char* CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    default:
      return "UNKNOWN_CODE";
  }
}

int ReportRpcError(absl::string_view what, const grpc::Status& status) {
  std::cerr << "polysketch-cli: " << what << " failed: " << CodeName(status.error_code()) << ": "
            << status.error_message() << "\n";
  return kExitRpcError;
}

// Abseil exits with code 1 on an unknown flag or an unparsable value; this CLI promises 2. So
// every flag on the command line is checked (and parsed once) before absl::ParseCommandLine.
void CheckFlagsOrExit(int argc, char** argv) {
  static const char* const kBuiltin[] = {"help",     "helpfull",  "helpshort",  "helppackage",
                                         "helpon",   "helpmatch", "version",    "only_check_args",
                                         "flagfile", "fromenv",   "tryfromenv", "undefok"};
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (arg == "--") break;
    if (arg.size() < 2 || arg[0] != '-') continue;
    arg.remove_prefix(arg[1] == '-' ? 2 : 1);
    const size_t eq = arg.find('=');
    const absl::string_view name = arg.substr(0, eq);
    bool builtin = false;
    for (const char* b : kBuiltin) builtin = builtin || name == b;
    if (builtin) continue;
    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    if (flag == nullptr && absl::StartsWith(name, "no") && eq == absl::string_view::npos) {
      absl::CommandLineFlag* positive = absl::FindCommandLineFlag(name.substr(2));
      if (positive != nullptr && positive->IsOfType<bool>()) continue;
    }
    if (flag == nullptr) {
      std::cerr << "polysketch-cli: unknown flag --" << name << " (see --help)\n";
      std::exit(kExitUsage);
    }
    std::string value;
    if (eq != absl::string_view::npos) {
      value = std::string(arg.substr(eq + 1));
    } else if (flag->IsOfType<bool>()) {
      continue;
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      std::cerr << "polysketch-cli: flag --" << name << " is missing its value\n";
      std::exit(kExitUsage);
    }
    std::string error;
    if (!flag->ParseFrom(value, &error)) {
      std::cerr << "polysketch-cli: bad value for --" << name << ": " << error << "\n";
      std::exit(kExitUsage);
    }
  }
}

// The connection every call goes through (set once in main).
ps::clients::Connection* g_connection = nullptr;

std::unique_ptr<grpc::ClientContext> MakeContext() {
  auto context = std::make_unique<grpc::ClientContext>();
  if (g_connection != nullptr) ps::clients::Authorize(*g_connection, context.get());
  // Session-aware routing: a proxy in front of several replicas (docs/deploy.md, "Shared
  // sessions") hashes this header, so every turn of a session reaches the pod that holds it.
  if (const std::string session = absl::GetFlag(FLAGS_session); !session.empty()) {
    context->AddMetadata("x-polysketch-session", session);
  }
  const absl::Duration timeout = absl::GetFlag(FLAGS_timeout);
  if (timeout < absl::ZeroDuration()) throw UsageError("--timeout must not be negative");
  if (timeout > absl::ZeroDuration()) {
    context->set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  }
  return context;
}

std::string ReadPrompt() {
  const std::string file = absl::GetFlag(FLAGS_prompt_file);
  if (file.empty()) return absl::GetFlag(FLAGS_prompt);
  if (!absl::GetFlag(FLAGS_prompt).empty()) {
    throw UsageError("give --prompt or --prompt_file, not both");
  }
  std::ostringstream text;
  if (file == "-") {
    text << std::cin.rdbuf();
  } else {
    std::ifstream in(file, std::ios::binary);
    if (!in) throw UsageError(absl::StrCat("cannot read --prompt_file ", file));
    text << in.rdbuf();
  }
  return text.str();
}

// Parses a flag value as T; throws UsageError naming the flag.
template <typename T>
T ParseNumber(absl::string_view flag, absl::string_view text) {
  T value{};
  bool ok = false;
  if constexpr (std::is_same_v<T, float>) {
    ok = absl::SimpleAtof(text, &value);
  } else {
    ok = absl::SimpleAtoi(text, &value);
  }
  if (!ok) throw UsageError(absl::StrCat("--", flag, ": cannot parse '", text, "'"));
  return value;
}

uint32_t ToUint32(absl::string_view flag, int64_t value) {
  if (value < 0 || value > std::numeric_limits<uint32_t>::max()) {
    throw UsageError(absl::StrCat("--", flag, " must be in [0, 4294967295], got ", value));
  }
  return static_cast<uint32_t>(value);
}

std::optional<float> OptionalFloat(absl::string_view flag, const std::string& text) {
  if (text.empty()) return std::nullopt;
  return ParseNumber<float>(flag, text);
}

std::vector<int32_t> ParseIds(absl::string_view flag, const std::vector<std::string>& items) {
  std::vector<int32_t> ids;
  for (const std::string& item : items) ids.push_back(ParseNumber<int32_t>(flag, item));
  return ids;
}

pb::GenerateRequest BuildGenerateRequest() {
  pb::GenerateRequest request;
  request.set_request_id(absl::GetFlag(FLAGS_request_id));
  request.set_session_id(absl::GetFlag(FLAGS_session));
  request.set_cache_salt(absl::GetFlag(FLAGS_cache_salt));
  const std::vector<std::string> prompt_ids = absl::GetFlag(FLAGS_prompt_token_ids);
  if (!prompt_ids.empty()) {
    if (!absl::GetFlag(FLAGS_prompt).empty() || !absl::GetFlag(FLAGS_prompt_file).empty()) {
      throw UsageError("give --prompt_token_ids or a text prompt, not both");
    }
    for (int32_t id : ParseIds("prompt_token_ids", prompt_ids)) {
      request.mutable_token_ids()->add_ids(id);
    }
  } else {
    // An empty text prompt is sent as is: the server decides whether it is valid.
    request.set_text(ReadPrompt());
  }

  pb::SamplingParams& sampling = *request.mutable_sampling();
  if (auto t = OptionalFloat("temperature", absl::GetFlag(FLAGS_temperature))) {
    sampling.set_temperature(*t);
  }
  sampling.set_top_k(absl::GetFlag(FLAGS_top_k));
  if (auto p = OptionalFloat("top_p", absl::GetFlag(FLAGS_top_p))) sampling.set_top_p(*p);
  sampling.set_min_p(static_cast<float>(absl::GetFlag(FLAGS_min_p)));
  if (auto r = OptionalFloat("repetition_penalty", absl::GetFlag(FLAGS_repetition_penalty))) {
    sampling.set_repetition_penalty(*r);
  }
  sampling.set_presence_penalty(static_cast<float>(absl::GetFlag(FLAGS_presence_penalty)));
  sampling.set_frequency_penalty(static_cast<float>(absl::GetFlag(FLAGS_frequency_penalty)));
  const std::string seed = absl::GetFlag(FLAGS_seed);
  if (!seed.empty()) sampling.set_seed(ParseNumber<uint64_t>("seed", seed));

  pb::StopParams& stop = *request.mutable_stop();
  for (const std::string& s : absl::GetFlag(FLAGS_stop)) {
    std::string unescaped;
    std::string error;
    if (!absl::CUnescape(s, &unescaped, &error)) {
      throw UsageError(absl::StrCat("--stop: bad escape in '", s, "': ", error));
    }
    stop.add_stop_strings(unescaped);
  }
  for (int32_t id : ParseIds("stop_token_ids", absl::GetFlag(FLAGS_stop_token_ids))) {
    stop.add_stop_token_ids(id);
  }
  stop.set_ignore_eos(absl::GetFlag(FLAGS_ignore_eos));
  stop.set_include_stop_string(absl::GetFlag(FLAGS_include_stop_string));

  if (const int64_t max_new = absl::GetFlag(FLAGS_max_new_tokens); max_new != -1) {
    request.set_max_new_tokens(ToUint32("max_new_tokens", max_new));
  }
  request.set_min_new_tokens(ToUint32("min_new_tokens", absl::GetFlag(FLAGS_min_new_tokens)));
  request.set_logprobs(absl::GetFlag(FLAGS_logprobs));
  request.set_top_logprobs(ToUint32("top_logprobs", absl::GetFlag(FLAGS_top_logprobs)));
  request.set_time_limit_ms(ToUint32("time_limit_ms", absl::GetFlag(FLAGS_time_limit_ms)));
  request.set_prompt_logprobs(absl::GetFlag(FLAGS_prompt_logprobs));
  request.set_prompt_top_logprobs(
      ToUint32("prompt_top_logprobs", absl::GetFlag(FLAGS_prompt_top_logprobs)));
  return request;
}

// A byte-level token as readable text: 'a', '\n', '\xc3'.
std::string TokenText(int32_t id) {
  if (id < 0 || id > 255) return "?";
  return absl::StrCat("'", absl::CHexEscape(std::string(1, static_cast<char>(id))), "'");
}

// One line per prompt token to stderr: its index in the prompt, id, text and logprob, then the
// alternatives, most likely first. `next_index` is the prompt index of the first entry (1 for
// the first message) and advances past the printed ones.
void PrintPromptLogprobs(const google::protobuf::RepeatedPtrField<pb::GeneratedToken>& entries,
                         int64_t* next_index) {
  for (const pb::GeneratedToken& entry : entries) {
    std::cerr << "prompt[" << (*next_index)++ << "] " << entry.token_id() << " "
              << TokenText(entry.token_id()) << " logprob " << entry.logprob();
    for (const pb::TokenLogprob& alt : entry.top_logprobs()) {
      std::cerr << " | " << alt.token_id() << " " << TokenText(alt.token_id()) << ":"
                << alt.logprob();
    }
    std::cerr << "\n";
  }
}

void PrintTokens(const google::protobuf::RepeatedPtrField<pb::GeneratedToken>& tokens) {
  if (!absl::GetFlag(FLAGS_logprobs) && absl::GetFlag(FLAGS_top_logprobs) == 0) return;
  for (const pb::GeneratedToken& token : tokens) {
    std::cerr << "token " << token.token_id() << " logprob " << token.logprob();
    for (const pb::TokenLogprob& alt : token.top_logprobs()) {
      std::cerr << " | " << alt.token_id() << ":" << alt.logprob();
    }
    std::cerr << "\n";
  }
}

// Prints the final info to stderr; returns the exit code it implies.
int PrintFinal(const std::string& request_id, const pb::FinalInfo& final_info) {
  const std::string reason = pb::FinishReason_Name(final_info.finish_reason());
  if (!absl::GetFlag(FLAGS_quiet)) {
    const pb::Timings& t = final_info.timings();
    std::cerr << "\n[request_id=" << request_id
              << " finish_reason=" << absl::StripPrefix(reason, "FINISH_REASON_")
              << " prompt_tokens=" << final_info.prompt_tokens()
              << " generated_tokens=" << final_info.generated_tokens()
              << " cached_tokens=" << final_info.cached_tokens() << " seed=" << final_info.seed()
              << "]\n"
              << "[queue=" << t.queue_seconds() << "s prefill=" << t.prefill_seconds()
              << "s first_token=" << t.first_token_seconds() << "s total=" << t.total_seconds()
              << "s]\n";
  }
  if (final_info.finish_reason() == pb::FINISH_REASON_ERROR) {
    std::cerr << "polysketch-cli: generation failed: " << final_info.error_message() << "\n";
    return kExitRpcError;
  }
  return kExitOk;
}

int RunGenerate(pb::GenerationService::Stub& stub) {
  const pb::GenerateRequest request = BuildGenerateRequest();
  const bool tty = isatty(STDOUT_FILENO) != 0;
  auto context = MakeContext();
  if (absl::GetFlag(FLAGS_unary)) {
    pb::GenerateResponse response;
    const grpc::Status status = stub.Generate(context.get(), request, &response);
    if (!status.ok()) return ReportRpcError("Generate", status);
    int64_t prompt_index = 1;
    PrintPromptLogprobs(response.prompt_logprobs(), &prompt_index);
    std::cout << response.text() << (tty ? "\n" : "") << std::flush;
    PrintTokens(response.tokens());
    return PrintFinal(response.request_id(), response.final());
  }
  std::unique_ptr<grpc::ClientReader<pb::GenerateStreamResponse>> reader =
      stub.GenerateStream(context.get(), request);
  pb::GenerateStreamResponse chunk;
  std::optional<pb::FinalInfo> final_info;
  std::string request_id;
  int64_t prompt_index = 1;
  while (reader->Read(&chunk)) {
    PrintPromptLogprobs(chunk.prompt_logprobs(), &prompt_index);
    std::cout << chunk.text() << std::flush;
    PrintTokens(chunk.tokens());
    request_id = chunk.request_id();
    if (chunk.has_final()) final_info = chunk.final();
  }
  if (tty) std::cout << "\n" << std::flush;
  const grpc::Status status = reader->Finish();
  if (!status.ok()) return ReportRpcError("GenerateStream", status);
  if (!final_info) {
    std::cerr << "polysketch-cli: the stream ended without final info\n";
    return kExitRpcError;
  }
  return PrintFinal(request_id, *final_info);
}

int RunInfo(pb::GenerationService::Stub& stub) {
  auto context = MakeContext();
  pb::ModelInfo info;
  const grpc::Status status = stub.GetModelInfo(context.get(), pb::GetModelInfoRequest(), &info);
  if (!status.ok()) return ReportRpcError("GetModelInfo", status);
  const pb::Limits& limits = info.limits();
  std::cout << "name:                    " << info.name() << "\n"
            << "architecture:            " << info.architecture() << "\n"
            << "attention_kinds:         " << absl::StrJoin(info.attention_kinds(), ",") << "\n"
            << "vocab_size:              " << info.vocab_size() << "\n"
            << "d_model:                 " << info.d_model() << "\n"
            << "n_layers:                " << info.n_layers() << "\n"
            << "n_heads:                 " << info.n_heads() << "\n"
            << "d_ff:                    " << info.d_ff() << "\n"
            << "max_seq_len:             " << info.max_seq_len() << "\n"
            << "state_bytes_per_request: " << info.state_bytes_per_request() << "\n"
            << "device:                  " << info.device() << "\n"
            << "tokenizer:               " << info.tokenizer() << "\n"
            << "limits.max_context:         " << limits.max_context() << "\n"
            << "limits.max_prompt_tokens:   " << limits.max_prompt_tokens() << "\n"
            << "limits.max_new_tokens:      " << limits.max_new_tokens() << "\n"
            << "limits.state_slots:         " << limits.state_slots() << "\n"
            << "limits.max_waiting:         " << limits.max_waiting() << "\n"
            << "limits.max_waiting_tokens:  " << limits.max_waiting_tokens() << "\n";
  const pb::StateReuse& reuse = info.state_reuse();
  std::cout << "state_reuse.model_fingerprint:        " << reuse.model_fingerprint() << "\n"
            << "state_reuse.prefix_cache_bytes:       " << reuse.prefix_cache_bytes() << "\n"
            << "state_reuse.prefix_cache_granularity: " << reuse.prefix_cache_granularity() << "\n"
            << "state_reuse.session_budget_bytes:     " << reuse.session_budget_bytes() << "\n"
            << "state_reuse.session_bytes:            " << reuse.session_bytes() << "\n"
            << "state_reuse.session_ttl_seconds:      " << reuse.session_ttl_seconds() << "\n";
  return kExitOk;
}

// grpc.health.v1.Health/Check without generated stubs (Debian's libgrpc++ ships none): the
// request is `string service = 1`, the response `ServingStatus status = 1` (an enum).
grpc::Status HealthCheck(grpc::GenericStub& stub, const std::string& service, int* serving) {
  std::string request;
  {
    google::protobuf::io::StringOutputStream raw(&request);
    google::protobuf::io::CodedOutputStream out(&raw);
    if (!service.empty()) {
      out.WriteTag((1 << 3) | 2);  // field 1, length-delimited
      out.WriteVarint32(static_cast<uint32_t>(service.size()));
      out.WriteString(service);
    }
  }
  grpc::Slice slice(request);
  grpc::ByteBuffer request_buffer(&slice, 1);
  grpc::ByteBuffer response_buffer;
  auto context = MakeContext();
  std::promise<grpc::Status> done;
  stub.UnaryCall(context.get(), "/grpc.health.v1.Health/Check", grpc::StubOptions(),
                 &request_buffer, &response_buffer,
                 [&done](grpc::Status s) { done.set_value(std::move(s)); });
  grpc::Status status = done.get_future().get();
  if (!status.ok()) return status;
  std::vector<grpc::Slice> slices;
  if (!response_buffer.Dump(&slices).ok()) {
    return grpc::Status(grpc::StatusCode::INTERNAL, "cannot read the health response");
  }
  std::string response;
  for (const grpc::Slice& s : slices) {
    response.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  google::protobuf::io::CodedInputStream in(reinterpret_cast<const uint8_t*>(response.data()),
                                            static_cast<int>(response.size()));
  *serving = 0;  // UNKNOWN, the proto3 default when the field is absent
  for (uint32_t tag = in.ReadTag(); tag != 0; tag = in.ReadTag()) {
    if (tag == ((1 << 3) | 0)) {
      uint32_t value = 0;
      if (!in.ReadVarint32(&value)) break;
      *serving = static_cast<int>(value);
    } else if (!google::protobuf::internal::WireFormatLite::SkipField(&in, tag)) {
      return grpc::Status(grpc::StatusCode::INTERNAL, "malformed health response");
    }
  }
  return grpc::Status::OK;
}

int RunHealth(const std::shared_ptr<grpc::Channel>& channel) {
  static const char* const kStatusNames[] = {"UNKNOWN", "SERVING", "NOT_SERVING",
                                             "SERVICE_UNKNOWN"};
  grpc::GenericStub stub(channel);
  int code = kExitOk;
  for (const std::string service : {"", "polysketch.v1.GenerationService"}) {
    int serving = 0;
    const grpc::Status status = HealthCheck(stub, service, &serving);
    const std::string label = service.empty() ? "\"\" (liveness)" : service + " (readiness)";
    if (!status.ok()) {
      ReportRpcError(absl::StrCat("health check of ", label), status);
      code = kExitRpcError;
      continue;
    }
    const char* name = serving >= 0 && serving < 4 ? kStatusNames[serving] : "INVALID";
    std::cout << label << ": " << name << "\n";
    if (serving != 1) code = kExitRpcError;
  }
  return code;
}

int RunTokenize(pb::GenerationService::Stub& stub) {
  pb::TokenizeRequest request;
  request.set_text(ReadPrompt());
  pb::TokenizeResponse response;
  auto context = MakeContext();
  const grpc::Status status = stub.Tokenize(context.get(), request, &response);
  if (!status.ok()) return ReportRpcError("Tokenize", status);
  std::cout << absl::StrJoin(response.token_ids(), " ") << "\n";
  std::cerr << "[" << response.token_ids_size() << " tokens]\n";
  return kExitOk;
}

int RunCancel(pb::GenerationService::Stub& stub) {
  pb::CancelRequest request;
  request.set_request_id(absl::GetFlag(FLAGS_request_id));
  if (request.request_id().empty()) throw UsageError("cancel needs --request_id");
  pb::CancelResponse response;
  auto context = MakeContext();
  const grpc::Status status = stub.Cancel(context.get(), request, &response);
  if (!status.ok()) return ReportRpcError("Cancel", status);
  std::cout << "cancelled " << request.request_id() << "\n";
  return kExitOk;
}

std::string RequireSession(absl::string_view command) {
  const std::string session = absl::GetFlag(FLAGS_session);
  if (session.empty()) throw UsageError(absl::StrCat(command, " needs --session"));
  return session;
}

std::string RequireStateFile(absl::string_view command) {
  const std::string path = absl::GetFlag(FLAGS_state_file);
  if (path.empty()) throw UsageError(absl::StrCat(command, " needs --state_file"));
  return path;
}

int RunSession(pb::GenerationService::Stub& stub, const std::string& command) {
  auto context = MakeContext();
  if (command == "open-session") {
    pb::OpenSessionResponse response;
    const grpc::Status status = stub.OpenSession(context.get(), {}, &response);
    if (!status.ok()) return ReportRpcError("OpenSession", status);
    std::cout << response.session_id() << "\n";
  } else if (command == "close-session") {
    pb::CloseSessionRequest request;
    request.set_session_id(RequireSession(command));
    pb::CloseSessionResponse response;
    const grpc::Status status = stub.CloseSession(context.get(), request, &response);
    if (!status.ok()) return ReportRpcError("CloseSession", status);
  } else if (command == "export-state") {
    pb::ExportStateRequest request;
    request.set_session_id(RequireSession(command));
    const std::string path = RequireStateFile(command);
    pb::ExportStateResponse response;
    const grpc::Status status = stub.ExportState(context.get(), request, &response);
    if (!status.ok()) return ReportRpcError("ExportState", status);
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(response.state().data(), static_cast<std::streamsize>(response.state().size()));
    if (!out.flush()) {
      std::cerr << "polysketch-cli: cannot write " << path << "\n";
      return kExitRpcError;
    }
    std::cerr << "wrote " << response.state().size() << " bytes (" << response.tokens()
              << " tokens) to " << path << "\n";
  } else {  // import-state
    const std::string path = RequireStateFile(command);
    std::ifstream in(path, std::ios::binary);
    if (!in) throw UsageError(absl::StrCat("cannot read --state_file ", path));
    pb::ImportStateRequest request;
    request.set_state(std::string(std::istreambuf_iterator<char>(in), {}));
    pb::ImportStateResponse response;
    const grpc::Status status = stub.ImportState(context.get(), request, &response);
    if (!status.ok()) return ReportRpcError("ImportState", status);
    std::cout << response.session_id() << "\n";
  }
  return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(kUsage);
  // --help lists the flags of this file and the connection's (Abseil's default matches the
  // binary's name, which has a '-' where the file name has '_').
  absl::FlagsUsageConfig usage_config;
  usage_config.contains_help_flags = [](absl::string_view path) {
    return absl::StrContains(path, "polysketch_cli") || ps::clients::IsConnectionFlagsFile(path);
  };
  usage_config.contains_helpshort_flags = usage_config.contains_help_flags;
  absl::SetFlagsUsageConfig(usage_config);
  CheckFlagsOrExit(argc, argv);
  const std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() != 2) {
    std::cerr << "polysketch-cli: give exactly one subcommand (generate, info, health, tokenize, "
                 "cancel); see --help\n";
    return kExitUsage;
  }
  const std::string command = args[1];
  try {
    ps::clients::ConnectionOptions options = ps::clients::ConnectionOptionsFromFlags();
    // An exported state arrives as one message of the state's size (megabytes).
    options.max_receive_message_bytes = -1;
    absl::StatusOr<ps::clients::Connection> connection = ps::clients::Connect(options);
    if (!connection.ok()) throw UsageError(std::string(connection.status().message()));
    g_connection = &*connection;
    std::shared_ptr<grpc::Channel> channel = connection->channel;
    pb::GenerationService::Stub stub(channel);
    if (command == "generate") return RunGenerate(stub);
    if (command == "info") return RunInfo(stub);
    if (command == "health") return RunHealth(channel);
    if (command == "tokenize") return RunTokenize(stub);
    if (command == "cancel") return RunCancel(stub);
    if (command == "open-session" || command == "close-session" || command == "export-state" ||
        command == "import-state") {
      return RunSession(stub, command);
    }
    std::cerr << "polysketch-cli: unknown subcommand '" << command << "'; see --help\n";
    return kExitUsage;
  } catch (const UsageError& e) {
    std::cerr << "polysketch-cli: " << e.what() << "\n";
    return kExitUsage;
  }
}
