// polysketch-bench: end-to-end engine figures on this machine (docs/performance.md).
//   * prefill time of one sequence for each prompt length in --contexts;
//   * decode step time at each batch size in --batches for sequences at each of those contexts
//     (the prefilled state is copied into every slot of the batch), with tokens/s and the bytes
//     a step moves (weights once, plus every sequence's attention state or KV rows) per second;
//   * attention memory per request at each context;
//   * the copy bandwidth of the same device (--copy_mib MiB: a threaded memcpy on the CPU, a
//     device-to-device copy on a GPU), to compare against.
// --device picks the backend (auto, cpu, cuda). A model is a directory or a synthetic shape with
// random weights and a byte vocabulary:
//   gpt2-small-polysketch  GPT-2-small's shape (12 layers, 12 heads, width 768), learned sketches,
//                          r 32, local_exact blocks of 256;
//   gpt2-small-softmax     the same shape with softmax attention (the baseline, KV cache);
//   1b-polysketch          a 1B-class shape (24 layers, 16 heads, width 2048, h 128), as above;
//   1b-softmax             the same with softmax attention.
// --weights_dtype fp32,bf16,int8 measures each weight format of the linear layers (issue 19) in
// the same run, so that their ratios come from one machine state.
// --kv_cache_dtype fp32,fp16 likewise measures every context with each KV-cache dtype in turn
// (same run, same prompt), for the models with KV layers.
// Prints a table to stdout and, with --csv, one row per measurement.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <absl/flags/flag.h>
#include <absl/flags/parse.h>
#include <absl/flags/usage.h>
#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_join.h>
#include <absl/strings/str_split.h>

#include "base/status_macros.h"
#include "kernels/attention_mask.h"
#include "kernels/backend_factory.h"
#include "kernels/cpu/cpu_backend.h"
#include "server/engine/model/kv_cache_dtype.h"
#include "server/engine/model/model.h"
#include "server/engine/model/weights_dtype.h"
#include "server/engine/model_io/weights.h"

ABSL_FLAG(std::string, model, "models/tiny-polysketch",
          "Model directory, or gpt2-small-polysketch, gpt2-small-softmax, 1b-polysketch, "
          "1b-softmax (random weights).");
ABSL_FLAG(std::string, device, "auto", "Kernel backend: auto, cpu, cuda.");
ABSL_FLAG(std::string, contexts, "1024,4096,16384,65536", "Context lengths (tokens), comma list.");
ABSL_FLAG(std::string, batches, "1,8,32", "Decode batch sizes, comma list.");
ABSL_FLAG(int, steps, 8,
          "Timed decode steps per (context, batch); the median and the mean are reported. A "
          "local_exact model's steps are not all alike (the first b / 8 of a block also fold the "
          "previous block, algorithm.md section 4): time b steps for what a stream costs.");
ABSL_FLAG(int, threads, 0, "CPU kernel threads; 0 = one per hardware thread.");
ABSL_FLAG(int64_t, prefill_chunk, 512, "Tokens per prefill pass.");
ABSL_FLAG(double, budget_gib, 12.0,
          "Most GiB of state slots to allocate; batches that need more are skipped.");
ABSL_FLAG(int64_t, copy_mib, 1024, "Size of the memcpy that measures copy bandwidth.");
ABSL_FLAG(std::string, csv, "", "Also write the measurements to this CSV file.");
ABSL_FLAG(std::string, weights_dtype, "auto",
          "Comma list of --weights_dtype values (auto, fp32, bf16, int8), each measured in turn in "
          "the same run: e.g. fp32,bf16,int8 for their ratios.");
ABSL_FLAG(std::string, kv_cache_dtype, "fp32",
          "Comma list of --kv_cache_dtype values (auto, fp32, fp16) to measure each context with, "
          "in turn in the same run; only the models with KV layers differ.");

namespace {

using Clock = std::chrono::steady_clock;
using ps::engine::DecodeItem;
using ps::engine::Model;
using ps::engine::ModelOptions;
using ps::engine::ModelWeights;
using ps::engine::SlotId;

double Seconds(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

absl::StatusOr<std::vector<int64_t>> ParseList(const std::string& text, const char* flag) {
  std::vector<int64_t> values;
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int64_t value = 0;
    if (!absl::SimpleAtoi(item, &value) || value < 1) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, ": '", item, "' is not >= 1"));
    }
    values.push_back(value);
  }
  if (values.empty()) return absl::InvalidArgumentError(absl::StrCat("--", flag, " is empty"));
  return values;
}

