// Which earlier keys a query may attend to: the causal rule plus the window / stride / chunk rules
// of the sparse kinds (algorithm.md section 2; train/model.py allowed()). Shared by the scalar
// reference model, every backend's KV-cache attention and the engine's cache sizing. Header-only.
#ifndef POLYSKETCH_KERNELS_ATTENTION_MASK_H_
#define POLYSKETCH_KERNELS_ATTENTION_MASK_H_

#include <cstdint>

namespace ps::kernels {

// A key mask. Visibility is monotone: once Visible(i, j) is false for some query i, it is false
// for every later query too, so a cache may drop key j as soon as its newest query cannot see it.
struct KeyMask {
  enum class Kind {
    kCausal,   // every j <= i (softmax, polynomial)
    kWindow,   // i - j < window (sliding_window)
    kStrided,  // i - j < window, or j % stride == 0 (sparse_strided)
    kFixed,    // same chunk of `chunk` positions, or j is one of the last `summary` of its chunk
  };
  Kind kind = Kind::kCausal;
  int64_t window = 0;   // kWindow, kStrided: >= 1
  int64_t stride = 0;   // kStrided: >= 1
  int64_t chunk = 0;    // kFixed: >= 1
  int64_t summary = 0;  // kFixed: 1..chunk

  // Whether query position i sees key position j.
  constexpr bool Visible(int64_t i, int64_t j) const {
    if (j > i) return false;
    switch (kind) {
      case Kind::kWindow:
        return i - j < window;
      case Kind::kStrided:
        return i - j < window || j % stride == 0;
      case Kind::kFixed:
        return i / chunk == j / chunk || j % chunk >= chunk - summary;
      case Kind::kCausal:
        break;
    }
    return true;
  }

  // How many of the keys of positions [0, n) position n - 1 still sees: what a cache keeps after
  // n tokens (0 for n == 0).
  constexpr int64_t KeptAfter(int64_t n) const {
    if (n <= 0) return 0;
    switch (kind) {
      case Kind::kWindow:
        return n < window ? n : window;
      case Kind::kStrided: {
        const int64_t recent = n < window ? n : window;
        const int64_t older = n - recent;  // positions [0, older), kept when j % stride == 0
        return recent + (older + stride - 1) / stride;
      }
      case Kind::kFixed:
        return (n - 1) % chunk + 1 + ((n - 1) / chunk) * summary;
      case Kind::kCausal:
        break;
    }
    return n;
  }

  // The most keys a cache under this mask ever holds for one sequence whose positions stay below
  // `max_positions`, counting the new key of a decode step before the keys it hides are dropped.
  constexpr int64_t MaxKept(int64_t max_positions) const {
    int64_t kept = max_positions;
    switch (kind) {
      case Kind::kWindow:
        kept = window + 1;
        break;
      case Kind::kStrided:
        kept = window + 1 + (max_positions + stride - 1) / stride;
        break;
      case Kind::kFixed:
        kept = chunk + 1 + summary * (max_positions / chunk);
        break;
      case Kind::kCausal:
        break;
    }
    return kept < max_positions ? kept : max_positions;
  }
};

}  // namespace ps::kernels

#endif  // POLYSKETCH_KERNELS_ATTENTION_MASK_H_
