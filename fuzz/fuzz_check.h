// The fuzz targets' assertion: an invariant of the code under test that failed. It prints what
// broke and aborts, which libFuzzer reports as a crash and saves the input for. Harness code only:
// the server never aborts on input (docs/architecture.md, "Errors").
#ifndef POLYSKETCH_FUZZ_FUZZ_CHECK_H_
#define POLYSKETCH_FUZZ_FUZZ_CHECK_H_

#include <cstdio>
#include <cstdlib>

#define PS_FUZZ_CHECK(condition, ...)                                                        \
  do {                                                                                       \
    if (!(condition)) {                                                                      \
      std::fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #condition); \
      std::fprintf(stderr, "  " __VA_ARGS__);                                                \
      std::fprintf(stderr, "\n");                                                            \
      std::abort();                                                                          \
    }                                                                                        \
  } while (false)

#endif  // POLYSKETCH_FUZZ_FUZZ_CHECK_H_