// Synthetic shapes with random weights (normal(0, 0.02) matrices, LayerNorms at identity), as
// issues 4 and 6 ask: GPT-2-small's shape or a 1B-class one, polysketch (learned sketches, r 32,
// local_exact blocks of 256) or softmax attention. max_seq_len covers the longest context the
// benchmarks use (softmax caches are sized from it).
bool IsSyntheticModel(const std::string& name) {
  return name == "gpt2-small-polysketch" || name == "gpt2-small-softmax" ||
         name == "1b-polysketch" || name == "1b-softmax";
}

absl::StatusOr<ModelWeights> SyntheticModel(const std::string& name) {
  const bool big = name.starts_with("1b-");
  const bool softmax = name.ends_with("-softmax");
  const int n_layers = big ? 24 : 12;
  const int n_heads = big ? 16 : 12;
  const int d_model = big ? 2048 : 768;
  std::string layers;
  for (int l = 0; l < n_layers; ++l) {
    absl::StrAppend(&layers, l ? "," : "",
                    softmax ? R"({"kind": "softmax"})"
                            : R"({"kind": "polysketch", "sketch": "learned", "sketch_size": 32, )"
                              R"("block_size": 256, "local_exact": true})");
  }
  const std::string json =
      absl::StrCat(R"({"architecture": "polysketchformer", "vocab_size": 256, "d_model": )",
                   d_model, R"(, "n_layers": )", n_layers, R"(, "n_heads": )", n_heads,
                   R"(, "max_seq_len": 262144, "layers": [)", layers, "]}");
  ModelWeights weights;
  PS_ASSIGN_OR_RETURN(weights.config, ps::engine::ParseModelConfig(json, name));
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  for (const ps::engine::TensorSpec& spec : weights.config.ExpectedTensors()) {
    ps::engine::HostTensor tensor;
    tensor.shape = spec.shape;
    int64_t size = 1;
    for (int64_t d : spec.shape) size *= d;
    const bool norm =
        spec.name.find("norm") != std::string::npos || spec.name.find("ln") != std::string::npos;
    const bool is_bias = spec.name.ends_with(".bias") || spec.name == "logit_bias";
    tensor.data.resize(static_cast<size_t>(size));
    for (float& x : tensor.data) x = norm ? (is_bias ? 0.0f : 1.0f) : normal(rng);
    if (spec.name == "logit_bias") std::fill(tensor.data.begin(), tensor.data.end(), 0.0f);
    weights.tensors.emplace(spec.name, std::move(tensor));
  }
  return weights;
}

// Bytes one decode step moves for one sequence at `position` tokens: its sketch state read (and
// written where the step updates it: plain S), the local buffer of a local_exact layer (counted
// whole; its one-in-b folding step also writes S), its sliding-window ring or its kept KV rows
// read.
int64_t StateBytesPerStep(const Model& model, int64_t position) {
  using ps::engine::AttentionKind;
  using C = ps::engine::StateComponent;
  const ps::engine::ModelConfig& cfg = model.config();
  int64_t bytes = 0;
  for (int64_t l = 0; l < model.layout().num_layers(); ++l) {
    const ps::engine::LayerStateLayout& ll = model.layout().layer(l);
    if (ll.kind == AttentionKind::kPolysketch) {
      const int64_t s = ll.region(C::kSketch).size_bytes;
      // plain: read + write S; local_exact: read S_prev and the buffer (k~, v; psi(k) is read
      // only by the fold at a block start).
      bytes += ll.local_size == 0 ? 2 * s
                                  : s + ll.region(C::kLocalKeys).size_bytes +
                                        ll.region(C::kLocalValues).size_bytes;
    } else if (!ll.needs_kv_cache) {
      bytes += ll.bytes();  // the sliding-window ring
    } else {
      // The rows the step's query reads: every kept row, or a strided query's w + t/s.
      const auto mask = ps::engine::AttentionKeyMask(cfg.layers[static_cast<size_t>(l)]);
      const bool strided = mask.kind == ps::kernels::KeyMask::Kind::kStrided;
      bytes += (strided ? mask.NumVisible(position) : mask.KeptAfter(position + 1)) *
               ll.kv_bytes_per_token;  // k and v rows in the cache's dtype
    }
  }
  return bytes;
}

