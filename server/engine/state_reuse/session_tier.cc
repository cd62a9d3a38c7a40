#include "server/engine/state_reuse/session_tier.h"

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include <absl/strings/match.h>
#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/time/clock.h>

#include "base/hash.h"
#include "base/status_macros.h"

namespace ps::engine {
namespace {

constexpr char kRecordMagic[8] = {'P', 'S', 'K', 'S', 'E', 'S', 'S', '1'};
// persisted_ only helps drop local copies early; past this many sessions it starts over.
constexpr size_t kMaxPersistedEntries = size_t{1} << 16;
// The version record of a closed session (a tombstone for the session ttl), so that a replica
// holding a copy learns of the close instead of taking the missing record for a Redis restart.
constexpr char kClosedMark[] = "closed";
// Seeds the owner tag of the keys (SessionTier::Scoped).
constexpr uint64_t kOwnerTagSeed = 0x5053'4b4f'574e'4552ULL;  // "PSKOWNER"

absl::Status SessionNotFound(absl::string_view id) {
  return absl::NotFoundError(
      absl::StrCat("session \"", id, "\" not found (closed, expired or never opened)"));
}

}  // namespace

absl::string_view TierErrorName(TierError error) {
  switch (error) {
    case TierError::kUnreachable:
      return "unreachable";
    case TierError::kTimeout:
      return "timeout";
    case TierError::kFull:
      return "full";
    case TierError::kDamaged:
      return "damaged";
    case TierError::kForeign:
      return "foreign";
    case TierError::kDropped:
      return "dropped";
    case TierError::kOther:
      break;
  }
  return "other";
}

TierError ClassifyTierError(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kUnavailable:
      return TierError::kUnreachable;
    case absl::StatusCode::kDeadlineExceeded:
      return TierError::kTimeout;
    case absl::StatusCode::kResourceExhausted:
      return TierError::kFull;
    case absl::StatusCode::kDataLoss:
    case absl::StatusCode::kInvalidArgument:
      return TierError::kDamaged;
    case absl::StatusCode::kFailedPrecondition:
      return TierError::kForeign;
    default:
      return TierError::kOther;
  }
}

absl::string_view TierOpName(TierOp op) {
  switch (op) {
    case TierOp::kRead:
      return "read";
    case TierOp::kWrite:
      return "write";
    case TierOp::kLease:
      break;
  }
  return "lease";
}

SessionTier::SessionTier(StateTier* tier, const ModelIdentity* model, SessionTierOptions options)
    : tier_(tier),
      model_(model),
      options_(std::move(options)),
      prefix_(absl::StrCat("polysketch:", absl::Hex(model->fingerprint, absl::kZeroPad16), ":")) {
  writer_ = std::thread([this] { WriterLoop(); });
}

SessionTier::~SessionTier() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  writer_.join();
}

std::string SessionTier::Scoped(absl::string_view id, absl::string_view owner) {
  return absl::StrCat(
      absl::Hex(Fingerprint64(owner.data(), owner.size(), kOwnerTagSeed), absl::kZeroPad16), ":",
      id);
}

std::string SessionTier::Key(absl::string_view kind, absl::string_view sid) const {
  return absl::StrCat(prefix_, kind, ":", sid);
}

void SessionTier::CountError(const absl::Status& status) {
  std::lock_guard<std::mutex> lock(stats_mu_);
  ++stats_.errors[static_cast<int>(ClassifyTierError(status))];
}

void SessionTier::Observe(TierOp op, absl::Duration elapsed) {
  const double s = absl::ToDoubleSeconds(elapsed);
  size_t bucket = 0;
  while (bucket < kTierLatencyBuckets.size() && s > kTierLatencyBuckets[bucket]) ++bucket;
  std::lock_guard<std::mutex> lock(stats_mu_);
  TierLatency& l = stats_.latency[static_cast<int>(op)];
  ++l.buckets[bucket];
  l.sum_seconds += s;
  ++l.count;
}

