// Fingerprint64: a fast, stable 64-bit hash of bytes (the same value on every machine, run and
// build), for content identity: prefix-cache keys, the model fingerprint in exported states and
// their checksum. Not cryptographic: it detects accidents (a state from another model, a
// truncated or corrupted file), not an attacker, who can always compute a matching value; the
// importer therefore validates a state's contents as well
// (server/engine/state_reuse/state_codec.h).
//
// Construction: 16-byte blocks folded into the running value with 64x64->128-bit multiplies
// (each product's halves xor-ed), the length mixed into the final round. About 5-10 GB/s.
#ifndef POLYSKETCH_BASE_HASH_H_
#define POLYSKETCH_BASE_HASH_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace ps {
namespace hash_internal {

inline constexpr uint64_t kK0 = 0xa0761d6478bd642fULL;
inline constexpr uint64_t kK1 = 0xe7037ed1a0b428dbULL;
inline constexpr uint64_t kK2 = 0x8ebc6af09c88c6e3ULL;
inline constexpr uint64_t kK3 = 0x589965cc75374cc3ULL;

inline uint64_t MulFold(uint64_t a, uint64_t b) {
  const unsigned __int128 product = static_cast<unsigned __int128>(a) * b;
  return static_cast<uint64_t>(product) ^ static_cast<uint64_t>(product >> 64);
}

inline uint64_t Load64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof(v));  // little-endian hosts only (x86-64, aarch64)
  return v;
}

}  // namespace hash_internal

// The 64-bit fingerprint of bytes [data, data + size) under `seed` (different seeds give
// independent hashes of the same bytes).
inline uint64_t Fingerprint64(const void* data, size_t size, uint64_t seed = 0) {
  using namespace hash_internal;  // NOLINT(google-build-using-namespace): local constants
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t h = seed ^ MulFold(seed ^ kK0, kK1);
  size_t left = size;
  while (left >= 16) {
    h = MulFold(Load64(p) ^ kK1, Load64(p + 8) ^ h);
    p += 16;
    left -= 16;
  }
  uint64_t a = 0;
  uint64_t b = 0;
  if (left >= 8) {
    a = Load64(p);
    std::memcpy(&b, p + 8, left - 8);
  } else {
    std::memcpy(&a, p, left);
  }
  h = MulFold(a ^ kK2 ^ h, b ^ kK3);
  return MulFold(h ^ kK0, static_cast<uint64_t>(size) ^ kK1);
}

// Fingerprint64 of the 8 bytes of `value` under `seed`: chains fingerprints (e.g. a running hash
// of a token prefix, one block at a time).
inline uint64_t Fingerprint64Combine(uint64_t seed, uint64_t value) {
  return Fingerprint64(&value, sizeof(value), seed);
}

}  // namespace ps

#endif  // POLYSKETCH_BASE_HASH_H_
