// Which earlier keys a query may attend to: the causal rule plus the window / stride / chunk rules
// of the sparse kinds (algorithm.md section 2; train/model.py allowed()), and which keys a KV cache
// must keep for later queries. Shared by the scalar reference model, every backend's KV-cache
// attention, the engine's cache sizing and the state codec. Header-only.
#ifndef POLYSKETCH_KERNELS_ATTENTION_MASK_H_
#define POLYSKETCH_KERNELS_ATTENTION_MASK_H_

#include <cstdint>

namespace ps::kernels {

// Keys as two arithmetic runs, in ascending order: num_far keys far_first + m * far_step, then
// size - num_far consecutive keys from near_first. Key(v) for v in [0, size). The default-built
// runs with only `size` set are the identity 0 .. size-1 (every row of a cache).
struct VisibleRuns {
  int64_t num_far = 0;
  int64_t far_first = 0;
  int64_t far_step = 1;
  int64_t near_first = 0;
  int64_t size = 0;

  constexpr int64_t Key(int64_t v) const {
    return v < num_far ? far_first + v * far_step : near_first + (v - num_far);
  }
};

// A key mask. Visible(i, j) is what query i attends to; Kept(i, j) is what a cache holds once
// query i has run: every key that query i or a later one sees. Under kWindow and kFixed
// visibility is monotone (once lost it never comes back), so Kept == Visible and a cache drops
// key j as soon as its newest query cannot see it. Under kStrided key j is seen again by every
// query j + m * stride, so the cache keeps every key, like kCausal: its memory is O(n) rows, not
// window + n / stride; only the work per query is window + i / stride keys (the visible runs).
struct KeyMask {
  enum class Kind {
    kCausal,   // every j <= i (softmax, polynomial)
    kWindow,   // i - j < window (sliding_window)
    kStrided,  // i - j < window, or (i - j) % stride == 0 (sparse_strided; Child et al. 2019)
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
        return i - j < window || (i - j) % stride == 0;
      case Kind::kFixed:
        return i / chunk == j / chunk || j % chunk >= chunk - summary;
      case Kind::kCausal:
        break;
    }
    return true;
  }

  // Whether the cache keeps every key (kCausal, kStrided): then row r of a list cache holds
  // position r, and nothing is ever dropped.
  constexpr bool KeepsEveryKey() const { return kind == Kind::kCausal || kind == Kind::kStrided; }

  // Whether a cache that has run query i still holds key j: some query i' >= i sees j. Monotone:
  // once false for some i, false for every later i.
  constexpr bool Kept(int64_t i, int64_t j) const {
    return KeepsEveryKey() ? j <= i : Visible(i, j);
  }

  // How many of the keys of positions [0, n) a cache keeps after n tokens (0 for n == 0): the
  // count of Kept(n - 1, j).
  constexpr int64_t KeptAfter(int64_t n) const {
    if (n <= 0) return 0;
    switch (kind) {
      case Kind::kWindow:
        return n < window ? n : window;
      case Kind::kFixed:
        return (n - 1) % chunk + 1 + ((n - 1) / chunk) * summary;
      case Kind::kCausal:
      case Kind::kStrided:
        break;
    }
    return n;
  }

  // kStrided: the keys query i sees, in ascending position order (StridedRuns(i) documents
  // them); NumVisible(i) <= window + i / stride of them, the v-th at VisibleKey(i, v).
  constexpr VisibleRuns StridedRuns(int64_t i) const;
  constexpr int64_t NumVisible(int64_t i) const;
  constexpr int64_t VisibleKey(int64_t i, int64_t v) const;

  // The most keys a cache under this mask ever holds for one sequence whose positions stay below
  // `max_positions`, counting the new key of a decode step before the keys it hides are dropped.
  constexpr int64_t MaxKept(int64_t max_positions) const {
    int64_t kept = max_positions;
    switch (kind) {
      case Kind::kWindow:
        kept = window + 1;
        break;
      case Kind::kFixed:
        kept = chunk + 1 + summary * (max_positions / chunk);
        break;
      case Kind::kCausal:
      case Kind::kStrided:
        break;
    }
    return kept < max_positions ? kept : max_positions;
  }
};

// Query i of a strided mask sees the far keys i % stride + m * stride, each at least `window` back
// (the nearest is stride * ceil(window / stride) back), then the near run [i - window + 1, i].
constexpr VisibleRuns KeyMask::StridedRuns(int64_t i) const {
  VisibleRuns runs;
  const int64_t nearest_far = i - stride * ((window + stride - 1) / stride);
  runs.num_far = nearest_far < 0 ? 0 : nearest_far / stride + 1;
  runs.far_first = i % stride;
  runs.far_step = stride;
  runs.near_first = i - window + 1 > 0 ? i - window + 1 : 0;
  runs.size = runs.num_far + i - runs.near_first + 1;
  return runs;
}
constexpr int64_t KeyMask::NumVisible(int64_t i) const { return StridedRuns(i).size; }
constexpr int64_t KeyMask::VisibleKey(int64_t i, int64_t v) const { return StridedRuns(i).Key(v); }

}  // namespace ps::kernels

#endif  // POLYSKETCH_KERNELS_ATTENTION_MASK_H_