// Bytes of the weights as a CPU backend holds them: matrices (the linear layers) in `dtype`
// (int8 plus a 4-byte scale per row), vectors in fp32.
int64_t WeightBytes(const ModelWeights& weights, ps::kernels::WeightDtype dtype) {
  int64_t bytes = 0;
  for (const auto& [name, tensor] : weights.tensors) {
    const auto count = static_cast<int64_t>(tensor.data.size());
    if (tensor.shape.size() != 2 || dtype == ps::kernels::WeightDtype::kFp32) {
      bytes += count * 4;
    } else if (dtype == ps::kernels::WeightDtype::kBf16) {
      bytes += count * 2;
    } else {
      bytes += count + tensor.shape[0] * 4;
    }
  }
  return bytes;
}

// Copy bandwidth of a GPU backend: a device-to-device Copy of `mib` MiB, timed to a 4-byte copy
// back (which waits for it); bytes read plus bytes written per second, best of 5.
absl::StatusOr<double> DeviceCopyBandwidth(ps::kernels::Backend& backend, int64_t mib) {
  const int64_t bytes = mib << 20;
  PS_ASSIGN_OR_RETURN(ps::kernels::DeviceBuffer a, backend.Allocate(bytes));
  PS_ASSIGN_OR_RETURN(ps::kernels::DeviceBuffer b, backend.Allocate(bytes));
  float sink = 0.0f;
  backend.Copy(a.data(), bytes, b.data());  // warm-up
  backend.CopyToHost(b.data(), sizeof(sink), &sink);
  double best = 1e30;
  for (int i = 0; i < 5; ++i) {
    const auto start = Clock::now();
    backend.Copy(a.data(), bytes, b.data());
    backend.CopyToHost(b.data(), sizeof(sink), &sink);
    best = std::min(best, Seconds(start));
  }
  return 2.0 * static_cast<double>(bytes) / best;
}

// Copy bandwidth of this machine with the engine's threads: memcpy of `mib` MiB split across the
// kernel thread pool; bytes read plus bytes written per second, best of 5.
double CopyBandwidth(ps::kernels::cpu::ThreadPool& pool, int64_t mib) {
  const int64_t bytes = mib << 20;
  std::vector<char> a(static_cast<size_t>(bytes), 1), b(static_cast<size_t>(bytes), 2);
  const int64_t block = 1 << 20;
  double best = 1e30;
  for (int i = 0; i < 5; ++i) {
    const auto start = Clock::now();
    pool.ParallelFor(bytes / block, 1, [&](int64_t begin, int64_t end) {
      std::memcpy(b.data() + begin * block, a.data() + begin * block,
                  static_cast<size_t>((end - begin) * block));
    });
    best = std::min(best, Seconds(start));
    a[static_cast<size_t>(i)] = b[static_cast<size_t>(bytes - 1 - i)];  // keep copies observable
  }
  return 2.0 * static_cast<double>(bytes) / best;
}

