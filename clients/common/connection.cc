// Channel credentials and the token for the C++ clients. The token goes into each call's metadata
// rather than into gRPC call credentials, because gRPC refuses call credentials on a plaintext
// channel and local, plaintext use with a token is legitimate (docs/security.md says what it
// exposes).
#include "clients/common/connection.h"

#include <fstream>
#include <sstream>
#include <utility>

#include <absl/status/status.h>
#include <absl/strings/ascii.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_split.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/channel_arguments.h>

namespace ps::clients {
namespace {

absl::StatusOr<std::string> ReadFile(const char* flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("--", flag, ": cannot read ", path));
  std::ostringstream bytes;
  bytes << in.rdbuf();
  if (in.bad()) return absl::InvalidArgumentError(absl::StrCat("--", flag, ": cannot read ", path));
  return bytes.str();
}

absl::StatusOr<std::string> Token(const ConnectionOptions& options) {
  if (!options.token.empty() && !options.token_file.empty()) {
    return absl::InvalidArgumentError("give --token or --token_file, not both");
  }
  if (!options.token.empty()) return std::string(absl::StripAsciiWhitespace(options.token));
  if (options.token_file.empty()) return std::string();
  absl::StatusOr<std::string> text = ReadFile("token_file", options.token_file);
  if (!text.ok()) return text.status();
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (!line.empty()) return std::string(line);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--token_file: ", options.token_file, " holds no token"));
}

}  // namespace

absl::StatusOr<Connection> Connect(const ConnectionOptions& options) {
  Connection connection;
  absl::StatusOr<std::string> token = Token(options);
  if (!token.ok()) return token.status();
  if (!token->empty()) connection.authorization = absl::StrCat("Bearer ", *token);

  if (options.tls_cert.empty() != options.tls_key.empty()) {
    return absl::InvalidArgumentError("--tls_cert and --tls_key go together (mutual TLS)");
  }
  const bool tls = options.tls || !options.tls_ca.empty() || !options.tls_cert.empty();
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (tls) {
    grpc::SslCredentialsOptions ssl;
    if (!options.tls_ca.empty()) {
      absl::StatusOr<std::string> ca = ReadFile("tls_ca", options.tls_ca);
      if (!ca.ok()) return ca.status();
      ssl.pem_root_certs = *std::move(ca);
    }
    if (!options.tls_cert.empty()) {
      absl::StatusOr<std::string> cert = ReadFile("tls_cert", options.tls_cert);
      if (!cert.ok()) return cert.status();
      absl::StatusOr<std::string> key = ReadFile("tls_key", options.tls_key);
      if (!key.ok()) return key.status();
      ssl.pem_cert_chain = *std::move(cert);
      ssl.pem_private_key = *std::move(key);
    }
    credentials = grpc::SslCredentials(ssl);
  } else if (!options.server_name.empty()) {
    return absl::InvalidArgumentError("--server_name needs TLS (--tls or --tls_ca)");
  }
  grpc::ChannelArguments arguments;
  if (!options.server_name.empty()) arguments.SetSslTargetNameOverride(options.server_name);
  if (options.max_receive_message_bytes != 0) {
    arguments.SetMaxReceiveMessageSize(options.max_receive_message_bytes);
  }
  connection.channel = grpc::CreateCustomChannel(options.target, credentials, arguments);
  return connection;
}

void Authorize(const Connection& connection, grpc::ClientContext* context) {
  if (!connection.authorization.empty()) {
    context->AddMetadata("authorization", connection.authorization);
  }
}

}  // namespace ps::clients
