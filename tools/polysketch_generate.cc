// polysketch-generate: command-line text generation from a model directory, streaming the
// generated text (never the prompt) to stdout and statistics to stderr. The request runs through
// the server's own Scheduler (sampling, incremental detokenization, stop rules, context limit) on
// the engine's Model on the backend --device picks, so offline and served outputs are the same.
// Exit status: 0 done, 1 runtime error (bad flag value, model, prompt), 2 usage error.
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <absl/flags/flag.h>
#include <absl/flags/parse.h>
#include <absl/flags/usage.h>
#include <absl/flags/usage_config.h>
#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/match.h>
#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/string_view.h>
#include <absl/time/time.h>

#include "base/status_macros.h"
#include "kernels/backend_factory.h"
#include "server/engine/model/kv_cache_dtype.h"
#include "server/engine/model/model.h"
#include "server/engine/model/weights_dtype.h"
#include "server/engine/model_io/tokenizer.h"
#include "server/engine/model_io/weights.h"
#include "server/engine/serving/sampler.h"
#include "server/engine/serving/scheduler.h"
#include "server/engine/serving/stop_checker.h"

ABSL_FLAG(std::string, model, "", "Model directory (config.json + model.safetensors). Required.");
ABSL_FLAG(std::string, prompt, "", "Prompt text. Exactly one of --prompt and --prompt_file.");
ABSL_FLAG(std::string, prompt_file, "", "File whose bytes are the prompt (no newline stripped).");
ABSL_FLAG(int64_t, max_new_tokens, 200, "Stop after this many generated tokens (>= 1).");
ABSL_FLAG(int64_t, min_new_tokens, 0, "Ignore stops completed by the first N tokens.");
ABSL_FLAG(double, temperature, 0.8, "0 = greedy; else logits / temperature. [0, 100]");
ABSL_FLAG(int32_t, top_k, 0, "Keep the k most likely tokens; 0 = off.");
ABSL_FLAG(double, top_p, 1.0, "Nucleus sampling mass; 1 = off. (0, 1]");
ABSL_FLAG(double, min_p, 0.0, "Keep tokens with p >= min_p * p_max; 0 = off. [0, 1]");
ABSL_FLAG(double, repetition_penalty, 1.0, "HF/vLLM repetition penalty; 1 = off. (0, 10]");
ABSL_FLAG(double, presence_penalty, 0.0, "OpenAI presence penalty. [-2, 2]");
ABSL_FLAG(double, frequency_penalty, 0.0, "OpenAI frequency penalty. [-2, 2]");
ABSL_FLAG(uint64_t, seed, 0, "Seed of the sampler's RNG (same seed, same output).");
ABSL_FLAG(std::vector<std::string>, stop, {},
          "Stop strings, comma-separated (a repeated --stop replaces the earlier list; a stop "
          "string cannot contain a comma).");
ABSL_FLAG(std::vector<std::string>, stop_token_ids, {}, "Stop token ids, comma-separated.");
ABSL_FLAG(bool, include_stop_string, false, "Keep the matched stop string in the output.");
ABSL_FLAG(int32_t, logprobs, 0, "Print the top-N alternatives of every token to stderr. [0, 20]");
ABSL_FLAG(int32_t, threads, 0, "CPU threads for the kernels; 0 = one per hardware thread.");
ABSL_FLAG(std::string, device, "auto",
          "Kernel backend: auto (CUDA when built with it and a GPU is visible, else CPU), cpu, "
          "cuda.");
ABSL_FLAG(int64_t, max_context, 0,
          "Most tokens (prompt + generated) a sequence may hold; sizes the KV caches of softmax "
          "and sparse layers. 0 = the model's max_seq_len for those, unlimited for models whose "
          "layers all keep a constant state (polysketch, sliding_window).");
ABSL_FLAG(int64_t, prefill_chunk, 512, "Prompt tokens per prefill pass (bounded memory).");
ABSL_FLAG(std::string, weights_dtype, "auto",
          "Precision of the linear layers' weights, converted once at load: auto (the model's "
          "stored format: bf16 when it is stored in bf16 and the backend is cpu, else fp32), "
          "fp32, bf16, int8 (per-channel, weight-only). bf16 and int8 are cpu only. "
          "docs/model-format.md, \"weights_dtype\".");
ABSL_FLAG(std::string, kv_cache_dtype, "auto",
          "KV caches of softmax and sparse layers: fp32, fp16, or auto (fp16 on cpu, fp32 on "
          "cuda).");

