// PS_DCHECK (base/check.h): on, a failed check aborts naming the condition and its place, and a
// passing one evaluates its condition once; off, it evaluates nothing. The sanitizer and fuzz
// builds have it on (CMake option PS_DCHECK), so the invariants of kernels/ and the state pool run
// there, which assert() never did in any build CI runs.
#include "base/check.h"

#include <gtest/gtest.h>

namespace ps {
namespace {

int calls = 0;
bool CountedTrue() {
  ++calls;
  return true;
}

TEST(CheckDeathTest, AFailedCheckAbortsWithTheConditionWhenOn) {
  if constexpr (!kDcheckIsOn) {
    PS_DCHECK(1 + 1 == 3);  // off: nothing happens
    SUCCEED() << "PS_DCHECK is off in this build";
  } else {
    GTEST_FLAG_SET(death_test_style, "threadsafe");
    EXPECT_DEATH(PS_DCHECK(1 + 1 == 3), "check_test.cc:[0-9]+: PS_DCHECK failed: 1 \\+ 1 == 3");
  }
}

TEST(CheckTest, APassingCheckEvaluatesItsConditionOnceWhenOnAndNeverWhenOff) {
  calls = 0;
  PS_DCHECK(CountedTrue());
  EXPECT_EQ(calls, kDcheckIsOn ? 1 : 0);
}

// The sanitizer builds (scripts/sanitize) and the fuzz build (scripts/fuzz) are where the checks
// must run; tests/CMakeLists.txt defines PS_TEST_EXPECT_DCHECK in those.
TEST(CheckTest, OnInTheSanitizerAndFuzzBuilds) {
#if defined(PS_TEST_EXPECT_DCHECK)
  EXPECT_TRUE(kDcheckIsOn) << "a sanitizer build without PS_DCHECK";
#else
  SUCCEED() << "not a sanitizer build";
#endif
}

}  // namespace
}  // namespace ps
