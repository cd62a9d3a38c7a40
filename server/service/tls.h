// Server TLS credentials from PEM files (--tls_cert, --tls_key, optional --tls_client_ca for
// mutual TLS), checked before gRPC sees them: gRPC itself only logs a mismatched or unparsable
// key and then fails to bind, which would reach the operator as "cannot listen". Here each
// problem is an error that names the file and what is wrong with it.
#ifndef POLYSKETCH_SERVER_SERVICE_TLS_H_
#define POLYSKETCH_SERVER_SERVICE_TLS_H_

#include <memory>
#include <string>

#include <absl/status/statusor.h>
#include <grpcpp/security/server_credentials.h>

namespace ps::service {

struct TlsFiles {
  std::string cert;       // PEM certificate chain of the server (leaf first)
  std::string key;        // PEM private key of the leaf certificate
  std::string client_ca;  // PEM CA bundle; non-empty: clients must present a certificate it signed
};

// Plaintext credentials when cert, key and client_ca are all empty; TLS (mutual when client_ca is
// set) otherwise. Errors: InvalidArgument when only one of cert / key is given or client_ca comes
// without them; NotFound / PermissionDenied naming an unreadable file; InvalidArgument naming a
// file without a PEM certificate / key, or a key that does not belong to the certificate.
[[nodiscard]] absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsFiles& files);

// Whether MakeServerCredentials would make TLS credentials for `files`.
inline bool TlsEnabled(const TlsFiles& files) {
  return !files.cert.empty() || !files.key.empty() || !files.client_ca.empty();
}

}  // namespace ps::service

#endif  // POLYSKETCH_SERVER_SERVICE_TLS_H_
