// PrefixCache alone: longest-prefix lookup, token-by-token confirmation of a hit (a colliding key
// never hands out another prefix's state), the remembered-prefix admission rule and the byte
// budget with LRU eviction, and scopes that keep owners and salts apart.
#include "server/engine/state_reuse/prefix_cache.h"

#include <vector>

#include <gtest/gtest.h>

namespace ps::engine {
namespace {

std::vector<int32_t> Range(int32_t first, int32_t n) {
  std::vector<int32_t> out;
  for (int32_t i = 0; i < n; ++i) out.push_back(first + i);
  return out;
}

StateSnapshot Snapshot(int64_t position, int64_t bytes) {
  StateSnapshot s;
  s.position = position;
  s.bytes.resize(static_cast<size_t>(bytes), std::byte{static_cast<unsigned char>(position)});
  return s;
}

TEST(PrefixCacheTest, FindsTheLongestCachedPrefix) {
  PrefixCache cache({.budget_bytes = 1 << 20, .granularity = 4, .max_remembered = 100}, 7);
  const std::vector<int32_t> tokens = Range(0, 19);
  const std::vector<uint64_t> hashes = cache.Hashes(tokens);
  ASSERT_EQ(hashes.size(), 4u);
  EXPECT_EQ(cache.Lookup(tokens, hashes, 18).state, nullptr);
  cache.Insert(absl::MakeConstSpan(tokens).subspan(0, 4), hashes[0], Snapshot(4, 100));
  cache.Insert(absl::MakeConstSpan(tokens).subspan(0, 12), hashes[2], Snapshot(12, 100));
  PrefixCache::Hit hit = cache.Lookup(tokens, hashes, 18);
  ASSERT_NE(hit.state, nullptr);
  EXPECT_EQ(hit.length, 12);
  EXPECT_EQ(hit.state->position, 12);
  // Not longer than asked.
  hit = cache.Lookup(tokens, hashes, 11);
  EXPECT_EQ(hit.length, 4);
  // Another prompt sharing only the first block.
  std::vector<int32_t> other = tokens;
  other[5] = 1000;
  hit = cache.Lookup(other, cache.Hashes(other), 18);
  EXPECT_EQ(hit.length, 4);
  const PrefixCacheStats stats = cache.stats();
  EXPECT_EQ(stats.hits, 3);
  EXPECT_EQ(stats.misses, 1);
  EXPECT_EQ(stats.hit_tokens, 12 + 4 + 4);
  // Different seeds (models) give different keys.
  PrefixCache other_model({.budget_bytes = 1 << 20, .granularity = 4, .max_remembered = 100}, 8);
  EXPECT_NE(other_model.Hashes(tokens)[0], hashes[0]);
}

TEST(PrefixCacheTest, AHitIsConfirmedTokenByToken) {
  PrefixCache cache({.budget_bytes = 1 << 20, .granularity = 4, .max_remembered = 100}, 7);
  const std::vector<int32_t> a = Range(0, 9);
  const std::vector<int32_t> b = Range(50, 9);
  // Store a's prefix under b's key, as a hash collision would.
  cache.Insert(absl::MakeConstSpan(a).subspan(0, 8), cache.Hashes(b)[1], Snapshot(8, 10));
  EXPECT_EQ(cache.Lookup(b, cache.Hashes(b), 8).state, nullptr);
}

// Scopes: a prefix is found only in the scope it was cached in, by (owner, salt), or by salt
// alone when shared across owners; a colliding key of another scope is no hit either.
TEST(PrefixCacheTest, ScopesKeepOwnersAndSaltsApart) {
  for (const bool shared : {false, true}) {
    SCOPED_TRACE(shared ? "shared" : "per owner");
    PrefixCache cache({.budget_bytes = 1 << 20,
                       .granularity = 4,
                       .max_remembered = 100,
                       .shared_across_owners = shared},
                      7);
    const std::vector<int32_t> tokens = Range(0, 9);
    const PrefixCache::Scope alice = cache.MakeScope("alice", "");
    cache.Insert(absl::MakeConstSpan(tokens).subspan(0, 8), cache.Hashes(tokens, alice)[1],
                 Snapshot(8, 10), alice);
    auto found = [&](const PrefixCache::Scope& scope) {
      return cache.Lookup(tokens, cache.Hashes(tokens, scope), 8, scope).length;
    };
    EXPECT_EQ(found(alice), 8);
    EXPECT_EQ(found(cache.MakeScope("bob", "")), shared ? 8 : 0);
    EXPECT_EQ(found(cache.MakeScope("alice", "salt")), 0);
    const PrefixCache::Scope salted = cache.MakeScope("alice", "salt");
    cache.Insert(absl::MakeConstSpan(tokens).subspan(0, 8), cache.Hashes(tokens, salted)[1],
                 Snapshot(8, 10), salted);
    EXPECT_EQ(found(salted), 8);
    EXPECT_EQ(found(cache.MakeScope("alice", "pepper")), 0);
    EXPECT_EQ(found(cache.MakeScope("bob", "salt")), shared ? 8 : 0);
    // Owner and salt cannot be traded for each other.
    EXPECT_NE(cache.MakeScope("ab", "c").key, cache.MakeScope("a", "bc").key);
    // A key of alice's scope stored under bob's key (a collision): no hit for bob.
    if (!shared) {
      const PrefixCache::Scope bob = cache.MakeScope("bob", "");
      cache.Insert(absl::MakeConstSpan(tokens).subspan(0, 4), cache.Hashes(tokens, bob)[0],
                   Snapshot(4, 10), alice);
      EXPECT_EQ(found(bob), 0);
    }
  }
}

TEST(PrefixCacheTest, RemembersPrefixesSeenBefore) {
  PrefixCache cache({.budget_bytes = 1 << 20, .granularity = 4, .max_remembered = 100}, 7);
  std::vector<int32_t> first = Range(0, 30);
  std::vector<int32_t> second = Range(0, 30);
  second[17] = 999;  // shares 16 tokens (4 blocks) with the first
  EXPECT_EQ(cache.Remember(cache.Hashes(first), 29), 0);
  EXPECT_EQ(cache.Remember(cache.Hashes(second), 29), 16);
  EXPECT_EQ(cache.Remember(cache.Hashes(second), 10), 8);  // capped by max_length
}

TEST(PrefixCacheTest, StaysWithinItsBudgetEvictingTheLeastRecentlyUsed) {
  // Room for three entries of 1000 + 16 bytes.
  PrefixCache cache({.budget_bytes = 3100, .granularity = 4, .max_remembered = 100}, 7);
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 5; ++i) prompts.push_back(Range(i * 100, 5));
  auto insert = [&](int i) {
    cache.Insert(absl::MakeConstSpan(prompts[i]).subspan(0, 4), cache.Hashes(prompts[i])[0],
                 Snapshot(4, 1000));
  };
  auto cached = [&](int i) {
    return cache.Lookup(prompts[i], cache.Hashes(prompts[i]), 4).state != nullptr;
  };
  insert(0);
  insert(1);
  insert(2);
  EXPECT_TRUE(cached(0));  // 0 is now the most recently used
  insert(3);               // evicts 1
  EXPECT_FALSE(cached(1));
  EXPECT_TRUE(cached(0));
  EXPECT_TRUE(cached(2));
  EXPECT_TRUE(cached(3));
  insert(4);
  PrefixCacheStats stats = cache.stats();
  EXPECT_EQ(stats.evictions, 2);
  EXPECT_EQ(stats.entries, 3);
  EXPECT_LE(stats.bytes, 3100);
  // A snapshot larger than the whole budget is not kept, and evicts nothing.
  const std::vector<int32_t> big = Range(7000, 4);
  cache.Insert(big, cache.Hashes(big)[0], Snapshot(4, 5000));
  stats = cache.stats();
  EXPECT_EQ(stats.entries, 3);
  EXPECT_EQ(stats.evictions, 2);
}

}  // namespace
}  // namespace ps::engine
