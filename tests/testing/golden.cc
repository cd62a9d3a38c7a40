#include "tests/testing/golden.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include <absl/status/status.h>
#include <absl/strings/str_cat.h>
#include <gtest/gtest.h>

#include "base/status_macros.h"
#include "server/engine/model_io/safetensors.h"
#include "tests/testing/files.h"

namespace ps::test {

std::vector<std::string> GoldenFixtureNames() {
  return GoldenFixtureNamesIn(SourcePath("tests/golden"));
}

std::vector<std::string> GoldenFixtureNamesIn(const std::string& root) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(root)) {
    if (entry.is_directory()) names.push_back(entry.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

absl::StatusOr<GoldenFixture> LoadGoldenFixture(const std::string& name) {
  const std::string dir = SourcePath("tests/golden/" + name);
  PS_ASSIGN_OR_RETURN(engine::SafetensorsFile golden,
                      engine::SafetensorsFile::Open(dir + "/golden.safetensors"));
  GoldenFixture f;
  f.name = name;
  const auto model_dir = golden.metadata().find("model_dir");
  if (model_dir == golden.metadata().end()) {
    return absl::DataLossError(absl::StrCat(dir, ": golden.safetensors lacks model_dir"));
  }
  f.model_dir = dir + "/" + model_dir->second;
  PS_ASSIGN_OR_RETURN(f.tokens, golden.ReadInt32("tokens"));
  PS_ASSIGN_OR_RETURN(f.positions, golden.ReadInt32("positions"));
  PS_ASSIGN_OR_RETURN(f.prefill, golden.ReadFloat32("prefill_logits"));
  PS_ASSIGN_OR_RETURN(f.greedy, golden.ReadInt32("greedy_tokens"));
  PS_ASSIGN_OR_RETURN(f.decode, golden.ReadFloat32("decode_logits"));
  if (f.positions.empty() || f.prefill.size() % f.positions.size() != 0 || f.tokens.empty()) {
    return absl::DataLossError(absl::StrCat(dir, ": inconsistent golden tensors"));
  }
  f.vocab_size = static_cast<int64_t>(f.prefill.size() / f.positions.size());
  if (f.decode.size() != f.greedy.size() * static_cast<size_t>(f.vocab_size)) {
    return absl::DataLossError(absl::StrCat(dir, ": decode_logits is not [G, V]"));
  }
  return f;
}

std::vector<double> GoldenPrefillLogSoftmax(const GoldenFixture& golden, size_t p) {
  const auto V = static_cast<size_t>(golden.vocab_size);
  const float* row = golden.prefill.data() + p * V;
  const double max = *std::max_element(row, row + V);
  double sum = 0;
  for (size_t i = 0; i < V; ++i) sum += std::exp(double{row[i]} - max);
  const double log_normalizer = max + std::log(sum);
  std::vector<double> out(V);
  for (size_t i = 0; i < V; ++i) out[i] = double{row[i]} - log_normalizer;
  return out;
}

std::string GoldenTestName(const std::string& name) {
  std::string out = name;
  std::replace(out.begin(), out.end(), '-', '_');
  return out;
}

double MaxRelError(const float* got, const float* want, size_t n) {
  double worst = 0.0;
  for (size_t i = 0; i < n; ++i) {
    worst = std::max(
        worst, std::fabs(double{got[i]} - want[i]) / std::max(1.0, std::fabs(double{want[i]})));
  }
  return worst;
}

int32_t Argmax(const float* logits, int64_t V) {
  return static_cast<int32_t>(std::max_element(logits, logits + V) - logits);
}

double ExpectPrefillMatchesGolden(const std::vector<float>& all, const GoldenFixture& golden,
                                  double tol) {
  const int64_t V = golden.vocab_size;
  double worst = 0.0;
  for (size_t p = 0; p < golden.positions.size(); ++p) {
    const double e = MaxRelError(all.data() + golden.positions[p] * V,
                                 golden.prefill.data() + p * V, static_cast<size_t>(V));
    EXPECT_LE(e, tol) << "prefill position " << golden.positions[p];
    worst = std::max(worst, e);
  }
  return worst;
}

}  // namespace ps::test
