// polysketch-generate: command-line text generation from a model directory, streaming the
// generated text (never the prompt) to stdout and statistics to stderr. It wires the engine's
// pieces (LoadWeights, sampler, stop checker, incremental detokenizer) exactly as a request does.
// The forward is the engine's Model on the CPU backend (threaded, vectorised kernels); the prompt
// is prefilled in chunks with the block algorithm, then one decode step per generated token.
// Exit status: 0 done, 1 runtime error (bad flag value, model, prompt), 2 usage error.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
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

#include "base/status_macros.h"
#include "kernels/cpu/cpu_backend.h"
#include "server/engine/model.h"
#include "server/engine/sampler.h"
#include "server/engine/stop_checker.h"
#include "server/engine/tokenizer.h"
#include "server/engine/weights.h"

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
ABSL_FLAG(int64_t, max_context, 0,
          "Most tokens (prompt + generated) a sequence may hold; sizes the KV caches of softmax "
          "and sparse layers. 0 = the model's max_seq_len for those, unlimited for models whose "
          "layers all keep a constant state (polysketch, sliding_window).");
ABSL_FLAG(int64_t, prefill_chunk, 512, "Prompt tokens per prefill pass (bounded memory).");

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

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

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

absl::Status Generate() {
  const std::string model_dir = absl::GetFlag(FLAGS_model);
  PS_ASSIGN_OR_RETURN(std::string prompt,
                      ReadPrompt(absl::GetFlag(FLAGS_prompt), absl::GetFlag(FLAGS_prompt_file)));
  if (prompt.empty()) return absl::InvalidArgumentError("the prompt is empty");

  PS_ASSIGN_OR_RETURN(ps::engine::ModelWeights weights, ps::engine::LoadWeights(model_dir));
  const int threads = absl::GetFlag(FLAGS_threads);
  if (threads < 0) return absl::InvalidArgumentError("--threads: must be >= 0");
  ps::kernels::cpu::CpuBackend backend(threads);
  ps::engine::ModelOptions options;
  options.num_slots = 1;
  options.max_batch = 1;
  options.max_context = absl::GetFlag(FLAGS_max_context);
  options.prefill_chunk = absl::GetFlag(FLAGS_prefill_chunk);
  PS_ASSIGN_OR_RETURN(std::unique_ptr<ps::engine::Model> model,
                      ps::engine::Model::Create(weights, backend, options));
  const int64_t vocab_size = model->config().vocab_size;
  PS_ASSIGN_OR_RETURN(ps::engine::ByteTokenizer tokenizer,
                      ps::engine::ByteTokenizer::Create(vocab_size));

  ps::engine::SamplingParams params;
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

  ps::engine::StopConditions stops;
  PS_ASSIGN_OR_RETURN(stops.stop_token_ids, ParseTokenIds(absl::GetFlag(FLAGS_stop_token_ids)));
  stops.stop_strings = absl::GetFlag(FLAGS_stop);
  stops.include_stop_string = absl::GetFlag(FLAGS_include_stop_string);
  stops.min_new_tokens = absl::GetFlag(FLAGS_min_new_tokens);
  stops.max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  const int64_t max_new_tokens = stops.max_new_tokens;

  const std::vector<int32_t> prompt_ids = tokenizer.Encode(prompt);
  // Create validates params and stops, before any model time is spent.
  PS_ASSIGN_OR_RETURN(ps::engine::Sampler sampler,
                      ps::engine::Sampler::Create(params, vocab_size, prompt_ids));
  PS_ASSIGN_OR_RETURN(ps::engine::StopChecker stop_checker,
                      ps::engine::StopChecker::Create(std::move(stops), vocab_size));

  if (static_cast<int64_t>(prompt_ids.size()) > model->max_context()) {
    return absl::OutOfRangeError(absl::StrCat("the prompt has ", prompt_ids.size(),
                                              " tokens, more than the context limit ",
                                              model->max_context(), " (see --max_context)"));
  }
  PS_ASSIGN_OR_RETURN(const ps::engine::SlotId slot, model->AcquireSlot());
  std::vector<float> logits(static_cast<size_t>(vocab_size));
  const auto prompt_start = std::chrono::steady_clock::now();
  PS_RETURN_IF_ERROR(model->Prefill(slot, 0, prompt_ids, absl::MakeSpan(logits)));
  const double prompt_seconds = SecondsSince(prompt_start);
  int64_t position = static_cast<int64_t>(prompt_ids.size());

  ps::engine::IncrementalDetokenizer detokenizer;
  FinishReason finish_reason = FinishReason::kLength;
  int64_t num_generated = 0;
  const auto decode_start = std::chrono::steady_clock::now();
  while (true) {
    PS_ASSIGN_OR_RETURN(ps::engine::SampleResult sample, sampler.Sample(logits));
    const int32_t token = sample.token_id;
    PS_RETURN_IF_ERROR(sampler.Accept(token));
    ++num_generated;
    PS_ASSIGN_OR_RETURN(std::string text, detokenizer.Push(token));
    // The last possible token closes the stream: a character still open becomes U+FFFD (as
    // ByteTokenizer::Decode), and it must reach the stop checker, which releases everything
    // on its final Append. Stops by string or token drop what follows them anyway.
    if (num_generated == max_new_tokens) text += detokenizer.Flush();
    if (params.logprobs) {
      std::fprintf(stderr, "[%lld] token %d logprob %.4f |", static_cast<long long>(num_generated),
                   token, sample.logprob);
      for (const ps::engine::TokenLogprob& alt : sample.top_logprobs) {
        std::fprintf(stderr, " %d:%.4f", alt.token_id, alt.logprob);
      }
      std::fprintf(stderr, "\n");
    }
    PS_ASSIGN_OR_RETURN(ps::engine::StopStep step, stop_checker.Append(token, text));
    WriteOut(step.released);
    if (step.finish_reason.has_value()) {
      finish_reason = *step.finish_reason;
      break;
    }
    if (position >= model->max_context()) {  // no room for this token's successor
      WriteOut(stop_checker.Release() + detokenizer.Flush());
      std::fprintf(stderr, "\n[context limit %lld reached]", static_cast<long long>(position));
      break;
    }
    const ps::engine::DecodeItem item{slot, position, token};
    PS_RETURN_IF_ERROR(model->Decode({&item, 1}, absl::MakeSpan(logits)));
    ++position;
  }
  const double decode_seconds = SecondsSince(decode_start);

  std::fprintf(stderr, "\nfinish reason: %s\n",
               std::string(FinishReasonName(finish_reason)).c_str());
  std::fprintf(stderr, "prompt tokens: %zu (%.1f tokens/s)\n", prompt_ids.size(),
               Rate(static_cast<int64_t>(prompt_ids.size()), prompt_seconds));
  std::fprintf(stderr, "generated tokens: %lld (%.1f tokens/s)\n",
               static_cast<long long>(num_generated), Rate(num_generated, decode_seconds));
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