absl::StatusOr<std::optional<SessionTier::Record>> SessionTier::Read(absl::string_view id,
                                                                     absl::string_view owner,
                                                                     int64_t local_version) {
  const std::string sid = Scoped(id, owner);
  absl::Time start = absl::Now();
  absl::StatusOr<std::optional<std::string>> version = tier_->Get(Key("v", sid));
  Observe(TierOp::kRead, absl::Now() - start);
  if (!version.ok()) return version.status();
  if (!version->has_value()) return SessionNotFound(id);
  if (**version == kClosedMark) {
    return absl::NotFoundError(absl::StrCat("session \"", id, "\" was closed"));
  }
  int64_t v = 0;
  if (!absl::SimpleAtoi(**version, &v) || v < 0) {
    return absl::DataLossError(
        absl::StrCat(tier_->Describe(), ": session \"", id, "\": its version record is damaged"));
  }
  if (v <= local_version) return std::optional<Record>();  // the copy in memory is current
  start = absl::Now();
  absl::StatusOr<std::optional<std::string>> value = tier_->Get(Key("s", sid));
  Observe(TierOp::kRead, absl::Now() - start);
  if (!value.ok()) return value.status();
  if (!value->has_value()) {
    return absl::DataLossError(absl::StrCat(tier_->Describe(), ": session \"", id,
                                            "\": its state is gone (evicted: Redis is full?)"));
  }
  const std::string& bytes = **value;
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    stats_.bytes_read += static_cast<int64_t>(bytes.size());
  }
  auto damaged = [&](absl::string_view why) {
    return absl::DataLossError(absl::StrCat(tier_->Describe(), ": session \"", id, "\": ", why));
  };
  if (bytes.size() < 20 || std::memcmp(bytes.data(), kRecordMagic, 8) != 0) {
    return damaged("not a session record (foreign bytes)");
  }
  Record record;
  uint32_t owner_bytes = 0;
  std::memcpy(&record.version, bytes.data() + 8, 8);
  std::memcpy(&owner_bytes, bytes.data() + 16, 4);
  if (bytes.size() < 20 + static_cast<size_t>(owner_bytes)) return damaged("truncated record");
  record.owner = bytes.substr(20, owner_bytes);
  // Another identity's (its owner tag collided with this one's): it does not exist for `owner`.
  if (record.owner != owner) return SessionNotFound(id);
  absl::StatusOr<SequenceState> state =
      DecodeState(absl::string_view(bytes).substr(20 + owner_bytes), *model_);
  if (!state.ok()) {
    return absl::Status(state.status().code(),
                        absl::StrCat(tier_->Describe(), ": session \"", id,
                                     "\": its state was refused: ", state.status().message()));
  }
  record.state = *std::move(state);
  return std::optional<Record>(std::move(record));
}

absl::StatusOr<std::optional<SessionTier::Record>> SessionTier::Fetch(absl::string_view id,
                                                                      absl::string_view owner,
                                                                      int64_t local_version) {
  absl::StatusOr<std::optional<Record>> record = Read(id, owner, local_version);
  if (record.ok()) return record;
  const bool not_found = record.status().code() == absl::StatusCode::kNotFound;
  if (!not_found) CountError(record.status());
  if (local_version >= 0 && !(not_found && absl::EndsWith(record.status().message(), "closed"))) {
    return std::optional<Record>();
  }
  return record.status();
}