namespace {

using ps::engine::FinishReason;

constexpr char kUsage[] =
    "Generates text from a polysketch model directory.\n"
    "  polysketch-generate --model DIR (--prompt TEXT | --prompt_file FILE) [flags]\n"
    "Prints only the generated text to stdout (streamed), statistics to stderr.";

// An error that carries the exit status: 1 for runtime errors, 2 for usage errors.
struct Failure {
  int exit_code;
  std::string message;
};

// Tokens per second, or 0 when nothing was timed.
double Rate(int64_t n, double seconds) { return seconds > 0 ? n / seconds : 0.0; }

// The prompt bytes from --prompt or --prompt_file (exactly one: exit 2 otherwise).
absl::StatusOr<std::string> ReadPrompt(const std::string& prompt, const std::string& path) {
  if (path.empty()) return prompt;
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read --prompt_file ", path));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading --prompt_file ", path));
  return text;
}

absl::StatusOr<std::vector<int32_t>> ParseTokenIds(const std::vector<std::string>& items) {
  std::vector<int32_t> ids;
  for (const std::string& item : items) {
    int32_t id = 0;
    if (!absl::SimpleAtoi(item, &id)) {
      return absl::InvalidArgumentError(
          absl::StrCat("stop_token_ids: '", item, "' is not an integer"));
    }
    ids.push_back(id);
  }
  return ids;
}

void WriteOut(absl::string_view text) {
  if (text.empty()) return;
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fflush(stdout);
}

// Prints a request's output as the engine produces it (on the engine thread) and hands the final
// result to the main thread.
class PrintingObserver : public ps::engine::RequestObserver {
 public:
  explicit PrintingObserver(bool logprobs) : logprobs_(logprobs) {}

  void OnDelta(ps::engine::StreamDelta delta) override {
    if (logprobs_) {
      for (const ps::engine::TokenOutput& t : delta.tokens) {
        std::fprintf(stderr, "[%lld] token %d logprob %.4f |", static_cast<long long>(++count_),
                     t.token_id, t.logprob);
        for (const ps::engine::TokenLogprob& alt : t.top_logprobs) {
          std::fprintf(stderr, " %d:%.4f", alt.token_id, alt.logprob);
        }
        std::fprintf(stderr, "\n");
      }
    }
    WriteOut(delta.text);
  }

  void OnFinish(ps::engine::FinalResult result) override {
    std::lock_guard<std::mutex> lock(mu_);
    result_ = std::move(result);
    done_.notify_all();
  }

  ps::engine::FinalResult Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [&] { return result_.has_value(); });
    return *result_;
  }

 private:
  const bool logprobs_;
  int64_t count_ = 0;  // engine thread only
  std::mutex mu_;
  std::condition_variable done_;
  std::optional<ps::engine::FinalResult> result_;
};

