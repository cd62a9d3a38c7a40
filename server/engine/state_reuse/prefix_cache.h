// PrefixCache: snapshots of sequence states at prompt positions, keyed by the token prefix, so
// that a request whose prompt starts like an earlier one restores that state and prefills only
// the rest. With a constant-size state this is cheap in a way a KV cache is not: a snapshot of
// any prefix, however long, costs one state (StateLayout::bytes_per_slot).
//
// Keys: snapshots are taken only at multiples of `granularity` tokens; the key of a prefix of
// length k * g is a chained Fingerprint64 over its blocks of g tokens (Hashes), seeded with the
// model fingerprint and the request's Scope. Every entry also keeps its tokens and its scope, and
// a hit is confirmed token by token and scope by scope, so a hash collision can never hand out a
// wrong state, nor another scope's.
//
// Scopes keep callers apart (docs/security.md): a hit makes a request faster and is reported to
// its caller (cached_tokens), so a cache shared by every caller would tell one caller whether
// another already sent a given prompt prefix. A prefix is therefore cached under the identity
// that sent it (EngineRequest::owner) and the request's cache salt, and only a request with the
// same owner and salt finds it. shared_across_owners drops the owner from the scope (one cache for
// every identity, for deployments whose callers trust each other); the salt still separates.
//
// Which prefixes are worth a snapshot (a state is megabytes, so not every block of every prompt):
// the scheduler asks Remember for the longest prefix of a new prompt that an earlier prompt
// shared (a prefix seen twice is likely to be seen again: a system prompt, a few-shot preamble)
// and snapshots there, plus at the last block boundary of the prompt (the next turn of a
// conversation resent in full starts with it). Remember keeps up to `max_remembered` prefix
// hashes and forgets them all at once past that (8 bytes each; a cheap, bounded admission
// filter).
//
// Bounded by budget_bytes (snapshot bytes plus the tokens kept), least recently used first out.
//
// Thread-compatibility: the engine thread only; stats(), MakeScope, Hashes and Holds may be called
// from any thread.
#ifndef POLYSKETCH_SERVER_ENGINE_STATE_REUSE_PREFIX_CACHE_H_
#define POLYSKETCH_SERVER_ENGINE_STATE_REUSE_PREFIX_CACHE_H_

#include <atomic>
#include <cstdint>
#include <list>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <absl/base/thread_annotations.h>
#include <absl/container/flat_hash_map.h>
#include <absl/container/flat_hash_set.h>
#include <absl/strings/string_view.h>
#include <absl/types/span.h>

#include "server/engine/model/state_snapshot.h"

namespace ps::engine {

struct PrefixCacheOptions {
  int64_t budget_bytes = 0;  // 0: the cache is off
  int64_t granularity = 64;  // snapshot positions are multiples of this many tokens, >= 1
  int64_t max_remembered = int64_t{1} << 20;
  // false (default): a cached prefix serves only requests of the identity that stored it. true:
  // every identity's (--prefix_cache_shared); requests with different salts never share.
  bool shared_across_owners = false;
};

struct PrefixCacheStats {
  int64_t hits = 0;        // lookups that restored a prefix
  int64_t misses = 0;      // lookups that found none
  int64_t insertions = 0;  // snapshots stored
  int64_t evictions = 0;   // snapshots dropped for the budget
  int64_t entries = 0;
  int64_t bytes = 0;       // in use, <= budget_bytes
  int64_t hit_tokens = 0;  // prompt tokens not prefilled thanks to hits
};

class PrefixCache {
 public:
  // `seed` separates models (the model fingerprint). options.granularity must be >= 1 (the
  // scheduler checks its options).
  PrefixCache(PrefixCacheOptions options, uint64_t seed);
  PrefixCache(const PrefixCache&) = delete;
  PrefixCache& operator=(const PrefixCache&) = delete;

  bool enabled() const { return options_.budget_bytes > 0; }
  int64_t granularity() const { return options_.granularity; }

  // Whose cached prefixes a request may use: `key` names the scope exactly (empty for the
  // unscoped cache: no owner counted and no salt), `seed` seeds its prefix keys.
  struct Scope {
    std::string key;
    uint64_t seed = 0;
  };
  // The scope of a request of `owner` (dropped when shared_across_owners) with `salt` (may be
  // empty).
  Scope MakeScope(absl::string_view owner, absl::string_view salt) const;

  // hashes[i] is the key of tokens[0, (i + 1) * granularity) in `scope`, for every whole block.
  // Without a scope: the unscoped one (MakeScope("", "")).
  std::vector<uint64_t> Hashes(absl::Span<const int32_t> tokens, const Scope& scope) const;
  std::vector<uint64_t> Hashes(absl::Span<const int32_t> tokens) const {
    return Hashes(tokens, MakeScope("", ""));
  }

  // The longest cached prefix of `tokens` no longer than max_length: its state (valid until the
  // next Insert), or null with length 0. Counts a hit or a miss.
  struct Hit {
    int64_t length = 0;
    const StateSnapshot* state = nullptr;
  };
  // Only an entry of `scope` (the one its hashes were made in) is a hit.
  Hit Lookup(absl::Span<const int32_t> tokens, absl::Span<const uint64_t> hashes,
             int64_t max_length, const Scope& scope);
  Hit Lookup(absl::Span<const int32_t> tokens, absl::Span<const uint64_t> hashes,
             int64_t max_length) {
    return Lookup(tokens, hashes, max_length, MakeScope("", ""));
  }

  // Remembers the prefixes of a prompt; returns the longest one no longer than max_length that
  // was remembered before (0: none).
  int64_t Remember(absl::Span<const uint64_t> hashes, int64_t max_length);

  // True when the prefix with this key is cached.
  bool Contains(uint64_t hash) const { return index_.contains(hash); }
  // The same, from any thread (the shared prefix tier asks only for prefixes longer than the
  // longest one cached here, on the thread that submits a request).
  bool Holds(uint64_t hash) const;

  // Stores the state of `prefix` (snapshot.position == prefix.size(), a multiple of granularity)
  // under `hash`, evicting least recently used entries to stay within the budget. A snapshot
  // larger than the whole budget, or one already cached, is not stored.
  // `hash` is the prefix's key in `scope`.
  void Insert(absl::Span<const int32_t> prefix, uint64_t hash, StateSnapshot snapshot,
              const Scope& scope);
  void Insert(absl::Span<const int32_t> prefix, uint64_t hash, StateSnapshot snapshot) {
    Insert(prefix, hash, std::move(snapshot), MakeScope("", ""));
  }

  PrefixCacheStats stats() const;

 private:
  struct Entry {
    uint64_t hash = 0;
    std::string scope;  // Scope::key
    std::vector<int32_t> tokens;
    StateSnapshot state;
    int64_t bytes = 0;
  };
  using Lru = std::list<Entry>;  // most recently used first

  const PrefixCacheOptions options_;
  const uint64_t seed_;
  Lru lru_;
  absl::flat_hash_map<uint64_t, Lru::iterator> index_;
  // The keys of index_, for Holds from other threads.
  mutable std::mutex held_mu_;
  absl::flat_hash_set<uint64_t> held_ ABSL_GUARDED_BY(held_mu_);
  absl::flat_hash_set<uint64_t> remembered_;
  int64_t bytes_ = 0;

  std::atomic<int64_t> hits_{0}, misses_{0}, insertions_{0}, evictions_{0}, entries_{0},
      bytes_stat_{0}, hit_tokens_{0};
};

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_STATE_REUSE_PREFIX_CACHE_H_
