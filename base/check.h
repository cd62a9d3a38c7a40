// PS_DCHECK(condition): a debug check of one of our own invariants (a size the caller promised, a
// slot that must be in use), never of input: input errors are statuses (docs/architecture.md,
// "Errors"). It replaces assert(), which every build CI runs compiled out (Release has NDEBUG,
// and so has RelWithDebInfo, the sanitizer and fuzz builds' type).
//
// On when the build defines PS_DCHECK_IS_ON=1: the CMake option PS_DCHECK, which the sanitizer and
// fuzz builds turn on (scripts/sanitize, scripts/fuzz) and Release leaves off. On, a failed check
// prints the condition and where it is to stderr and aborts (which the sanitizers and libFuzzer
// report with a stack). Off, the condition is not evaluated (it still has to compile), so a check
// costs nothing in the serving build.
//
//   PS_DCHECK(n >= 1 && w.size() == n * k);
#ifndef POLYSKETCH_BASE_CHECK_H_
#define POLYSKETCH_BASE_CHECK_H_

#include <cstdio>
#include <cstdlib>

namespace ps {

#if defined(PS_DCHECK_IS_ON) && PS_DCHECK_IS_ON
inline constexpr bool kDcheckIsOn = true;
#else
inline constexpr bool kDcheckIsOn = false;
#endif

namespace check_internal {

[[noreturn]] inline void DcheckFailed(const char* condition, const char* file, int line) {
  std::fprintf(stderr, "%s:%d: PS_DCHECK failed: %s\n", file, line, condition);
  std::fflush(stderr);
  std::abort();
}

}  // namespace check_internal
}  // namespace ps

#if defined(PS_DCHECK_IS_ON) && PS_DCHECK_IS_ON
#define PS_DCHECK(condition)    \
  (static_cast<bool>(condition) \
       ? static_cast<void>(0)   \
       : ::ps::check_internal::DcheckFailed(#condition, __FILE__, __LINE__))
#else
// sizeof: the condition is type-checked but never evaluated, and the variables it names count as
// used (no -Wunused warnings in a build without checks).
#define PS_DCHECK(condition) static_cast<void>(sizeof(static_cast<bool>(condition)))
#endif

#endif  // POLYSKETCH_BASE_CHECK_H_
