// The symmetric-packed row order of a sketch state S[a, c, :] (algorithm.md section 4: S is
// symmetric in a and c, so only the r(r+1)/2 rows with a <= c are stored). Shared by the engine's
// state layout and every kernel that reads or writes a state; header-only, no dependencies.
#ifndef POLYSKETCH_KERNELS_PACKED_INDEX_H_
#define POLYSKETCH_KERNELS_PACKED_INDEX_H_

#include <cstdint>

namespace ps::kernels {

// Number of unique rows of a symmetric r x r matrix: r(r+1)/2.
constexpr int64_t PackedSymmetricRows(int64_t r) { return r * (r + 1) / 2; }

// Index of the pair (a, c), 0 <= a <= c < r, in the symmetric-packed order: row-major upper
// triangle, i.e. (0,0), (0,1), ..., (0,r-1), (1,1), (1,2), ..., (r-1,r-1). Row a starts at
// a*r - a(a-1)/2. Callers with a > c swap them first (S[a,c] == S[c,a]). A bijection from the
// upper triangle onto [0, PackedSymmetricRows(r)). Preconditions are not checked (hot path).
constexpr int64_t PackedSymmetricIndex(int64_t a, int64_t c, int64_t r) {
  return a * r - a * (a - 1) / 2 + (c - a);
}

}  // namespace ps::kernels

#endif  // POLYSKETCH_KERNELS_PACKED_INDEX_H_
