// The command-line flags of a server connection, shared by polysketch-cli and polysketch-loadgen
// so that both spell and document them alike: --target, TLS (--tls, --tls_ca, --tls_cert,
// --tls_key, --server_name) and bearer tokens (--token, --token_file); docs/security.md.
// Linking this file defines the flags.
#ifndef POLYSKETCH_CLIENTS_COMMON_CONNECTION_FLAGS_H_
#define POLYSKETCH_CLIENTS_COMMON_CONNECTION_FLAGS_H_

#include <string>

#include <absl/flags/declare.h>
#include <absl/strings/string_view.h>

#include "clients/common/connection.h"

ABSL_DECLARE_FLAG(std::string, target);

namespace ps::clients {

// ConnectionOptions from the flags above (max_receive_message_bytes left at its default).
ConnectionOptions ConnectionOptionsFromFlags();

// Whether `path`, a flag's source file as Abseil reports it, is this file's: for a program's
// FlagsUsageConfig, so that --help lists these flags with the program's own.
bool IsConnectionFlagsFile(absl::string_view path);

}  // namespace ps::clients

#endif  // POLYSKETCH_CLIENTS_COMMON_CONNECTION_FLAGS_H_