absl::StatusOr<std::optional<SessionTier::Record>> SessionTier::BeginTurn(absl::string_view id,
                                                                          absl::string_view owner,
                                                                          int64_t local_version) {
  const std::string sid = Scoped(id, owner);
  {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] {
      auto it = leases_.find(sid);
      return it == leases_.end() || !it->second.releasing;
    });
    LeaseEntry& entry = leases_[sid];
    if (entry.in_turn) {
      return absl::FailedPreconditionError(
          absl::StrCat("session \"", id, "\" already has a request in progress"));
    }
    entry.in_turn = true;
  }
  // The lease: wait a little for a replica whose turn is ending (its write is on its way).
  const absl::Time give_up = absl::Now() + options_.lease_wait;
  absl::Status lease_error;
  std::string other;
  for (;;) {
    const absl::Time start = absl::Now();
    absl::StatusOr<bool> leased =
        tier_->Lease(Key("l", sid), options_.replica, options_.lease, &other);
    Observe(TierOp::kLease, absl::Now() - start);
    if (!leased.ok()) {
      lease_error = leased.status();
      break;
    }
    if (*leased) {
      std::lock_guard<std::mutex> lock(mu_);
      leases_[sid].held = true;
      break;
    }
    if (absl::Now() >= give_up) {
      {
        std::lock_guard<std::mutex> lock(stats_mu_);
        ++stats_.lease_busy;
      }
      AbandonTurn(sid);
      return absl::FailedPreconditionError(
          absl::StrCat("session \"", id, "\" has a request in progress on replica ", other,
                       " (retry when it ends; if that replica is gone, its lease ends within ",
                       absl::FormatDuration(options_.lease), ")"));
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  if (!lease_error.ok()) {
    CountError(lease_error);
    if (local_version >= 0) return std::optional<Record>();  // from memory, unleased
    AbandonTurn(sid);
    return absl::UnavailableError(absl::StrCat(
        "session \"", id, "\" is not held by this replica and the shared state tier failed: ",
        lease_error.message()));
  }
  if (local_version >= 0) {
    // This replica's own write of the session (the open, or the last turn's write behind) is
    // still on its way: the tier does not have it yet, and the copy here is the current one.
    // Reading would find nothing (or an older version) and count a miss that is not one.
    bool unlanded = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      unlanded = OwnWriteUnlanded(sid);
    }
    if (unlanded) {
      std::lock_guard<std::mutex> lock(stats_mu_);
      ++stats_.hits;
      return std::optional<Record>();
    }
  }
  absl::StatusOr<std::optional<Record>> record = Read(id, owner, local_version);
  if (!record.ok()) {
    const bool not_found = record.status().code() == absl::StatusCode::kNotFound;
    const bool closed = not_found && absl::EndsWith(record.status().message(), "was closed");
    if (!not_found) CountError(record.status());
    {
      std::lock_guard<std::mutex> lock(stats_mu_);
      if (not_found) ++stats_.misses;
    }
    // The tier lost it (a Redis restart, eviction) or cannot say: the copy here goes on.
    if (local_version >= 0 && !closed) return std::optional<Record>();
    AbandonTurn(sid);
    if (not_found) return record.status();
    const absl::StatusCode code = record.status().code();
    if (code == absl::StatusCode::kUnavailable || code == absl::StatusCode::kDeadlineExceeded) {
      return absl::UnavailableError(absl::StrCat(
          "session \"", id, "\" is not held by this replica and the shared state tier failed: ",
          record.status().message()));
    }
    return absl::NotFoundError(
        absl::StrCat("session \"", id, "\" cannot be continued here: ", record.status().message()));
  }
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    ++stats_.hits;
    if (record->has_value()) ++stats_.loads;
  }
  return record;
}

void SessionTier::AbandonTurn(absl::string_view sid) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = leases_.find(sid);
    if (it == leases_.end()) return;
    it->second.in_turn = false;
    if (it->second.held) {
      Pending release;
      release.kind = OpKind::kRelease;
      Enqueue(sid, std::move(release));
    } else if (!pending_.contains(sid)) {
      leases_.erase(it);
    }
  }
  cv_.notify_all();
}

void SessionTier::EndTurn(absl::string_view id, absl::string_view owner, int64_t version,
                          std::shared_ptr<const SequenceState> state) {
  const std::string sid = Scoped(id, owner);
  if (state == nullptr) {
    AbandonTurn(sid);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (auto it = leases_.find(sid); it != leases_.end()) it->second.in_turn = false;
    Pending op;
    op.kind = OpKind::kWrite;
    op.owner = std::string(owner);
    op.version = version;
    op.bytes = state->snapshot.size_bytes();
    op.state = std::move(state);
    Enqueue(sid, std::move(op));
  }
  cv_.notify_all();
}

