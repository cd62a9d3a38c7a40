// Recorder: a RequestObserver for engine tests that keeps every event of one request (prompt
// log-probabilities too); Wait blocks until OnFinish; SetBacklogged plays a slow client.
// Header-only (tests that use it link the scheduler).
#ifndef POLYSKETCH_TESTS_TESTING_RECORDER_H_
#define POLYSKETCH_TESTS_TESTING_RECORDER_H_

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "server/engine/serving/scheduler.h"

namespace ps::test {

class Recorder : public engine::RequestObserver {
 public:
  void OnDelta(engine::StreamDelta delta) override {
    std::lock_guard<std::mutex> lock(mu_);
    for (const engine::TokenOutput& t : delta.tokens) {
      tokens_.push_back(t.token_id);
      logprobs_.push_back(t.logprob);
    }
    text_ += delta.text;
    ++deltas_;
    if (!delta.prompt_logprobs.empty()) {
      // Prompt log-probabilities come before every generated token, in deltas of their own.
      if (!tokens_.empty() || !delta.tokens.empty() || !delta.text.empty()) ++misplaced_;
      largest_prompt_delta_ =
          std::max(largest_prompt_delta_, static_cast<int64_t>(delta.prompt_logprobs.size()));
      ++prompt_deltas_;
      for (engine::TokenOutput& t : delta.prompt_logprobs) prompt_logprobs_.push_back(std::move(t));
    }
  }
  // Backlogged() answers true this many more times (RequestObserver::Backlogged).
  void SetBacklogged(int64_t times) {
    std::lock_guard<std::mutex> lock(mu_);
    backlogged_ = times;
  }
  bool Backlogged() override {
    std::lock_guard<std::mutex> lock(mu_);
    ++backlog_queries_;
    if (backlogged_ == 0) return false;
    --backlogged_;
    return true;
  }
  void OnFinish(engine::FinalResult result) override {
    std::lock_guard<std::mutex> lock(mu_);
    ++finishes_;
    result_ = std::move(result);
    done_.notify_all();
  }
  // False when the request did not finish within `seconds`.
  bool Wait(double seconds = 60) {
    std::unique_lock<std::mutex> lock(mu_);
    return done_.wait_for(lock, std::chrono::duration<double>(seconds),
                          [&] { return finishes_ > 0; });
  }
  std::vector<int32_t> tokens() {
    std::lock_guard<std::mutex> lock(mu_);
    return tokens_;
  }
  // The log-probability of each token (0 unless the request asked for logprobs).
  std::vector<float> logprobs() {
    std::lock_guard<std::mutex> lock(mu_);
    return logprobs_;
  }
  std::string text() {
    std::lock_guard<std::mutex> lock(mu_);
    return text_;
  }
  int64_t deltas() {
    std::lock_guard<std::mutex> lock(mu_);
    return deltas_;
  }
  std::vector<engine::TokenOutput> prompt_logprobs() {
    std::lock_guard<std::mutex> lock(mu_);
    return prompt_logprobs_;
  }
  int64_t prompt_deltas() {
    std::lock_guard<std::mutex> lock(mu_);
    return prompt_deltas_;
  }
  int64_t largest_prompt_delta() {
    std::lock_guard<std::mutex> lock(mu_);
    return largest_prompt_delta_;
  }
  // Deltas of prompt log-probabilities that came after (or with) generated output.
  int64_t misplaced_prompt_deltas() {
    std::lock_guard<std::mutex> lock(mu_);
    return misplaced_;
  }
  int64_t backlog_queries() {
    std::lock_guard<std::mutex> lock(mu_);
    return backlog_queries_;
  }
  engine::FinalResult result() {
    std::lock_guard<std::mutex> lock(mu_);
    return result_;
  }
  int finishes() {
    std::lock_guard<std::mutex> lock(mu_);
    return finishes_;
  }

 private:
  std::mutex mu_;
  std::condition_variable done_;
  std::vector<int32_t> tokens_;
  std::vector<float> logprobs_;
  std::string text_;
  int64_t deltas_ = 0;
  std::vector<engine::TokenOutput> prompt_logprobs_;
  int64_t prompt_deltas_ = 0;
  int64_t largest_prompt_delta_ = 0;
  int64_t misplaced_ = 0;
  int64_t backlogged_ = 0;
  int64_t backlog_queries_ = 0;
  int finishes_ = 0;
  engine::FinalResult result_;
};

}  // namespace ps::test

#endif  // POLYSKETCH_TESTS_TESTING_RECORDER_H_
