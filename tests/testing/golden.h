// The PyTorch golden fixtures of tests/golden/ (format: tests/golden/README.md), loaded for the
// engine's parity tests, and the measures those tests compare logits with.
#ifndef POLYSKETCH_TESTS_TESTING_GOLDEN_H_
#define POLYSKETCH_TESTS_TESTING_GOLDEN_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <absl/status/statusor.h>

namespace ps::test {

struct GoldenFixture {
  std::string name;
  std::string model_dir;           // absolute
  std::vector<int32_t> tokens;     // the prompt [n]
  std::vector<int32_t> positions;  // [P] positions whose prefill logits are recorded
  std::vector<float> prefill;      // [P, V]
  std::vector<int32_t> greedy;     // [G]
  std::vector<float> decode;       // [G, V]
  int64_t vocab_size = 0;          // V
};

// Every fixture folder under tests/golden, sorted: every folder, also one that lacks its
// golden.safetensors, so that a test of a fixture that is not there fails (LoadGoldenFixture says
// NotFound) instead of quietly not running.
std::vector<std::string> GoldenFixtureNames();
// The same for the folders under `root` (tests use their own).
std::vector<std::string> GoldenFixtureNamesIn(const std::string& root);

// Loads tests/golden/<name>. The model itself is not loaded (see model_dir).
absl::StatusOr<GoldenFixture> LoadGoldenFixture(const std::string& name);

// log_softmax (float64) of recorded prefill row p: entry id is log P(id | tokens[0..positions[p]]),
// so entry tokens[positions[p] + 1] is the teacher-forced log-probability of that prompt token.
std::vector<double> GoldenPrefillLogSoftmax(const GoldenFixture& golden, size_t p);

// A fixture name as a GoogleTest parameter name ('-' -> '_').
std::string GoldenTestName(const std::string& name);

// Largest |got[i] - want[i]| / max(1, |want[i]|) over n values: how the engine's logits are
// measured against the fixtures' (relative for large logits, absolute near zero).
double MaxRelError(const float* got, const float* want, size_t n);

// The id of the largest of `V` logits, the lowest id on ties (greedy decoding).
int32_t Argmax(const float* logits, int64_t V);

// A model's prefill logits of the fixture's prompt, `all` [n, V] (one row per prompt token),
// against the rows the fixture recorded: expects each within `tol` (MaxRelError), naming the
// position when not; returns the largest error.
double ExpectPrefillMatchesGolden(const std::vector<float>& all, const GoldenFixture& golden,
                                  double tol);

}  // namespace ps::test

#endif  // POLYSKETCH_TESTS_TESTING_GOLDEN_H_
