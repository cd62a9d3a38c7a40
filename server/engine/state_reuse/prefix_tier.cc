#include "server/engine/state_reuse/prefix_tier.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <absl/strings/str_cat.h>
#include <absl/time/clock.h>

namespace ps::engine {
namespace {

constexpr char kPrefixMagic[8] = {'P', 'S', 'K', 'P', 'R', 'E', 'F', '1'};
// seen_ only saves writes of what the tier already has; past this many prefixes it starts over.
constexpr size_t kMaxSeen = size_t{1} << 16;

template <typename T>
void Append(std::string& out, T value) {
  char raw[sizeof(T)];
  std::memcpy(raw, &value, sizeof(T));
  out.append(raw, sizeof(T));
}

}  // namespace

PrefixTier::PrefixTier(StateTier* tier, const ModelIdentity* model, PrefixTierOptions options)
    : tier_(tier), model_(model), options_(options) {
  writer_ = std::thread([this] { WriterLoop(); });
}

PrefixTier::~PrefixTier() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  writer_.join();
}

std::string PrefixTier::KeyOf(uint64_t fingerprint, uint64_t hash) {
  return absl::StrCat("polysketch:", absl::Hex(fingerprint, absl::kZeroPad16),
                      ":p:", absl::Hex(hash, absl::kZeroPad16));
}

void PrefixTier::CountError(const absl::Status& status) {
  std::lock_guard<std::mutex> lock(stats_mu_);
  ++stats_.errors[static_cast<int>(ClassifyTierError(status))];
}

void PrefixTier::Observe(TierOp op, absl::Duration elapsed) {
  const double s = absl::ToDoubleSeconds(elapsed);
  size_t bucket = 0;
  while (bucket < kTierLatencyBuckets.size() && s > kTierLatencyBuckets[bucket]) ++bucket;
  std::lock_guard<std::mutex> lock(stats_mu_);
  TierLatency& l = stats_.latency[static_cast<int>(op)];
  ++l.buckets[bucket];
  l.sum_seconds += s;
  ++l.count;
}

void PrefixTier::Seen(uint64_t hash) {
  if (seen_.size() >= kMaxSeen) seen_.clear();
  seen_.insert(hash);
}

absl::StatusOr<std::shared_ptr<const StateSnapshot>> PrefixTier::Decode(
    absl::string_view value, absl::Span<const int32_t> tokens, int64_t length,
    absl::string_view scope) const {
  auto damaged = [](absl::string_view why) {
    return absl::DataLossError(absl::StrCat("shared prefix: ", why));
  };
  if (value.size() < 16 || std::memcmp(value.data(), kPrefixMagic, 8) != 0) {
    return damaged("not a prefix record (foreign bytes)");
  }
  size_t at = 8;
  uint32_t scope_bytes = 0;
  std::memcpy(&scope_bytes, value.data() + at, 4);
  at += 4;
  if (value.size() < at + scope_bytes + 4) return damaged("truncated record");
  // Another scope's (a hash collision, or bytes written under another key): never a hit.
  if (value.substr(at, scope_bytes) != scope) {
    return absl::NotFoundError("shared prefix: another scope's");
  }
  at += scope_bytes;
  uint32_t n = 0;
  std::memcpy(&n, value.data() + at, 4);
  at += 4;
  if (static_cast<int64_t>(n) != length) return absl::NotFoundError("shared prefix: other length");
  if (value.size() < at + size_t{n} * sizeof(int32_t)) return damaged("truncated record");
  if (std::memcmp(value.data() + at, tokens.data(), size_t{n} * sizeof(int32_t)) != 0) {
    return absl::NotFoundError("shared prefix: other tokens");  // a hash collision
  }
  at += size_t{n} * sizeof(int32_t);
  absl::StatusOr<SequenceState> state = DecodeState(value.substr(at), *model_);
  if (!state.ok()) return state.status();
  if (state->snapshot.position != length || !state->pending.empty()) {
    return damaged("its state does not hold exactly the prefix");
  }
  return std::make_shared<const StateSnapshot>(std::move(state->snapshot));
}