absl::Status Run() {
  const std::string model_name = absl::GetFlag(FLAGS_model);
  PS_ASSIGN_OR_RETURN(const std::vector<int64_t> contexts,
                      ParseList(absl::GetFlag(FLAGS_contexts), "contexts"));
  PS_ASSIGN_OR_RETURN(const std::vector<int64_t> batches,
                      ParseList(absl::GetFlag(FLAGS_batches), "batches"));
  const int steps = std::max(1, absl::GetFlag(FLAGS_steps));
  std::vector<std::string> kv_names =
      absl::StrSplit(absl::GetFlag(FLAGS_kv_cache_dtype), ',', absl::SkipEmpty());
  if (kv_names.empty()) return absl::InvalidArgumentError("--kv_cache_dtype is empty");
  ModelWeights weights;
  if (IsSyntheticModel(model_name)) {
    PS_ASSIGN_OR_RETURN(weights, SyntheticModel(model_name));
  } else {
    PS_ASSIGN_OR_RETURN(weights, ps::engine::LoadWeights(model_name));
  }
  PS_ASSIGN_OR_RETURN(
      std::unique_ptr<ps::kernels::Backend> backend_ptr,
      ps::kernels::CreateBackend(absl::GetFlag(FLAGS_device), absl::GetFlag(FLAGS_threads)));
  ps::kernels::Backend& backend = *backend_ptr;
  double copy_bw = 0.0;
  std::string where;
  if (backend.host_memory()) {
    auto& cpu = static_cast<ps::kernels::cpu::CpuBackend&>(backend);  // the only host backend
    copy_bw = CopyBandwidth(cpu.pool(), absl::GetFlag(FLAGS_copy_mib));
    where = absl::StrCat("cpu, ", cpu.num_threads(), " threads; memcpy");
  } else {
    PS_ASSIGN_OR_RETURN(copy_bw, DeviceCopyBandwidth(backend, absl::GetFlag(FLAGS_copy_mib)));
    where = absl::StrCat(backend.name(), "; device-to-device copy");
  }
  std::vector<ps::kernels::WeightDtype> dtypes;
  std::vector<std::string> dtype_flags = absl::StrSplit(absl::GetFlag(FLAGS_weights_dtype), ',');
  for (const std::string& flag : dtype_flags) {
    PS_ASSIGN_OR_RETURN(ps::kernels::WeightDtype dtype,
                        ps::engine::ResolveWeightsDtype(flag, weights, backend));
    dtypes.push_back(dtype);
  }
  std::vector<ps::kernels::KvCacheDtype> kv_dtypes;
  for (const std::string& name : kv_names) {
    PS_ASSIGN_OR_RETURN(kv_dtypes.emplace_back(),
                        ps::engine::ResolveKvCacheDtype(name, backend.name()));
  }
  std::printf("model %s: %s bandwidth %.2f GB/s (read+write)\n", model_name.c_str(), where.c_str(),
              copy_bw / 1e9);
  std::printf("%7s %9s %4s %5s %12s %12s %12s %14s %10s %8s %10s\n", "weights", "context", "kv",
              "batch", "prefill_s", "step_ms", "tokens/s", "attn_bytes/req", "GB/s", "%copy",
              "mean_ms");
  std::ofstream csv;
  if (!absl::GetFlag(FLAGS_csv).empty()) {
    csv.open(absl::GetFlag(FLAGS_csv));
    if (!csv) return absl::NotFoundError(absl::StrCat("cannot write ", absl::GetFlag(FLAGS_csv)));
    csv << "model,weights,context,kv_cache_dtype,batch,prefill_s,step_ms,tokens_per_s,"
           "attention_bytes_per_request,"
           "bytes_per_step,gb_per_s,copy_gb_per_s,mean_step_ms\n";
  }
  const int64_t max_batch = *std::max_element(batches.begin(), batches.end());
  std::mt19937 rng(7);
  for (size_t d = 0; d < dtypes.size(); ++d) {
    const ps::kernels::WeightDtype dtype = dtypes[d];
    const std::string dtype_name(ps::kernels::WeightDtypeName(dtype));
    // Weights as the backend holds them: the CPU's in `dtype`; a GPU's fp32 run as bf16 operands.
    const int64_t weight_bytes = backend.host_memory()
                                     ? WeightBytes(weights, dtype)
                                     : WeightBytes(weights, ps::kernels::WeightDtype::kBf16);
    std::printf("weights %s: %lld bytes as held by the backend\n", dtype_name.c_str(),
                static_cast<long long>(weight_bytes));
    for (const int64_t context : contexts) {
      for (const ps::kernels::KvCacheDtype kv_dtype : kv_dtypes) {
        const std::string kv(ps::engine::KvCacheDtypeName(kv_dtype));
        ModelOptions options;
        options.weights_dtype = dtype;
        options.kv_cache_dtype = kv_dtype;
        options.prefill_chunk = absl::GetFlag(FLAGS_prefill_chunk);
        options.max_batch = max_batch;
        options.num_slots = 1;
        // KV models need room for the context plus the timed steps; constant-state ones ignore it.
        options.max_context = context + steps + 2;
        PS_ASSIGN_OR_RETURN(std::unique_ptr<Model> probe, Model::Create(weights, backend, options));
        const int64_t slot_bytes = std::max<int64_t>(1, probe->layout().bytes_per_slot());
        probe.reset();
        const auto budget = static_cast<int64_t>(absl::GetFlag(FLAGS_budget_gib) * (1 << 30));
        options.num_slots = std::clamp<int64_t>(budget / slot_bytes, 1, max_batch + 1);
        PS_ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Create(weights, backend, options));
        const int64_t V = model->config().vocab_size;

        std::vector<int32_t> prompt(static_cast<size_t>(context));
        for (int32_t& t : prompt) t = static_cast<int32_t>(rng() % static_cast<uint32_t>(V));
        PS_ASSIGN_OR_RETURN(const SlotId source, model->AcquireSlot());
        std::vector<float> last(static_cast<size_t>(V));
        const auto prefill_start = Clock::now();
        PS_RETURN_IF_ERROR(model->Prefill(source, 0, prompt, absl::MakeSpan(last)));
        const double prefill_s = Seconds(prefill_start);
        const int64_t attn_bytes = model->AttentionBytesAt(context);

        for (const int64_t batch : batches) {
          if (batch + 1 > model->pool().num_slots()) {
            std::printf(
                "%7s %9lld %4s %5lld %12.3f  skipped: %lld slots of %lld bytes exceed "
                "--budget_gib\n",
                dtype_name.c_str(), static_cast<long long>(context), kv.c_str(),
                static_cast<long long>(batch), prefill_s, static_cast<long long>(batch + 1),
                static_cast<long long>(slot_bytes));
            continue;
          }
          std::vector<SlotId> slots;
          for (int64_t b = 0; b < batch; ++b) {
            PS_ASSIGN_OR_RETURN(SlotId slot, model->AcquireSlot());
            PS_RETURN_IF_ERROR(model->CopySlot(source, slot));
            slots.push_back(slot);
          }
          std::vector<float> logits(static_cast<size_t>(batch * V));
          std::vector<double> times;
          for (int s = 0; s < steps + 2; ++s) {  // two warm-up steps
            std::vector<DecodeItem> items;
            for (const SlotId slot : slots) {
              items.push_back({slot, model->SlotPosition(slot),
                               static_cast<int32_t>(rng() % static_cast<uint32_t>(V))});
            }
            const auto start = Clock::now();
            PS_RETURN_IF_ERROR(model->Decode(items, absl::MakeSpan(logits)));
            if (s >= 2) times.push_back(Seconds(start));
          }
          const double mean_step =
              std::accumulate(times.begin(), times.end(), 0.0) / static_cast<double>(times.size());
          std::sort(times.begin(), times.end());
          const double step = times[times.size() / 2];
          const int64_t bytes = weight_bytes + batch * StateBytesPerStep(*model, context);
          const double gbps = static_cast<double>(bytes) / step / 1e9;
          std::printf("%7s %9lld %4s %5lld %12.3f %12.3f %12.1f %14lld %10.2f %7.1f%% %10.3f\n",
                      dtype_name.c_str(), static_cast<long long>(context), kv.c_str(),
                      static_cast<long long>(batch), prefill_s, step * 1e3,
                      static_cast<double>(batch) / step, static_cast<long long>(attn_bytes), gbps,
                      100.0 * gbps * 1e9 / copy_bw, mean_step * 1e3);
          std::fflush(stdout);
          if (csv.is_open()) {
            csv << model_name << ',' << dtype_name << ',' << context << ',' << kv << ',' << batch
                << ',' << prefill_s << ',' << step * 1e3 << ',' << static_cast<double>(batch) / step
                << ',' << attn_bytes << ',' << bytes << ',' << gbps << ',' << copy_bw / 1e9 << ','
                << mean_step * 1e3 << '\n';
          }
          for (const SlotId slot : slots) PS_RETURN_IF_ERROR(model->ReleaseSlot(slot));
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Prefill and batched-decode figures of the engine: polysketch-bench --model DIR "
      "[--device auto|cpu|cuda] [--contexts 1024,4096] [--batches 1,8,32] [--csv out.csv]");
  absl::ParseCommandLine(argc, argv);
  const absl::Status status = Run();
  if (!status.ok()) {
    std::fprintf(stderr, "polysketch-bench: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  return 0;
}
