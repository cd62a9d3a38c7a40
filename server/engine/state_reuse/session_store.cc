#include "server/engine/state_reuse/session_store.h"

#include <algorithm>
#include <random>
#include <utility>
#include <vector>

#include <absl/strings/str_cat.h>

#include "base/status_macros.h"

namespace ps::engine {
namespace {

// 128 bits from the OS's random source (std::random_device reads getrandom on Linux).
std::string NewSessionId() {
  std::random_device random;
  std::string id;
  for (int i = 0; i < 4; ++i) absl::StrAppend(&id, absl::Hex(random(), absl::kZeroPad8));
  return id;
}

absl::Status NotFound(absl::string_view id) {
  return absl::NotFoundError(
      absl::StrCat("session \"", id, "\" not found (closed, expired or never opened)"));
}

}  // namespace

SessionStore::SessionStore(SessionOptions options, int64_t bytes_per_session)
    : options_(options),
      bytes_per_session_(std::max<int64_t>(bytes_per_session, 1)),
      max_sessions_(options.budget_bytes / std::max<int64_t>(bytes_per_session, 1)) {}

absl::StatusOr<std::string> SessionStore::Open(absl::string_view owner, absl::Time now) {
  std::lock_guard<std::mutex> lock(mu_);
  return Add(owner, SequenceState{}, now);
}

absl::StatusOr<std::string> SessionStore::Import(absl::string_view owner, SequenceState state,
                                                 absl::Time now) {
  std::lock_guard<std::mutex> lock(mu_);
  return Add(owner, std::move(state), now);
}

absl::StatusOr<std::string> SessionStore::Add(absl::string_view owner, SequenceState state,
                                              absl::Time now) {
  if (!enabled()) {
    return absl::FailedPreconditionError(
        "sessions are disabled on this server (start it with --session_budget_bytes > 0)");
  }
  if (!MakeRoom(now)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("no room for another session: ", sessions_.size(), " sessions of ",
                     bytes_per_session_, " bytes fill the budget of ", options_.budget_bytes,
                     " bytes (close one, or wait for idle ones to expire)"));
  }
  std::string id = NewSessionId();
  while (sessions_.contains(id)) id = NewSessionId();
  auto shared = std::make_shared<SequenceState>(std::move(state));
  if (tier_ != nullptr) tier_->Write(id, owner, 0, shared);
  sessions_.emplace(id, Session{std::string(owner), std::move(shared), now, false, 0});
  ++stats_.opened;
  return id;
}

bool SessionStore::MakeRoom(absl::Time now) {
  ExpireLocked(now);
  if (static_cast<int64_t>(sessions_.size()) < max_sessions_) return true;
  if (tier_ == nullptr) return false;
  // The least recently used idle session whose current state the tier holds: its copy here is
  // only a cache.
  auto victim = sessions_.end();
  for (auto it = sessions_.begin(); it != sessions_.end(); ++it) {
    if (it->second.busy || !tier_->Persisted(it->first, it->second.owner, it->second.version)) {
      continue;
    }
    if (victim == sessions_.end() || it->second.last_used < victim->second.last_used) victim = it;
  }
  if (victim == sessions_.end()) return false;
  sessions_.erase(victim);
  ++stats_.evicted;
  return true;
}

SequenceState SessionStore::TakeState(Session& session) {
  // The tier's writer may still be reading it (write-behind): then the request gets a copy.
  if (session.state.use_count() == 1) return std::move(*session.state);
  return *session.state;
}

absl::StatusOr<SessionStore::Session*> SessionStore::Find(absl::string_view id,
                                                          absl::string_view owner, absl::Time now) {
  auto it = sessions_.find(id);
  if (it == sessions_.end() || it->second.owner != owner) return NotFound(id);
  // Only this session's expiry matters here; the request path never scans the whole store.
  if (Expired(it->second, now)) {
    sessions_.erase(it);
    ++stats_.expired;
    return NotFound(id);
  }
  return &it->second;
}

absl::Status SessionStore::Close(absl::string_view id, absl::string_view owner) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = sessions_.find(id);
    if (it != sessions_.end()) {
      if (it->second.owner != owner) return NotFound(id);
      sessions_.erase(it);
      ++stats_.closed;
      if (tier_ != nullptr) tier_->Remove(id, owner);
      return absl::OkStatus();
    }
    if (tier_ == nullptr) return NotFound(id);
  }
  // Not held here: the tier says whether it exists and whose it is.
  PS_RETURN_IF_ERROR(tier_->Fetch(id, owner, -1).status());
  tier_->Remove(id, owner);
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.closed;
  return absl::OkStatus();
}

