// Internals of the HTTP server shared by http_server.cc (listener, lifetime) and
// http_connection.cc (one connection: reading requests, routing, answering, the bridge from the
// engine's events to the connection). Not a public interface: include http_server.h instead.
#ifndef POLYSKETCH_SERVER_HTTP_HTTP_CONNECTION_H_
#define POLYSKETCH_SERVER_HTTP_HTTP_CONNECTION_H_

// Boost 1.74's asio/awaitable.hpp uses std::exchange without including <utility> (GCC 12, C++20).
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>

#include "server/http/http_server.h"
#include "server/service/generation_service.h"

namespace ps::http {

// One connection, whatever its transport (plaintext or TLS).
class ConnectionBase : public std::enable_shared_from_this<ConnectionBase> {
 public:
  virtual ~ConnectionBase() = default;
  // Runs the connection: TLS handshake if any, then requests until it closes.
  virtual void Start() = 0;
  // Engine events arrived for the request in progress (posted to the connection's strand).
  virtual void OnEngineEvents() = 0;
  // Closes the connection from another thread (server shutdown); cancels its request.
  virtual void Close() = 0;
  // The connection's strand: what the engine's events are posted to.
  virtual boost::asio::any_io_executor executor() = 0;
};

// Whether the server's I/O threads still take posts. Shared with the engine's observers of HTTP
// requests (Bridge in http_connection.cc), which may outlive the server: a request still in the
// scheduler when the server is destroyed gets its last events after, and they must find this,
// not a destroyed server. While `alive`, posting to the server's io_context is safe (posters hold
// `mu`); Shutdown clears it before it stops the io_context.
struct Lifeline {
  std::mutex mu;
  bool alive = true;
};

// Posts `connection`'s OnEngineEvents to its strand unless the server has stopped. Any thread.
void WakeConnection(Lifeline& lifeline, const std::weak_ptr<ConnectionBase>& connection);

// What the server and every connection share. Owned by HttpServer; connections point at it and
// never outlive it: they are owned by handlers of `io`, which is declared last and so destroyed
// first, with every handler still queued.
struct HttpServer::Core {
  HttpServerOptions options;
  service::GenerationService* service = nullptr;
  std::unique_ptr<boost::asio::ssl::context> tls;  // null: plaintext
  int64_t created_unix_seconds = 0;                // /v1/models "created"
  std::atomic<int64_t> open_connections{0};
  std::atomic<int64_t> active_requests{0};

  std::shared_ptr<Lifeline> lifeline = std::make_shared<Lifeline>();
  // The connections, for Shutdown (guarded by mu).
  std::mutex mu;
  std::vector<std::weak_ptr<ConnectionBase>> connections;
  void Register(const std::shared_ptr<ConnectionBase>& connection);

  boost::asio::io_context io;
};

// A connection for a socket just accepted (its executor is the connection's strand).
std::shared_ptr<ConnectionBase> MakeConnection(HttpServer::Core* core,
                                               boost::asio::ip::tcp::socket socket);

}  // namespace ps::http

#endif  // POLYSKETCH_SERVER_HTTP_HTTP_CONNECTION_H_