absl::Status Generate() {
  const std::string model_dir = absl::GetFlag(FLAGS_model);
  PS_ASSIGN_OR_RETURN(std::string prompt,
                      ReadPrompt(absl::GetFlag(FLAGS_prompt), absl::GetFlag(FLAGS_prompt_file)));
  if (prompt.empty()) return absl::InvalidArgumentError("the prompt is empty");

  PS_ASSIGN_OR_RETURN(ps::engine::ModelWeights weights, ps::engine::LoadWeights(model_dir));
  const int threads = absl::GetFlag(FLAGS_threads);
  if (threads < 0) return absl::InvalidArgumentError("--threads: must be >= 0");
  absl::StatusOr<std::unique_ptr<ps::kernels::Backend>> backend_or =
      ps::kernels::CreateBackend(absl::GetFlag(FLAGS_device), threads);
  if (!backend_or.ok()) {
    return absl::Status(backend_or.status().code(),
                        absl::StrCat("--device: ", backend_or.status().message()));
  }
  ps::kernels::Backend& backend = **backend_or;
  ps::engine::ModelOptions options;
  options.num_slots = 1;
  options.max_batch = 1;
  options.max_context = absl::GetFlag(FLAGS_max_context);
  options.prefill_chunk = absl::GetFlag(FLAGS_prefill_chunk);
  PS_ASSIGN_OR_RETURN(
      options.weights_dtype,
      ps::engine::ResolveWeightsDtype(absl::GetFlag(FLAGS_weights_dtype), weights, backend));
  PS_ASSIGN_OR_RETURN(
      options.kv_cache_dtype,
      ps::engine::ResolveKvCacheDtype(absl::GetFlag(FLAGS_kv_cache_dtype), backend.name()));
  PS_ASSIGN_OR_RETURN(std::unique_ptr<ps::engine::Model> model,
                      ps::engine::Model::Create(weights, backend, options));
  PS_ASSIGN_OR_RETURN(ps::engine::ByteTokenizer tokenizer,
                      ps::engine::ByteTokenizer::Create(model->config().vocab_size));

  // One request through the same scheduler the server uses: sampling, incremental
  // detokenization, stop rules and the context limit behave exactly as they do when served.
  ps::engine::EngineRequest request;
  request.id = "polysketch-generate";
  request.prompt = tokenizer.Encode(prompt);
  ps::engine::SamplingParams& params = request.sampling;
  params.temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature));
  params.top_k = absl::GetFlag(FLAGS_top_k);
  params.top_p = static_cast<float>(absl::GetFlag(FLAGS_top_p));
  params.min_p = static_cast<float>(absl::GetFlag(FLAGS_min_p));
  params.repetition_penalty = static_cast<float>(absl::GetFlag(FLAGS_repetition_penalty));
  params.presence_penalty = static_cast<float>(absl::GetFlag(FLAGS_presence_penalty));
  params.frequency_penalty = static_cast<float>(absl::GetFlag(FLAGS_frequency_penalty));
  params.seed = absl::GetFlag(FLAGS_seed);
  params.top_logprobs = absl::GetFlag(FLAGS_logprobs);
  params.logprobs = params.top_logprobs > 0;
  ps::engine::StopConditions& stops = request.stops;
  PS_ASSIGN_OR_RETURN(stops.stop_token_ids, ParseTokenIds(absl::GetFlag(FLAGS_stop_token_ids)));
  stops.stop_strings = absl::GetFlag(FLAGS_stop);
  stops.include_stop_string = absl::GetFlag(FLAGS_include_stop_string);
  stops.min_new_tokens = absl::GetFlag(FLAGS_min_new_tokens);
  stops.max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  // The engine accepts 0 (scoring only, for the server's prompt log-probabilities); this tool
  // exists to generate.
  if (stops.max_new_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_new_tokens: must be >= 1, got ", stops.max_new_tokens));
  }
  auto observer = std::make_shared<PrintingObserver>(params.logprobs);
  request.observer = observer;
  const int64_t prompt_tokens = static_cast<int64_t>(request.prompt.size());

  ps::engine::SchedulerOptions scheduler_options;
  scheduler_options.prefill_tokens_per_step = options.prefill_chunk;
  PS_ASSIGN_OR_RETURN(std::unique_ptr<ps::engine::Scheduler> scheduler,
                      ps::engine::Scheduler::Create(std::move(model), scheduler_options));
  // Submit validates the sampling values, the stop conditions and the prompt against the context
  // limit before any model time is spent.
  PS_RETURN_IF_ERROR(scheduler->Submit(std::move(request)));
  const ps::engine::FinalResult result = observer->Wait();
  if (result.reason == FinishReason::kError) return result.error;

  const double prefill_seconds = absl::ToDoubleSeconds(result.timings.prefill);
  const double decode_seconds =
      absl::ToDoubleSeconds(result.timings.total - result.timings.queue - result.timings.prefill);
  std::fprintf(stderr, "\nfinish reason: %s\n",
               std::string(FinishReasonName(result.reason)).c_str());
  std::fprintf(stderr, "prompt tokens: %lld (%.1f tokens/s)\n",
               static_cast<long long>(prompt_tokens), Rate(prompt_tokens, prefill_seconds));
  std::fprintf(stderr, "generated tokens: %lld (%.1f tokens/s)\n",
               static_cast<long long>(result.generated_tokens),
               Rate(result.generated_tokens, decode_seconds));
  return absl::OkStatus();
}

// Usage checks that need no file or model: exit 2 when they fail.
std::optional<Failure> CheckUsage(const std::vector<char*>& positional) {
  if (positional.size() > 1) {
    return Failure{2, absl::StrCat("unexpected argument '", positional[1], "' (see --help)")};
  }
  if (absl::GetFlag(FLAGS_model).empty()) return Failure{2, "--model is required (see --help)"};
  const bool has_prompt = !absl::GetFlag(FLAGS_prompt).empty();
  const bool has_file = !absl::GetFlag(FLAGS_prompt_file).empty();
  if (has_prompt == has_file) {
    return Failure{2, "give exactly one of --prompt and --prompt_file (see --help)"};
  }
  return std::nullopt;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(kUsage);
  // --help lists the flags of files named like the program; ours is polysketch_generate.cc,
  // the binary polysketch-generate, so say which file holds them.
  absl::FlagsUsageConfig usage_config;
  usage_config.contains_help_flags = [](absl::string_view file) {
    return absl::StrContains(file, "polysketch_generate");
  };
  usage_config.contains_helpshort_flags = usage_config.contains_help_flags;
  absl::SetFlagsUsageConfig(usage_config);
  // Unknown flags and unparsable values (e.g. --top_k=abc) make ParseCommandLine print absl's
  // own message and exit 1 (Debian's Abseil has no hook to change that status).
  const std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (std::optional<Failure> failure = CheckUsage(positional)) {
    std::fprintf(stderr, "polysketch-generate: %s\n", failure->message.c_str());
    return failure->exit_code;
  }
  const absl::Status status = Generate();
  if (!status.ok()) {
    std::fprintf(stderr, "polysketch-generate: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  return 0;
}
