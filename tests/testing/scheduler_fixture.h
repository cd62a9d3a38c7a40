// A Scheduler over a golden fixture model on a given backend, for engine and service tests, and a
// wait for its slots to come back. Header-only (tests that use it link the scheduler). Failures are
// reported as test failures; the result is null when anything failed.
#ifndef POLYSKETCH_TESTS_TESTING_SCHEDULER_FIXTURE_H_
#define POLYSKETCH_TESTS_TESTING_SCHEDULER_FIXTURE_H_

#include <memory>
#include <string>
#include <utility>

#include <absl/time/clock.h>
#include <absl/time/time.h>
#include <gtest/gtest.h>

#include "server/engine/model_io/weights.h"
#include "server/engine/serving/scheduler.h"
#include "tests/testing/files.h"

namespace ps::test {

// Loads the model in `model_dir` (absolute; e.g. GoldenFixture::model_dir, under models/ for the
// shipped models' fixtures), builds it with `model_options` and a scheduler with `options` (its
// model_fingerprint set from the weights). `config`, when given, receives the model's config.
inline std::unique_ptr<engine::Scheduler> MakeModelScheduler(
    const std::string& model_dir, kernels::Backend& backend,
    const engine::ModelOptions& model_options, engine::SchedulerOptions options,
    engine::ModelConfig* config = nullptr) {
  absl::StatusOr<engine::ModelWeights> weights = engine::LoadWeights(model_dir);
  EXPECT_TRUE(weights.ok()) << weights.status();
  if (!weights.ok()) return nullptr;
  if (config != nullptr) *config = weights->config;
  options.model_fingerprint = engine::ModelFingerprint(*weights);
  absl::StatusOr<std::unique_ptr<engine::Model>> model =
      engine::Model::Create(*weights, backend, model_options);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return nullptr;
  absl::StatusOr<std::unique_ptr<engine::Scheduler>> scheduler =
      engine::Scheduler::Create(*std::move(model), std::move(options));
  EXPECT_TRUE(scheduler.ok()) << scheduler.status();
  return scheduler.ok() ? *std::move(scheduler) : nullptr;
}

// MakeModelScheduler for a tiny fixture, whose folder holds its model (tests/golden/<fixture>).
inline std::unique_ptr<engine::Scheduler> MakeFixtureScheduler(
    const std::string& fixture, kernels::Backend& backend,
    const engine::ModelOptions& model_options, engine::SchedulerOptions options,
    engine::ModelConfig* config = nullptr) {
  return MakeModelScheduler(SourcePath("tests/golden/" + fixture), backend, model_options,
                            std::move(options), config);
}

// Waits up to `timeout` until `scheduler` has no slot in use (every request it ran has ended and
// given its slot back); false when some slot is still in use then.
inline bool WaitSlotsFree(const engine::Scheduler& scheduler,
                          absl::Duration timeout = absl::Seconds(10)) {
  const absl::Time end = absl::Now() + timeout;
  while (scheduler.Stats().slots_used != 0) {
    if (absl::Now() >= end) return false;
    absl::SleepFor(absl::Milliseconds(20));
  }
  return true;
}

}  // namespace ps::test

#endif  // POLYSKETCH_TESTS_TESTING_SCHEDULER_FIXTURE_H_
