// The connection flags of connection_flags.h.
#include "clients/common/connection_flags.h"

#include <absl/flags/flag.h>
#include <absl/strings/match.h>

ABSL_FLAG(std::string, target, "localhost:50051", "Server address, host:port.");
ABSL_FLAG(bool, tls, false, "Connect with TLS, trusting the system's CAs (see --tls_ca).");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA bundle that signed the server's certificate; turns TLS on.");
ABSL_FLAG(std::string, tls_cert, "", "PEM client certificate for mutual TLS (with --tls_key).");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert.");
ABSL_FLAG(std::string, server_name, "",
          "Name to check the server's certificate against instead of the --target host.");
ABSL_FLAG(std::string, token, "",
          "Bearer token sent with every call (visible in the process list: prefer --token_file).");
ABSL_FLAG(std::string, token_file, "", "File whose first non-blank line is the bearer token.");

namespace ps::clients {

ConnectionOptions ConnectionOptionsFromFlags() {
  return {.target = absl::GetFlag(FLAGS_target),
          .tls = absl::GetFlag(FLAGS_tls),
          .tls_ca = absl::GetFlag(FLAGS_tls_ca),
          .tls_cert = absl::GetFlag(FLAGS_tls_cert),
          .tls_key = absl::GetFlag(FLAGS_tls_key),
          .server_name = absl::GetFlag(FLAGS_server_name),
          .token = absl::GetFlag(FLAGS_token),
          .token_file = absl::GetFlag(FLAGS_token_file)};
}

bool IsConnectionFlagsFile(absl::string_view path) {
  return absl::StrContains(path, "clients/common/connection_flags");
}

}  // namespace ps::clients
