#include "server/engine/state_reuse/session_store.h"

#include <algorithm>
#include <random>
#include <utility>
#include <vector>

#include <absl/strings/str_cat.h>

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
  ExpireLocked(now);
  if (static_cast<int64_t>(sessions_.size()) >= max_sessions_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("no room for another session: ", sessions_.size(), " sessions of ",
                     bytes_per_session_, " bytes fill the budget of ", options_.budget_bytes,
                     " bytes (close one, or wait for idle ones to expire)"));
  }
  std::string id = NewSessionId();
  while (sessions_.contains(id)) id = NewSessionId();
  sessions_.emplace(id, Session{std::string(owner), std::move(state), now, false});
  ++stats_.opened;
  return id;
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
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end() || it->second.owner != owner) return NotFound(id);
  sessions_.erase(it);
  ++stats_.closed;
  return absl::OkStatus();
}

absl::StatusOr<SequenceState> SessionStore::Take(absl::string_view id, absl::string_view owner,
                                                 absl::Time now) {
  std::lock_guard<std::mutex> lock(mu_);
  absl::StatusOr<Session*> session = Find(id, owner, now);
  if (!session.ok()) return session.status();
  if ((*session)->busy) {
    return absl::FailedPreconditionError(
        absl::StrCat("session \"", id, "\" already has a request in progress"));
  }
  (*session)->busy = true;
  (*session)->last_used = now;
  return std::move((*session)->state);
}

void SessionStore::Return(absl::string_view id, SequenceState state, absl::Time now) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return;  // closed while the request ran
  it->second.state = std::move(state);
  it->second.busy = false;
  it->second.last_used = now;
}

absl::StatusOr<SequenceState> SessionStore::Copy(absl::string_view id, absl::string_view owner,
                                                 absl::Time now) {
  std::lock_guard<std::mutex> lock(mu_);
  absl::StatusOr<Session*> session = Find(id, owner, now);
  if (!session.ok()) return session.status();
  if ((*session)->busy) {
    return absl::FailedPreconditionError(absl::StrCat(
        "session \"", id, "\" has a request in progress; export it when the request ends"));
  }
  (*session)->last_used = now;
  return (*session)->state;
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
