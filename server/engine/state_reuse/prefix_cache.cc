#include "server/engine/state_reuse/prefix_cache.h"

#include <algorithm>
#include <utility>

#include <absl/strings/str_cat.h>

#include "base/hash.h"

namespace ps::engine {

PrefixCache::PrefixCache(PrefixCacheOptions options, uint64_t seed)
    : options_(options), seed_(seed) {}

PrefixCache::Scope PrefixCache::MakeScope(absl::string_view owner, absl::string_view salt) const {
  if (options_.shared_across_owners) owner = "";
  if (owner.empty() && salt.empty()) return Scope{"", seed_};
  // Length-prefixed owner, then the salt: no two (owner, salt) pairs give the same key.
  Scope scope;
  scope.key = absl::StrCat(owner.size(), ":", owner, salt);
  scope.seed = Fingerprint64(scope.key.data(), scope.key.size(), seed_);
  return scope;
}

std::vector<uint64_t> PrefixCache::Hashes(absl::Span<const int32_t> tokens,
                                          const Scope& scope) const {
  const int64_t g = options_.granularity;
  const int64_t blocks = static_cast<int64_t>(tokens.size()) / g;
  std::vector<uint64_t> hashes(static_cast<size_t>(blocks));
  uint64_t h = scope.seed;
  for (int64_t i = 0; i < blocks; ++i) {
    h = Fingerprint64(tokens.data() + i * g, static_cast<size_t>(g) * sizeof(int32_t), h);
    hashes[static_cast<size_t>(i)] = h;
  }
  return hashes;
}

PrefixCache::Hit PrefixCache::Lookup(absl::Span<const int32_t> tokens,
                                     absl::Span<const uint64_t> hashes, int64_t max_length,
                                     const Scope& scope) {
  const int64_t g = options_.granularity;
  for (int64_t i = std::min<int64_t>(static_cast<int64_t>(hashes.size()), max_length / g); i >= 1;
       --i) {
    auto it = index_.find(hashes[static_cast<size_t>(i - 1)]);
    if (it == index_.end()) continue;
    const Entry& entry = *it->second;
    const int64_t length = i * g;
    if (entry.scope != scope.key) continue;  // a hash collision across scopes
    if (!std::equal(entry.tokens.begin(), entry.tokens.end(), tokens.begin(),
                    tokens.begin() + length)) {
      continue;  // a hash collision: not this prefix
    }
    lru_.splice(lru_.begin(), lru_, it->second);
    hits_.fetch_add(1, std::memory_order_relaxed);
    hit_tokens_.fetch_add(length, std::memory_order_relaxed);
    return {length, &it->second->state};
  }
  misses_.fetch_add(1, std::memory_order_relaxed);
  return {};
}

int64_t PrefixCache::Remember(absl::Span<const uint64_t> hashes, int64_t max_length) {
  const int64_t g = options_.granularity;
  int64_t shared = 0;
  for (size_t i = 0; i < hashes.size(); ++i) {
    const int64_t length = static_cast<int64_t>(i + 1) * g;
    if (length <= max_length && remembered_.contains(hashes[i])) shared = length;
  }
  if (static_cast<int64_t>(remembered_.size() + hashes.size()) > options_.max_remembered) {
    remembered_.clear();
  }
  remembered_.insert(hashes.begin(), hashes.end());
  return shared;
}

void PrefixCache::Insert(absl::Span<const int32_t> prefix, uint64_t hash, StateSnapshot snapshot,
                         const Scope& scope) {
  const int64_t bytes = snapshot.size_bytes() +
                        static_cast<int64_t>(prefix.size() * sizeof(int32_t) + scope.key.size());
  if (!enabled() || bytes > options_.budget_bytes || index_.contains(hash)) return;
  std::lock_guard<std::mutex> lock(held_mu_);
  while (bytes_ + bytes > options_.budget_bytes && !lru_.empty()) {
    bytes_ -= lru_.back().bytes;
    index_.erase(lru_.back().hash);
    held_.erase(lru_.back().hash);
    lru_.pop_back();
    evictions_.fetch_add(1, std::memory_order_relaxed);
  }
  lru_.push_front(Entry{hash, scope.key, std::vector<int32_t>(prefix.begin(), prefix.end()),
                        std::move(snapshot), bytes});
  index_[hash] = lru_.begin();
  held_.insert(hash);
  bytes_ += bytes;
  insertions_.fetch_add(1, std::memory_order_relaxed);
  entries_.store(static_cast<int64_t>(lru_.size()), std::memory_order_relaxed);
  bytes_stat_.store(bytes_, std::memory_order_relaxed);
}

bool PrefixCache::Holds(uint64_t hash) const {
  std::lock_guard<std::mutex> lock(held_mu_);
  return held_.contains(hash);
}

PrefixCacheStats PrefixCache::stats() const {
  PrefixCacheStats s;
  s.hits = hits_.load(std::memory_order_relaxed);
  s.misses = misses_.load(std::memory_order_relaxed);
  s.insertions = insertions_.load(std::memory_order_relaxed);
  s.evictions = evictions_.load(std::memory_order_relaxed);
  s.entries = entries_.load(std::memory_order_relaxed);
  s.bytes = bytes_stat_.load(std::memory_order_relaxed);
  s.hit_tokens = hit_tokens_.load(std::memory_order_relaxed);
  return s;
}

}  // namespace ps::engine
