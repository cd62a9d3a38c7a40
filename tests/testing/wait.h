// WaitUntil: polls a condition until it holds or a deadline passes, for tests that wait on another
// thread (the engine thread, a server). A test must never wait without a bound: a bug that stops
// the condition from coming true then fails the test with a message instead of hanging CI until
// ctest's timeout kills it. Header-only.
#ifndef POLYSKETCH_TESTS_TESTING_WAIT_H_
#define POLYSKETCH_TESTS_TESTING_WAIT_H_

#include <absl/time/clock.h>
#include <absl/time/time.h>

namespace ps::test {

// True as soon as `condition()` is; false if it is still false after `timeout` (checked every
// millisecond). Use as ASSERT_TRUE(WaitUntil([&] { return ...; })) << "what did not happen".
template <typename Condition>
bool WaitUntil(Condition condition, absl::Duration timeout = absl::Seconds(30)) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!condition()) {
    if (absl::Now() >= deadline) return condition();
    absl::SleepFor(absl::Milliseconds(1));
  }
  return true;
}

}  // namespace ps::test

#endif  // POLYSKETCH_TESTS_TESTING_WAIT_H_
