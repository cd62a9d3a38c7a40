// The OpenAI-compatible HTTP/1.1 server (docs/serving.md, "HTTP API"), beside the gRPC server in
// the same process and on the same scheduler: POST /v1/completions, /v1/chat/completions (whole
// or as server-sent events), GET /v1/models, GET /health, POST /tokenize, /detokenize, and the
// session extension POST /v1/sessions, DELETE /v1/sessions/<id>.
//
// Every generation request takes the gRPC API's path into the engine: the bearer token through
// GenerationService::AuthenticateHeader, validation and limits through GenerationService::Prepare
// (the same ConvertGenerateRequest, --max_prompt_bytes, prompt bytes in flight), then
// Scheduler::Submit with an observer of its own; there is no second generation loop. A client
// that disconnects (seen at once: the connection keeps a read open while its request runs)
// cancels its engine request, which then ends within one engine step.
//
// Boost.Beast over Boost.Asio: a few I/O threads, no thread per connection, one strand per
// connection; engine events are posted to it and never wait for a client. Boost's error codes
// are used throughout and a throw escaping a handler is caught at the thread's edge and logged,
// so nothing throws across this interface.
//
// Thread-safety: Start, port and Shutdown may be called from any thread (Shutdown once at a
// time). Lifetimes: the GenerationService must outlive the server and the scheduler; destroy the
// server before the scheduler (a connection still open cancels its engine request). The
// scheduler's observers of HTTP requests hold nothing of the server, so requests may end after
// the server is gone.
#ifndef POLYSKETCH_SERVER_HTTP_HTTP_SERVER_H_
#define POLYSKETCH_SERVER_HTTP_HTTP_SERVER_H_

#include <cstdint>
#include <memory>
#include <string>

#include <absl/status/statusor.h>
#include <absl/time/time.h>

#include "server/http/chat_template.h"
#include "server/service/generation_service.h"
#include "server/service/tls.h"

namespace ps::http {

struct HttpServerOptions {
  std::string host = "0.0.0.0";
  int port = 8000;  // 0 picks a free one (port() says which)
  // The gRPC port's certificates (--tls_cert, --tls_key, --tls_client_ca): TLS when set, mutual
  // TLS with client_ca. Checked by service::MakeServerCredentials before the server starts.
  service::TlsFiles tls;
  // Largest request body (--max_receive_message_bytes, as for gRPC): a bigger one is answered
  // 413 before it is read.
  int64_t max_body_bytes = int64_t{8} << 20;
  int threads = 2;  // I/O threads (JSON parsing and building run on them)
  // A connection that sends no complete request for this long (idle keep-alive, or a request
  // that trickles in) is closed; a response write that does not complete in write_timeout (a
  // client that stopped reading) closes the connection and cancels its request.
  absl::Duration idle_timeout = absl::Seconds(60);
  absl::Duration write_timeout = absl::Seconds(60);
  // Most connections open at once; past it new ones are answered 503 and closed.
  int64_t max_connections = 4096;
  std::string model_name;  // the model id of /v1/models and the responses
  ChatTemplate chat_template;
};

class HttpServer {
 public:
  // Binds host:port and starts the I/O threads. Requests are answered through `service` (not
  // owned): UNAVAILABLE-like 503s until its scheduler is set. Errors: Unavailable naming the
  // address when it cannot listen; InvalidArgument naming a TLS file that does not load.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<HttpServer>> Start(
      HttpServerOptions options, service::GenerationService* service);
  // Shutdown(now) if not done yet.
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  int port() const;
  // Stops accepting, lets every response in progress finish until `deadline` (the drain has
  // ended the engine requests by then: their last events are being written), then closes every
  // connection and joins the threads.
  void Shutdown(absl::Time deadline);

  // Connections open now, and of them those with a request in progress (tests).
  int64_t open_connections() const;
  int64_t active_requests() const;

  struct Core;  // what connections share (http_connection.h)

 private:
  struct Runtime;  // listener, I/O threads
  HttpServer(std::unique_ptr<Core> core, std::unique_ptr<Runtime> runtime);
  // Destroyed in reverse: the runtime (threads joined by then), then the core, whose io_context
  // destroys the connections still queued in it.
  std::unique_ptr<Core> core_;
  std::unique_ptr<Runtime> runtime_;
};

// For the server's main: loads the chat template of `model_dir` (chat_template.json or the
// default), starts a server on host:port with the gRPC port's TLS files and
// --max_receive_message_bytes as the body limit, and logs one line to stderr,
// "polysketch-server: HTTP on <host>:<port> (OpenAI API, <plaintext|TLS|mutual TLS>, chat
// template <source>)". Errors are Start's or the template's, prefixed with the flag to look at.
[[nodiscard]] absl::StatusOr<std::unique_ptr<HttpServer>> StartHttpServer(
    const std::string& model_dir, const std::string& model_name, const std::string& host, int port,
    int threads, const service::TlsFiles& tls, int64_t max_body_bytes,
    service::GenerationService* service);

}  // namespace ps::http

#endif  // POLYSKETCH_SERVER_HTTP_HTTP_SERVER_H_
