// The listener and the server's lifetime: TLS context, accept loop, I/O threads, shutdown. The
// connections themselves are in http_connection.cc.
#include "server/http/http_server.h"

// Boost 1.74's asio/awaitable.hpp uses std::exchange without including <utility> (GCC 12, C++20).
#include <algorithm>
#include <cstdio>
#include <exception>
#include <memory>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include <absl/strings/str_cat.h>
#include <absl/time/clock.h>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/strand.hpp>

#include "server/http/http_connection.h"

namespace ps::http {
namespace {

namespace net = boost::asio;
namespace ssl = boost::asio::ssl;
using tcp = boost::asio::ip::tcp;
using boost::system::error_code;

// The gRPC port's certificates for the HTTP port. The files were checked at start
// (service::MakeServerCredentials), so errors here are unlikely; they still name the file.
absl::StatusOr<std::unique_ptr<ssl::context>> MakeTlsContext(const service::TlsFiles& files) {
  auto context = std::make_unique<ssl::context>(ssl::context::tls_server);
  error_code ec;
  context->set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 |
                           ssl::context::no_sslv3 | ssl::context::no_tlsv1 |
                           ssl::context::no_tlsv1_1 | ssl::context::single_dh_use,
                       ec);
  auto failed = [&](const char* flag, const std::string& path) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, ": ", path, " cannot be used for HTTPS: ", ec.message()));
  };
  context->use_certificate_chain_file(files.cert, ec);
  if (ec) return failed("tls_cert", files.cert);
  context->use_private_key_file(files.key, ssl::context::pem, ec);
  if (ec) return failed("tls_key", files.key);
  if (!files.client_ca.empty()) {
    context->load_verify_file(files.client_ca, ec);
    if (ec) return failed("tls_client_ca", files.client_ca);
    context->set_verify_mode(ssl::verify_peer | ssl::verify_fail_if_no_peer_cert, ec);
  }
  return context;
}

// Accepts connections until the acceptor closes. Each connection gets a strand of its own.
class Listener : public std::enable_shared_from_this<Listener> {
 public:
  Listener(HttpServer::Core* core, tcp::acceptor acceptor)
      : core_(core), acceptor_(std::move(acceptor)) {}

  void Accept() {
    acceptor_.async_accept(net::make_strand(core_->io),
                           [self = shared_from_this()](const error_code& ec, tcp::socket socket) {
                             self->OnAccept(ec, std::move(socket));
                           });
  }

  void Close() {
    net::post(acceptor_.get_executor(), [self = shared_from_this()] {
      error_code ignored;
      self->acceptor_.close(ignored);
    });
  }

 private:
  void OnAccept(const error_code& ec, tcp::socket socket) {
    if (!acceptor_.is_open()) return;
    if (!ec) {
      error_code ignored;
      socket.set_option(tcp::no_delay(true), ignored);  // events go out as they are produced
      if (core_->open_connections.load() >= core_->options.max_connections) {
        static constexpr char kBusy[] =
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            "Connection: close\r\nContent-Length: 97\r\n\r\n"
            R"({"error":{"message":"too many connections","type":"service_unavailable","param":null,"code":null}})";
        socket.write_some(net::buffer(kBusy, sizeof(kBusy) - 1), ignored);
        socket.close(ignored);
      } else {
        std::shared_ptr<ConnectionBase> connection = MakeConnection(core_, std::move(socket));
        core_->Register(connection);
        connection->Start();
      }
    }
    // Accept errors (e.g. EMFILE) are per connection: keep accepting.
    Accept();
  }

  HttpServer::Core* const core_;
  tcp::acceptor acceptor_;
};

}  // namespace

struct HttpServer::Runtime {
  std::shared_ptr<Listener> listener;
  std::optional<net::executor_work_guard<net::io_context::executor_type>> work;
  std::vector<std::thread> threads;
  int port = 0;
  bool stopped = false;
};

HttpServer::HttpServer(std::unique_ptr<Core> core, std::unique_ptr<Runtime> runtime)
    : core_(std::move(core)), runtime_(std::move(runtime)) {}

HttpServer::~HttpServer() { Shutdown(absl::Now()); }