absl::StatusOr<SequenceState> SessionStore::Take(absl::string_view id, absl::string_view owner,
                                                 absl::Time now) {
  int64_t local_version = -1;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = sessions_.find(id);
    if (it != sessions_.end() && it->second.owner != owner) return NotFound(id);
    if (it != sessions_.end() && Expired(it->second, now)) {
      sessions_.erase(it);
      ++stats_.expired;
      it = sessions_.end();
    }
    if (it == sessions_.end()) {
      if (tier_ == nullptr) return NotFound(id);
    } else {
      if (it->second.busy) {
        return absl::FailedPreconditionError(
            absl::StrCat("session \"", id, "\" already has a request in progress"));
      }
      it->second.busy = true;
      it->second.last_used = now;
      if (tier_ == nullptr) return TakeState(it->second);
      local_version = it->second.version;
    }
  }
  // The tier: the lease, and the state when another replica has a newer one (or only it has it).
  absl::StatusOr<std::optional<SessionTier::Record>> record =
      tier_->BeginTurn(id, owner, local_version);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sessions_.find(id);
  if (!record.ok()) {
    if (local_version >= 0 && it != sessions_.end()) {
      it->second.busy = false;
      // Closed on another replica: the copy here is gone too.
      if (record.status().code() == absl::StatusCode::kNotFound) {
        sessions_.erase(it);
        ++stats_.closed;
      }
    }
    return record.status();
  }
  if (local_version >= 0) {
    if (it == sessions_.end()) {  // closed while the tier answered
      tier_->EndTurn(id, owner, 0, nullptr);
      return NotFound(id);
    }
    if (record->has_value()) {
      it->second.state = std::make_shared<SequenceState>(std::move((*record)->state));
      it->second.version = (*record)->version;
    }
    return TakeState(it->second);
  }
  if (it != sessions_.end() || !record->has_value()) {  // a racing Take loaded it first
    tier_->EndTurn(id, owner, 0, nullptr);
    return absl::FailedPreconditionError(
        absl::StrCat("session \"", id, "\" already has a request in progress"));
  }
  if (!MakeRoom(now)) {
    tier_->EndTurn(id, owner, 0, nullptr);
    return absl::ResourceExhaustedError(
        absl::StrCat("no room to continue session \"", id, "\" here: ", sessions_.size(),
                     " sessions fill the budget of ", options_.budget_bytes, " bytes"));
  }
  auto [inserted, added] = sessions_.emplace(
      std::string(id),
      Session{std::string(owner), std::make_shared<SequenceState>(std::move((*record)->state)), now,
              true, (*record)->version});
  return TakeState(inserted->second);
}

void SessionStore::Return(absl::string_view id, absl::string_view owner, SequenceState state,
                          absl::Time now, bool completed) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) {  // closed while the request ran
    if (tier_ != nullptr) tier_->EndTurn(id, owner, 0, nullptr);
    return;
  }
  Session& session = it->second;
  session.state = std::make_shared<SequenceState>(std::move(state));
  session.busy = false;
  session.last_used = now;
  if (completed) ++session.version;
  if (tier_ != nullptr) {
    tier_->EndTurn(id, session.owner, session.version,
                   completed ? std::shared_ptr<const SequenceState>(session.state) : nullptr);
  }
}

absl::StatusOr<SequenceState> SessionStore::Copy(absl::string_view id, absl::string_view owner,
                                                 absl::Time now) {
  int64_t local_version = -1;
  {
    std::lock_guard<std::mutex> lock(mu_);
    absl::StatusOr<Session*> session = Find(id, owner, now);
    if (session.ok()) {
      if ((*session)->busy) {
        return absl::FailedPreconditionError(absl::StrCat(
            "session \"", id, "\" has a request in progress; export it when the request ends"));
      }
      (*session)->last_used = now;
      if (tier_ == nullptr) return *(*session)->state;
      local_version = (*session)->version;
    } else if (tier_ == nullptr) {
      return session.status();
    }
  }
  PS_ASSIGN_OR_RETURN(std::optional<SessionTier::Record> record,
                      tier_->Fetch(id, owner, local_version));
  if (record.has_value()) return std::move(record->state);
  std::lock_guard<std::mutex> lock(mu_);
  PS_ASSIGN_OR_RETURN(Session * session, Find(id, owner, now));
  return *session->state;
}

void SessionStore::ExpireIdle(absl::Time now) {
  std::lock_guard<std::mutex> lock(mu_);
  ExpireLocked(now);
}

void SessionStore::ExpireLocked(absl::Time now) {
  std::vector<std::string> expired;
  for (const auto& [id, session] : sessions_) {
    if (Expired(session, now)) expired.push_back(id);
  }
  for (const std::string& id : expired) sessions_.erase(id);
  stats_.expired += static_cast<int64_t>(expired.size());
}

SessionStats SessionStore::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  SessionStats s = stats_;
  s.active = static_cast<int64_t>(sessions_.size());
  s.bytes = s.active * bytes_per_session_;
  return s;
}

}  // namespace ps::engine