void SessionTier::Write(absl::string_view id, absl::string_view owner, int64_t version,
                        std::shared_ptr<const SequenceState> state) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    Pending op;
    op.kind = OpKind::kWrite;
    op.owner = std::string(owner);
    op.version = version;
    op.bytes = state->snapshot.size_bytes();
    op.state = std::move(state);
    Enqueue(Scoped(id, owner), std::move(op));
  }
  cv_.notify_all();
}

void SessionTier::Remove(absl::string_view id, absl::string_view owner) {
  const std::string sid = Scoped(id, owner);
  {
    std::lock_guard<std::mutex> lock(mu_);
    Pending remove;
    remove.kind = OpKind::kDelete;
    Enqueue(sid, std::move(remove));
    persisted_.erase(sid);
  }
  cv_.notify_all();
}

void SessionTier::Enqueue(absl::string_view sid, Pending op) {
  auto it = pending_.find(sid);
  if (it != pending_.end()) {
    // A release never replaces a write or a delete: that op's end lets the lease go.
    if (op.kind == OpKind::kRelease) return;
    queued_bytes_ -= it->second.bytes;
    queued_bytes_ += op.bytes;
    it->second = std::move(op);  // the latest state of a session is all that needs writing
  } else {
    queued_bytes_ += op.bytes;
    pending_.emplace(std::string(sid), std::move(op));
    order_.push_back(std::string(sid));
  }
  // Over the bound: the oldest writes are given up (their sessions stay in memory).
  while (queued_bytes_ > options_.max_queued_bytes && order_.size() > 1) {
    const std::string victim = order_.front();
    if (victim == sid) break;
    order_.pop_front();
    auto v = pending_.find(victim);
    if (v == pending_.end()) continue;
    queued_bytes_ -= v->second.bytes;
    pending_.erase(v);
    std::lock_guard<std::mutex> lock(stats_mu_);
    ++stats_.errors[static_cast<int>(TierError::kDropped)];
  }
}

absl::Status SessionTier::Run(absl::string_view sid, const Pending& op) {
  switch (op.kind) {
    case OpKind::kRelease:
      return absl::OkStatus();  // the writer lets the lease go after any op
    case OpKind::kDelete: {
      const absl::Time start = absl::Now();
      absl::Status status = tier_->Put(Key("v", sid), kClosedMark, options_.ttl);
      if (status.ok()) status = tier_->Delete(Key("s", sid));
      Observe(TierOp::kWrite, absl::Now() - start);
      return status;
    }
    case OpKind::kWrite:
      break;
  }
  std::string value(kRecordMagic, sizeof(kRecordMagic));
  char raw[12];
  const uint32_t owner_bytes = static_cast<uint32_t>(op.owner.size());
  std::memcpy(raw, &op.version, 8);
  std::memcpy(raw + 8, &owner_bytes, 4);
  value.append(raw, sizeof(raw));
  value += op.owner;
  value += EncodeState(*op.state, *model_);
  const absl::Time start = absl::Now();
  absl::Status status = tier_->Put(Key("s", sid), value, options_.ttl);
  if (status.ok()) status = tier_->Put(Key("v", sid), absl::StrCat(op.version), options_.ttl);
  Observe(TierOp::kWrite, absl::Now() - start);
  if (status.ok()) {
    std::lock_guard<std::mutex> lock(stats_mu_);
    ++stats_.writes;
    stats_.bytes_written += static_cast<int64_t>(value.size());
  }
  return status;
}

void SessionTier::RenewLeases() {
  std::vector<std::string> ids;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [id, entry] : leases_) {
      if (entry.held && !entry.releasing) ids.push_back(id);
    }
  }
  for (const std::string& id : ids) {
    const absl::Time start = absl::Now();
    absl::StatusOr<bool> renewed = tier_->Lease(Key("l", id), options_.replica, options_.lease);
    Observe(TierOp::kLease, absl::Now() - start);
    if (!renewed.ok()) CountError(renewed.status());
  }
}

