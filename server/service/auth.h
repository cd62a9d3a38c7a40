// Bearer-token authentication of gRPC calls: the tokens file (--auth_tokens_file), its reload on
// SIGHUP, and the check of each call's `authorization: Bearer <token>` metadata. A token is never
// kept in memory: only its SHA-256 digest, compared in constant time against every known digest,
// so neither the length nor a matching prefix of a guess shows in the answer time. The
// authenticated identity is the token's name; sessions (issue 9) are scoped by it.
//
// Tokens file format (docs/security.md): one token per line, `name:token` or a bare `token` (a
// line is split at its first ':', so a bare token cannot contain one);
// blank lines and lines whose first non-blank character is '#' are ignored; spaces and tabs
// around the name and the token are trimmed. A name is 1..64 of [A-Za-z0-9._-]; a bare token gets
// the name `token-<first 12 hex digits of its SHA-256>`. A token is 16..4096 printable ASCII
// bytes without spaces (16 at least, so a file cannot hold a guessable one); names and tokens are
// unique within the file, and the file holds at least one token.
//
// Thread-safety: Authenticate may be called from any thread at any time, Reload too (a reload
// swaps the whole table at once; a call sees the old or the new one, never a mix).
#ifndef POLYSKETCH_SERVER_SERVICE_AUTH_H_
#define POLYSKETCH_SERVER_SERVICE_AUTH_H_

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>
#include <grpcpp/server_context.h>

namespace ps::service {

// Token limits of the tokens file.
inline constexpr size_t kMinTokenBytes = 16;
inline constexpr size_t kMaxTokenBytes = 4096;
inline constexpr size_t kMaxTokenNameBytes = 64;
// Largest tokens file read (a file past it is refused rather than read into memory).
inline constexpr int64_t kMaxTokensFileBytes = int64_t{1} << 20;

// The identity of calls when authentication is off.
inline constexpr char kAnonymousIdentity[] = "";

// The gRPC metadata key (lower case, as HTTP/2 carries it) and the scheme of the value.
inline constexpr char kAuthorizationMetadataKey[] = "authorization";

using TokenDigest = std::array<uint8_t, 32>;  // SHA-256

struct TokenEntry {
  std::string name;
  TokenDigest digest;
};

// Parses a tokens file's text (the format above). InvalidArgument naming the line number on a
// malformed line, a duplicate name or token, or a file without tokens; the message never
// contains a token.
[[nodiscard]] absl::StatusOr<std::vector<TokenEntry>> ParseTokens(absl::string_view text);

// SHA-256 of `bytes`.
TokenDigest Sha256(absl::string_view bytes);

class Authenticator {
 public:
  // Authentication off: every call is kAnonymousIdentity.
  Authenticator() = default;
  // Reads `path` (the format above). NotFound / PermissionDenied / InvalidArgument naming the
  // path when it cannot be read or parsed.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Authenticator>> FromFile(std::string path);
  // Tokens from `text` (tests).
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Authenticator>> FromText(
      absl::string_view text);

  bool enabled() const { return enabled_; }
  // Number of tokens in the table now (0 when off).
  size_t num_tokens() const;

  // Re-reads the file given to FromFile. On error the tokens in use stay as they were and the
  // error (naming the path and line, never a token) is returned. FailedPrecondition when the
  // authenticator was not made from a file.
  [[nodiscard]] absl::Status Reload();

  // The identity (token name) of a call, from its `authorization` metadata. With authentication
  // off, kAnonymousIdentity. Errors: Unauthenticated "missing credentials ..." without the
  // metadata, Unauthenticated "invalid credentials" for anything else that is not a known token
  // (malformed value, wrong scheme, unknown token: one message, so a client cannot tell which
  // part was wrong).
  [[nodiscard]] absl::StatusOr<std::string> Authenticate(
      const grpc::ServerContextBase& context) const;
  // The same from the metadata value itself (nullopt: no metadata).
  [[nodiscard]] absl::StatusOr<std::string> AuthenticateValue(
      std::optional<absl::string_view> authorization) const;

 private:
  explicit Authenticator(std::string path) : enabled_(true), path_(std::move(path)) {}

  using Table = std::vector<TokenEntry>;
  std::shared_ptr<const Table> table() const;

  const bool enabled_ = false;
  const std::string path_;  // empty: made from text
  mutable std::mutex mu_;
  std::shared_ptr<const Table> table_;  // guarded by mu_ (the pointer; the table is immutable)
};

}  // namespace ps::service

#endif  // POLYSKETCH_SERVER_SERVICE_AUTH_H_
