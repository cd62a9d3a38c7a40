// Fingerprint64: a fast, stable 64-bit hash of bytes (the same value on every machine, run and
// build), for content identity: prefix-cache keys, the model fingerprint in exported states and
// their checksum. Not cryptographic: it detects accidents (a state from another model, a
// truncated or corrupted file), not an attacker, who can always compute a matching value; the
// importer therefore validates a state's contents as well
// (server/engine/state_reuse/state_codec.h).
//
// It is xxHash's XXH3 64-bit hash with a seed (XXH3_64bits_withSeed, the library of Debian's
// libxxhash-dev, format stable since xxHash 0.8.0), so its values can be checked against the
// published test vectors and recomputed by any xxHash binding. Exported states written before
// the switch (format version 1, a hash of this project's own) are refused by name
// (state_codec.h).
#ifndef POLYSKETCH_BASE_HASH_H_
#define POLYSKETCH_BASE_HASH_H_

#include <cstddef>
#include <cstdint>
#include <xxhash.h>

namespace ps {

// The 64-bit fingerprint of bytes [data, data + size) under `seed` (different seeds give
// independent hashes of the same bytes): XXH3_64bits_withSeed.
inline uint64_t Fingerprint64(const void* data, size_t size, uint64_t seed = 0) {
  return XXH3_64bits_withSeed(data, size, seed);
}

// Fingerprint64 of the 8 bytes of `value` (in memory order: little-endian on every host this
// builds for) under `seed`: chains fingerprints (e.g. a running hash of a token prefix, one
// block at a time).
inline uint64_t Fingerprint64Combine(uint64_t seed, uint64_t value) {
  return Fingerprint64(&value, sizeof(value), seed);
}

}  // namespace ps

#endif  // POLYSKETCH_BASE_HASH_H_
