// Recorder: a RequestObserver for engine tests that keeps every event of one request; Wait
// blocks until OnFinish. Header-only (tests that use it link the scheduler).
#ifndef POLYSKETCH_TESTS_TESTING_RECORDER_H_
#define POLYSKETCH_TESTS_TESTING_RECORDER_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "server/engine/scheduler.h"

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
  int finishes_ = 0;
  engine::FinalResult result_;
};

}  // namespace ps::test

#endif  // POLYSKETCH_TESTS_TESTING_RECORDER_H_