PrefixTier::Found PrefixTier::Lookup(absl::Span<const int32_t> tokens,
                                     absl::Span<const uint64_t> hashes, int64_t granularity,
                                     int64_t min_blocks, int64_t max_blocks,
                                     absl::string_view scope) {
  max_blocks = std::min<int64_t>(max_blocks, static_cast<int64_t>(hashes.size()));
  if (max_blocks <= min_blocks || granularity <= 0) return {};
  // Longest first.
  std::vector<std::string> keys;
  std::vector<int64_t> blocks;
  for (int64_t b = max_blocks; b > min_blocks; --b) {
    keys.push_back(KeyOf(model_->fingerprint, hashes[static_cast<size_t>(b - 1)]));
    blocks.push_back(b);
  }
  absl::Time start = absl::Now();
  absl::StatusOr<std::vector<bool>> present = tier_->Present(keys);
  Observe(TierOp::kRead, absl::Now() - start);
  if (!present.ok()) {
    CountError(present.status());
    return {};
  }
  for (size_t i = 0; i < keys.size(); ++i) {
    if (!(*present)[i]) continue;
    start = absl::Now();
    absl::StatusOr<std::optional<std::string>> value = tier_->Get(keys[i]);
    Observe(TierOp::kRead, absl::Now() - start);
    if (!value.ok()) {
      CountError(value.status());
      return {};  // the tier fails: no point asking for shorter ones now
    }
    if (!value->has_value()) continue;  // expired or evicted meanwhile
    {
      std::lock_guard<std::mutex> lock(stats_mu_);
      stats_.bytes_read += static_cast<int64_t>((*value)->size());
    }
    const int64_t length = blocks[i] * granularity;
    absl::StatusOr<std::shared_ptr<const StateSnapshot>> state =
        Decode(**value, tokens, length, scope);
    if (!state.ok()) {
      if (state.status().code() != absl::StatusCode::kNotFound) CountError(state.status());
      continue;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      Seen(hashes[static_cast<size_t>(blocks[i] - 1)]);
    }
    std::lock_guard<std::mutex> lock(stats_mu_);
    ++stats_.hits;
    stats_.tokens += length;
    return Found{length, *std::move(state)};
  }
  std::lock_guard<std::mutex> lock(stats_mu_);
  ++stats_.misses;
  return {};
}

void PrefixTier::Publish(uint64_t hash, std::string scope, std::vector<int32_t> prefix,
                         StateSnapshot snapshot) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ || seen_.contains(hash)) return;
    Seen(hash);
    Pending op;
    op.hash = hash;
    op.scope = std::move(scope);
    op.prefix = std::move(prefix);
    op.bytes = snapshot.size_bytes();
    op.state.snapshot = std::move(snapshot);
    queued_bytes_ += op.bytes;
    queue_.push_back(std::move(op));
    // Over the bound: the oldest snapshots are given up (they stay in the local cache).
    while (queued_bytes_ > options_.max_queued_bytes && queue_.size() > 1) {
      queued_bytes_ -= queue_.front().bytes;
      seen_.erase(queue_.front().hash);
      queue_.pop_front();
      std::lock_guard<std::mutex> stats_lock(stats_mu_);
      ++stats_.errors[static_cast<int>(TierError::kDropped)];
    }
  }
  cv_.notify_all();
}

absl::Status PrefixTier::Write(const Pending& op) {
  std::string value(kPrefixMagic, sizeof(kPrefixMagic));
  Append<uint32_t>(value, static_cast<uint32_t>(op.scope.size()));
  value += op.scope;
  Append<uint32_t>(value, static_cast<uint32_t>(op.prefix.size()));
  value.append(reinterpret_cast<const char*>(op.prefix.data()), op.prefix.size() * sizeof(int32_t));
  value += EncodeState(op.state, *model_);
  const absl::Time start = absl::Now();
  const absl::Status status = tier_->Put(KeyOf(model_->fingerprint, op.hash), value, options_.ttl);
  Observe(TierOp::kWrite, absl::Now() - start);
  if (status.ok()) {
    std::lock_guard<std::mutex> lock(stats_mu_);
    ++stats_.writes;
    stats_.bytes_written += static_cast<int64_t>(value.size());
  }
  return status;
}

void PrefixTier::WriterLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    if (queue_.empty()) {
      cv_.wait(lock);
      continue;
    }
    Pending op = std::move(queue_.front());
    queue_.pop_front();
    queued_bytes_ -= op.bytes;
    ++in_flight_;
    lock.unlock();
    const absl::Status status = Write(op);
    lock.lock();
    // A snapshot is a cache entry: a failed write is not retried (the next replica that
    // computes the prefix writes it), but may be written again.
    if (!status.ok()) {
      CountError(status);
      seen_.erase(op.hash);
    }
    --in_flight_;
    cv_.notify_all();
  }
}

absl::Status PrefixTier::Flush(absl::Time deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  const bool done = cv_.wait_until(lock, absl::ToChronoTime(deadline),
                                   [&] { return queue_.empty() && in_flight_ == 0; });
  if (done) return absl::OkStatus();
  return absl::DeadlineExceededError(absl::StrCat(
      "shared prefixes: ", queue_.size() + static_cast<size_t>(in_flight_), " writes not done"));
}

PrefixTierStats PrefixTier::stats() const {
  PrefixTierStats s;
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    s = stats_;
  }
  std::lock_guard<std::mutex> lock(mu_);
  s.queued = static_cast<int64_t>(queue_.size());
  s.queued_bytes = queued_bytes_;
  return s;
}

}  // namespace ps::engine
