#include "server/engine/state_reuse/state_tier.h"

#include <absl/time/clock.h>

namespace ps::engine {

absl::StatusOr<std::optional<std::string>> MemoryStateTier::Get(absl::string_view key) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = Check(); !s.ok()) return s;
  auto it = values_.find(key);
  if (it == values_.end() || it->second.expires <= absl::Now()) return std::nullopt;
  return it->second.value;
}

absl::Status MemoryStateTier::Put(absl::string_view key, absl::string_view value,
                                  absl::Duration ttl) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = Check(); !s.ok()) return s;
  values_.insert_or_assign(std::string(key), Entry{std::string(value), absl::Now() + ttl});
  return absl::OkStatus();
}

absl::Status MemoryStateTier::Delete(absl::string_view key) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = Check(); !s.ok()) return s;
  if (auto it = values_.find(key); it != values_.end()) values_.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<bool>> MemoryStateTier::Present(const std::vector<std::string>& keys) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = Check(); !s.ok()) return s;
  const absl::Time now = absl::Now();
  std::vector<bool> present;
  present.reserve(keys.size());
  for (const std::string& key : keys) {
    auto it = values_.find(key);
    present.push_back(it != values_.end() && it->second.expires > now);
  }
  return present;
}

absl::StatusOr<bool> MemoryStateTier::Lease(absl::string_view key, absl::string_view holder,
                                            absl::Duration ttl, std::string* other) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = Check(); !s.ok()) return s;
  const absl::Time now = absl::Now();
  auto it = leases_.find(key);
  if (it != leases_.end() && it->second.expires > now && it->second.value != holder) {
    if (other != nullptr) *other = it->second.value;
    return false;
  }
  leases_.insert_or_assign(std::string(key), Entry{std::string(holder), now + ttl});
  return true;
}

absl::Status MemoryStateTier::Unlease(absl::string_view key, absl::string_view holder) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = Check(); !s.ok()) return s;
  auto it = leases_.find(key);
  if (it != leases_.end() && it->second.value == holder) leases_.erase(it);
  return absl::OkStatus();
}

void MemoryStateTier::Fail(absl::Status status) {
  std::lock_guard<std::mutex> lock(mu_);
  failure_ = std::move(status);
}

void MemoryStateTier::Set(absl::string_view key, std::string value) {
  std::lock_guard<std::mutex> lock(mu_);
  values_.insert_or_assign(std::string(key), Entry{std::move(value), absl::Now() + absl::Hours(1)});
}

int64_t MemoryStateTier::keys() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(values_.size());
}

}  // namespace ps::engine
