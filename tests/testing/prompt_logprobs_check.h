// Checks an engine's prompt log-probabilities (EngineRequest::prompt_logprobs) against a golden
// fixture: the PyTorch reference's logits, turned into teacher-forced log-probabilities at the
// positions it recorded (log_softmax of the row at position p scores prompt token p + 1).
// Header-only: shared by the scheduler test (CPU backend) and the CUDA model test.
#ifndef POLYSKETCH_TESTS_TESTING_PROMPT_LOGPROBS_CHECK_H_
#define POLYSKETCH_TESTS_TESTING_PROMPT_LOGPROBS_CHECK_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <set>
#include <vector>

#include <gtest/gtest.h>

#include "server/engine/serving/scheduler.h"
#include "tests/testing/golden.h"

namespace ps::test {

// Expects `got` to be the n - 1 prompt log-probabilities of golden.tokens with top_n alternatives
// each: ids in prompt order; at every recorded position the logprob of the token and of each
// alternative within `tol` of the reference's log_softmax, the alternatives distinct, most likely
// first, and each among the reference's top_n up to 2 tol (near-ties may swap). Returns the
// largest |got - want| seen.
inline double ExpectPromptLogprobsMatchGolden(const GoldenFixture& golden,
                                              const std::vector<engine::TokenOutput>& got,
                                              int64_t top_n, double tol) {
  const size_t n = golden.tokens.size();
  EXPECT_EQ(got.size(), n - 1);
  if (got.size() != n - 1) return INFINITY;
  for (size_t i = 0; i + 1 < n; ++i) {
    const engine::TokenOutput& entry = got[i];
    EXPECT_EQ(entry.token_id, golden.tokens[i + 1]) << "entry " << i;
    EXPECT_TRUE(std::isfinite(entry.logprob) && entry.logprob <= 0.0f) << "entry " << i;
    EXPECT_EQ(static_cast<int64_t>(entry.top_logprobs.size()), top_n) << "entry " << i;
    for (size_t k = 1; k < entry.top_logprobs.size(); ++k) {
      EXPECT_GE(entry.top_logprobs[k - 1].logprob, entry.top_logprobs[k].logprob)
          << "entry " << i << " alternative " << k << ": not most likely first";
    }
  }
  double worst = 0.0;
  int64_t checked = 0;
  for (size_t p = 0; p < golden.positions.size(); ++p) {
    const auto pos = static_cast<size_t>(golden.positions[p]);
    if (pos + 1 >= n) continue;  // the last prompt token's logits score no prompt token
    ++checked;
    const std::vector<double> want = GoldenPrefillLogSoftmax(golden, p);
    const engine::TokenOutput& entry = got[pos];
    const double e = std::fabs(entry.logprob - want[static_cast<size_t>(golden.tokens[pos + 1])]);
    EXPECT_LE(e, tol) << "position " << pos;
    worst = std::max(worst, e);
    std::vector<double> sorted = want;
    std::sort(sorted.begin(), sorted.end(), std::greater<double>());
    std::set<int32_t> ids;
    for (const engine::TokenLogprob& alt : entry.top_logprobs) {
      EXPECT_TRUE(ids.insert(alt.token_id).second) << "position " << pos << ": repeated id";
      EXPECT_GE(alt.token_id, 0);
      EXPECT_LT(alt.token_id, golden.vocab_size);
      if (alt.token_id < 0 || alt.token_id >= golden.vocab_size) continue;
      const double w = want[static_cast<size_t>(alt.token_id)];
      EXPECT_LE(std::fabs(alt.logprob - w), tol) << "position " << pos << " id " << alt.token_id;
      worst = std::max(worst, std::fabs(alt.logprob - w));
      if (top_n > 0) {
        EXPECT_GE(w, sorted[static_cast<size_t>(top_n - 1)] - 2 * tol)
            << "position " << pos << ": id " << alt.token_id << " is not among the top " << top_n;
      }
    }
  }
  EXPECT_GT(checked, 0) << "the fixture records no position inside the prompt";
  return worst;
}

}  // namespace ps::test

#endif  // POLYSKETCH_TESTS_TESTING_PROMPT_LOGPROBS_CHECK_H_