int HttpServer::port() const { return runtime_->port; }
int64_t HttpServer::open_connections() const { return core_->open_connections.load(); }
int64_t HttpServer::active_requests() const { return core_->active_requests.load(); }

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(HttpServerOptions options,
                                                              service::GenerationService* service) {
  auto core = std::make_unique<Core>();
  core->options = std::move(options);
  core->service = service;
  core->created_unix_seconds = absl::ToUnixSeconds(absl::Now());
  if (service::TlsEnabled(core->options.tls)) {
    absl::StatusOr<std::unique_ptr<ssl::context>> tls = MakeTlsContext(core->options.tls);
    if (!tls.ok()) return tls.status();
    core->tls = *std::move(tls);
  }
  const std::string address = absl::StrCat(core->options.host, ":", core->options.port);
  auto cannot_listen = [&](const error_code& ec) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", address, " (", ec.message(), ")"));
  };
  error_code ec;
  const net::ip::address ip = net::ip::make_address(core->options.host, ec);
  if (ec) return cannot_listen(ec);
  tcp::acceptor acceptor(net::make_strand(core->io));
  const tcp::endpoint endpoint(ip, static_cast<unsigned short>(core->options.port));
  acceptor.open(endpoint.protocol(), ec);
  if (!ec) acceptor.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) acceptor.bind(endpoint, ec);
  if (!ec) acceptor.listen(net::socket_base::max_listen_connections, ec);
  if (ec) return cannot_listen(ec);
  const tcp::endpoint bound = acceptor.local_endpoint(ec);
  if (ec) return cannot_listen(ec);

  auto runtime = std::make_unique<Runtime>();
  runtime->port = bound.port();
  runtime->listener = std::make_shared<Listener>(core.get(), std::move(acceptor));
  runtime->listener->Accept();
  runtime->work.emplace(core->io.get_executor());
  const int threads = std::max(1, core->options.threads);
  for (int i = 0; i < threads; ++i) {
    runtime->threads.emplace_back([io = &core->io] {
      for (;;) {
        try {
          io->run();
          return;
        } catch (const std::exception& e) {
          // A handler threw (allocation failure, a library bug): log it and keep serving.
          std::fprintf(stderr, "polysketch-server: HTTP: handler failed: %s\n", e.what());
        }
      }
    });
  }
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(core), std::move(runtime)));
}

absl::StatusOr<std::unique_ptr<HttpServer>> StartHttpServer(
    const std::string& model_dir, const std::string& model_name, const std::string& host, int port,
    int threads, const service::TlsFiles& tls, int64_t max_body_bytes,
    service::GenerationService* service) {
  absl::StatusOr<ChatTemplate> chat_template = LoadChatTemplate(model_dir);
  if (!chat_template.ok()) {
    return absl::Status(chat_template.status().code(),
                        absl::StrCat("chat template: ", chat_template.status().message()));
  }
  HttpServerOptions options;
  options.host = host;
  options.port = port;
  options.tls = tls;
  options.max_body_bytes = max_body_bytes;
  options.threads = threads;
  options.model_name = model_name;
  options.chat_template = *std::move(chat_template);
  const std::string source = options.chat_template.source;
  absl::StatusOr<std::unique_ptr<HttpServer>> server = HttpServer::Start(options, service);
  if (!server.ok()) {
    return absl::Status(server.status().code(),
                        absl::StrCat("--http_port: ", server.status().message()));
  }
  std::fprintf(stderr, "polysketch-server: HTTP on %s:%d (OpenAI API, %s, chat template %s)\n",
               host.c_str(), (*server)->port(),
               !service::TlsEnabled(tls) ? "plaintext"
               : tls.client_ca.empty()   ? "TLS"
                                         : "mutual TLS",
               source.c_str());
  return server;
}

void HttpServer::Shutdown(absl::Time deadline) {
  if (runtime_->stopped) return;
  runtime_->stopped = true;
  runtime_->listener->Close();
  // Responses in progress: their engine requests have ended (the drain), so only their last
  // bytes are left to write.
  while (core_->active_requests.load() > 0 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  {
    std::lock_guard<std::mutex> lock(core_->lifeline->mu);
    core_->lifeline->alive = false;  // no more posts from engine threads
  }
  std::vector<std::shared_ptr<ConnectionBase>> open;
  {
    std::lock_guard<std::mutex> lock(core_->mu);
    for (const std::weak_ptr<ConnectionBase>& weak : core_->connections) {
      if (std::shared_ptr<ConnectionBase> c = weak.lock()) open.push_back(std::move(c));
    }
    core_->connections.clear();
  }
  for (const std::shared_ptr<ConnectionBase>& c : open) c->Close();
  open.clear();
  runtime_->work.reset();
  // Let the closes run, then stop whatever is still waiting (timers of lingering closes).
  const absl::Time stop_by = absl::Now() + absl::Milliseconds(200);
  while (core_->open_connections.load() > 0 && absl::Now() < stop_by) {
    absl::SleepFor(absl::Milliseconds(2));
  }
  core_->io.stop();
  for (std::thread& t : runtime_->threads) t.join();
  runtime_->threads.clear();
}

}  // namespace ps::http