void SessionTier::WriterLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    absl::Time now = absl::Now();
    if (!leases_.empty() && now >= next_renewal_) {
      next_renewal_ = now + options_.lease / 3;
      lock.unlock();
      RenewLeases();
      lock.lock();
      continue;
    }
    // The oldest op that may run now.
    absl::Time wake = leases_.empty() ? now + absl::Seconds(1) : next_renewal_;
    auto ready = order_.end();
    for (auto it = order_.begin(); it != order_.end(); ++it) {
      const Pending& op = pending_.at(*it);
      if (op.not_before <= now) {
        ready = it;
        break;
      }
      wake = std::min(wake, op.not_before);
    }
    if (ready == order_.end()) {
      cv_.wait_for(lock, absl::ToChronoNanoseconds(std::max(wake - now, absl::Milliseconds(1))));
      continue;
    }
    const std::string id = *ready;
    order_.erase(ready);
    Pending op = std::move(pending_.at(id));
    pending_.erase(id);
    queued_bytes_ -= op.bytes;
    ++in_flight_;
    if (op.kind == OpKind::kWrite) in_flight_write_ = id;
    lock.unlock();
    const absl::Status status = Run(id, op);
    lock.lock();
    in_flight_write_.clear();
    if (!status.ok()) {
      CountError(status);
      if (!pending_.contains(id) && !stopping_) {
        // Try again later, unless a newer op of the session came meanwhile. The lease stays
        // held (and renewed) so no replica reads the older state in the tier.
        op.not_before = absl::Now() + options_.retry_interval;
        ++op.attempts;
        queued_bytes_ += op.bytes;
        order_.push_back(id);
        pending_.emplace(id, std::move(op));
      }
    } else {
      if (op.kind == OpKind::kWrite) {
        if (persisted_.size() >= kMaxPersistedEntries) persisted_.clear();
        int64_t& v = persisted_[id];
        v = std::max(v, op.version);
      }
      auto entry = leases_.find(id);
      if (entry != leases_.end() && !entry->second.in_turn && !pending_.contains(id)) {
        if (entry->second.held) {
          entry->second.releasing = true;
          lock.unlock();
          const absl::Status released = tier_->Unlease(Key("l", id), options_.replica);
          if (!released.ok()) CountError(released);
          lock.lock();
        }
        leases_.erase(id);
      }
    }
    // Only now: Flush waits for the lease to be let go too.
    --in_flight_;
    cv_.notify_all();
  }
}

bool SessionTier::OwnWriteUnlanded(const std::string& sid) const {
  if (in_flight_write_ == sid) return true;
  auto it = pending_.find(sid);
  return it != pending_.end() && it->second.kind == OpKind::kWrite;
}

bool SessionTier::Persisted(absl::string_view id, absl::string_view owner, int64_t version) const {
  const std::string sid = Scoped(id, owner);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = persisted_.find(sid);
  return it != persisted_.end() && it->second >= version && !pending_.contains(sid);
}

absl::Status SessionTier::Flush(absl::Time deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  const bool done = cv_.wait_until(lock, absl::ToChronoTime(deadline),
                                   [&] { return pending_.empty() && in_flight_ == 0; });
  if (done) return absl::OkStatus();
  return absl::DeadlineExceededError(
      absl::StrCat("shared state tier: ", pending_.size() + static_cast<size_t>(in_flight_),
                   " session writes not done (", tier_->Describe(), " down or slow?)"));
}

SessionTierStats SessionTier::stats() const {
  SessionTierStats s;
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    s = stats_;
  }
  std::lock_guard<std::mutex> lock(mu_);
  s.queued = static_cast<int64_t>(pending_.size());
  s.queued_bytes = queued_bytes_;
  return s;
}

}  // namespace ps::engine
