// How the C++ clients (polysketch-cli, polysketch-loadgen) reach a server: plaintext, TLS (with a
// CA bundle of their own or the system's roots), or mutual TLS (a client certificate and key),
// and the bearer token that every call then carries as `authorization: Bearer <token>`
// (docs/security.md). Each program defines its own flags and passes their values here.
#ifndef POLYSKETCH_CLIENTS_COMMON_CONNECTION_H_
#define POLYSKETCH_CLIENTS_COMMON_CONNECTION_H_

#include <memory>
#include <string>

#include <absl/status/statusor.h>
#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>

namespace ps::clients {

struct ConnectionOptions {
  std::string target;       // host:port
  bool tls = false;         // TLS with the system's roots unless tls_ca is set
  std::string tls_ca;       // PEM CA bundle that signed the server's certificate (implies tls)
  std::string tls_cert;     // PEM client certificate for mutual TLS (implies tls; needs tls_key)
  std::string tls_key;      // its PEM private key
  std::string server_name;  // the name checked against the server's certificate, when the
                            // target's host is not in it (e.g. an IP address)
  std::string token;        // bearer token; or
  std::string token_file;   // a file whose first non-blank line is the token
  int max_receive_message_bytes = 0;  // largest response accepted; 0: gRPC's default, -1: none
};

struct Connection {
  std::shared_ptr<grpc::Channel> channel;
  std::string authorization;  // "Bearer <token>", or empty without a token
};

// Builds the channel (it connects lazily). InvalidArgument for a certificate without its key (or
// the reverse), both token and token_file, an empty token; NotFound / InvalidArgument naming a
// file that cannot be read.
[[nodiscard]] absl::StatusOr<Connection> Connect(const ConnectionOptions& options);

// Adds the connection's credentials to a call's metadata (nothing without a token).
void Authorize(const Connection& connection, grpc::ClientContext* context);

}  // namespace ps::clients

#endif  // POLYSKETCH_CLIENTS_COMMON_CONNECTION_H_
