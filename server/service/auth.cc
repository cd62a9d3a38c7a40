// Tokens file parsing and the per-call check. Digests come from OpenSSL (already linked by gRPC)
// and are compared with CRYPTO_memcmp against every entry without an early exit, so the time of a
// check depends on the number of tokens only.
#include "server/service/auth.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <utility>

#include <absl/container/flat_hash_set.h>
#include <absl/strings/ascii.h>
#include <absl/strings/escaping.h>
#include <absl/strings/match.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_split.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>

namespace ps::service {
namespace {

absl::string_view Trim(absl::string_view s) { return absl::StripAsciiWhitespace(s); }

bool ValidName(absl::string_view name) {
  if (name.empty() || name.size() > kMaxTokenNameBytes) return false;
  for (const char c : name) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') {
      return false;
    }
  }
  return true;
}

// Why `token` is not acceptable, or "" when it is. Never quotes the token.
std::string TokenProblem(absl::string_view token) {
  if (token.size() < kMinTokenBytes || token.size() > kMaxTokenBytes) {
    return absl::StrCat("the token must have ", kMinTokenBytes, "..", kMaxTokenBytes,
                        " bytes, it has ", token.size());
  }
  for (const char c : token) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u >= 0x7F) return "the token must be printable ASCII without spaces";
  }
  return "";
}

absl::StatusOr<std::string> ReadSmallFile(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    const int error = errno;
    const std::string message = absl::StrCat("cannot read ", path, ": ", std::strerror(error));
    if (error == ENOENT) return absl::NotFoundError(message);
    if (error == EACCES) return absl::PermissionDeniedError(message);
    return absl::InvalidArgumentError(message);
  }
  std::string bytes;
  char buffer[8192];
  size_t n = 0;
  while ((n = std::fread(buffer, 1, sizeof(buffer), f)) > 0) {
    bytes.append(buffer, n);
    if (static_cast<int64_t>(bytes.size()) > kMaxTokensFileBytes) {
      std::fclose(f);
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": larger than ", kMaxTokensFileBytes, " bytes"));
    }
  }
  const bool failed = std::ferror(f) != 0;
  std::fclose(f);
  if (failed) return absl::InvalidArgumentError(absl::StrCat("cannot read ", path));
  return bytes;
}

}  // namespace

TokenDigest Sha256(absl::string_view bytes) {
  TokenDigest digest;
  SHA256(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size(), digest.data());
  return digest;
}

absl::StatusOr<std::vector<TokenEntry>> ParseTokens(absl::string_view text) {
  std::vector<TokenEntry> entries;
  absl::flat_hash_set<std::string> names;
  absl::flat_hash_set<std::string> digests;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    line = Trim(line);
    if (line.empty() || line[0] == '#') continue;
    absl::string_view name;
    absl::string_view token = line;
    if (const size_t colon = line.find(':'); colon != absl::string_view::npos) {
      name = Trim(line.substr(0, colon));
      token = Trim(line.substr(colon + 1));
      if (!ValidName(name)) {
        return absl::InvalidArgumentError(absl::StrCat("line ", line_number,
                                                       ": the name before ':' must be 1..",
                                                       kMaxTokenNameBytes, " of [A-Za-z0-9._-]"));
      }
    }
    if (const std::string problem = TokenProblem(token); !problem.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("line ", line_number, ": ", problem));
    }
    TokenEntry entry;
    entry.digest = Sha256(token);
    entry.name =
        name.empty()
            ? absl::StrCat("token-", absl::BytesToHexString(absl::string_view(
                                         reinterpret_cast<const char*>(entry.digest.data()), 6)))
            : std::string(name);
    if (!names.insert(entry.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("line ", line_number, ": duplicate name '", entry.name, "'"));
    }
    if (!digests.insert(std::string(entry.digest.begin(), entry.digest.end())).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("line ", line_number, ": the same token as an earlier line"));
    }
    entries.push_back(std::move(entry));
  }
  if (entries.empty()) {
    return absl::InvalidArgumentError("no tokens (a tokens file must hold at least one)");
  }
  return entries;
}

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::FromFile(std::string path) {
  std::unique_ptr<Authenticator> auth(new Authenticator(std::move(path)));
  if (absl::Status status = auth->Reload(); !status.ok()) return status;
  return auth;
}

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::FromText(absl::string_view text) {
  absl::StatusOr<std::vector<TokenEntry>> entries = ParseTokens(text);
  if (!entries.ok()) return entries.status();
  std::unique_ptr<Authenticator> auth(new Authenticator(""));
  auth->table_ = std::make_shared<const Table>(*std::move(entries));
  return auth;
}

size_t Authenticator::num_tokens() const {
  const std::shared_ptr<const Table> t = table();
  return t == nullptr ? 0 : t->size();
}

std::shared_ptr<const Authenticator::Table> Authenticator::table() const {
  std::lock_guard<std::mutex> lock(mu_);
  return table_;
}

absl::Status Authenticator::Reload() {
  if (!enabled_ || path_.empty()) {
    return absl::FailedPreconditionError("authentication is not configured from a tokens file");
  }
  absl::StatusOr<std::string> text = ReadSmallFile(path_);
  if (!text.ok()) return text.status();
  absl::StatusOr<std::vector<TokenEntry>> entries = ParseTokens(*text);
  if (!entries.ok()) {
    return absl::Status(entries.status().code(),
                        absl::StrCat(path_, ": ", entries.status().message()));
  }
  auto table = std::make_shared<const Table>(*std::move(entries));
  std::lock_guard<std::mutex> lock(mu_);
  table_ = std::move(table);
  return absl::OkStatus();
}

absl::StatusOr<std::string> Authenticator::Authenticate(
    const grpc::ServerContextBase& context) const {
  if (!enabled_) return std::string(kAnonymousIdentity);
  const auto& metadata = context.client_metadata();
  const auto it = metadata.find(kAuthorizationMetadataKey);
  if (it == metadata.end()) return AuthenticateValue(std::nullopt);
  return AuthenticateValue(absl::string_view(it->second.data(), it->second.size()));
}

absl::StatusOr<std::string> Authenticator::AuthenticateValue(
    std::optional<absl::string_view> authorization) const {
  if (!enabled_) return std::string(kAnonymousIdentity);
  if (!authorization.has_value()) {
    return absl::UnauthenticatedError(
        "missing credentials: send the metadata 'authorization: Bearer <token>'");
  }
  const absl::Status invalid = absl::UnauthenticatedError("invalid credentials");
  // "Bearer" is case-insensitive (RFC 6750 via RFC 7235); one or more spaces follow it.
  constexpr absl::string_view kScheme = "bearer ";
  absl::string_view value = *authorization;
  if (value.size() < kScheme.size() || !absl::EqualsIgnoreCase(value.substr(0, 6), "bearer") ||
      value[6] != ' ') {
    return invalid;
  }
  const absl::string_view token = Trim(value.substr(kScheme.size()));
  // The digest hides the length and content of the guess from the comparison below.
  const TokenDigest digest = Sha256(token);
  const std::shared_ptr<const Table> t = table();
  if (t == nullptr) return invalid;
  const TokenEntry* match = nullptr;
  for (const TokenEntry& entry : *t) {
    // No early exit: every entry is compared, so the time does not say which one matched.
    const bool equal = CRYPTO_memcmp(entry.digest.data(), digest.data(), digest.size()) == 0;
    if (equal) match = &entry;
  }
  if (match == nullptr) return invalid;
  return match->name;
}

}  // namespace ps::service
