// Boost.Beast 1.74 (Debian): the same three handlers as httplib_server.cc, async, on one thread
// (run.sh; the second argument, threads, is ignored).
#include <chrono>
#include <cstdio>
#include <memory>
#include <utility>  // Boost 1.74 asio/awaitable.hpp uses std::exchange without it (GCC 12, C++20)

#include <boost/asio.hpp>
#include <boost/beast.hpp>
namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
class Session : public std::enable_shared_from_this<Session> {
 public:
  explicit Session(tcp::socket s) : stream_(std::move(s)), timer_(stream_.get_executor()) {}
  void Read() {
    req_ = {};
    http::async_read(stream_, buffer_, req_,
                     [self = shared_from_this()](beast::error_code ec, size_t) {
                       if (ec) return;
                       self->Handle();
                     });
  }

 private:
  void Handle() {
    if (req_.target() == "/ping") {
      auto res =
          std::make_shared<http::response<http::string_body>>(http::status::ok, req_.version());
      res->set(http::field::content_type, "application/json");
      res->body() = "{\"ok\":true,\"n\":" + std::to_string(req_.body().size()) + "}";
      res->keep_alive(req_.keep_alive());
      res->prepare_payload();
      http::async_write(stream_, *res,
                        [self = shared_from_this(), res](beast::error_code ec, size_t) {
                          if (!ec) self->Read();
                        });
    } else if (req_.target() == "/stream") {
      auto res =
          std::make_shared<http::response<http::empty_body>>(http::status::ok, req_.version());
      res->set(http::field::content_type, "text/event-stream");
      res->chunked(true);
      auto sr = std::make_shared<http::response_serializer<http::empty_body>>(*res);
      http::async_write_header(stream_, *sr,
                               [self = shared_from_this(), res, sr](beast::error_code ec, size_t) {
                                 if (!ec) self->Event(1);
                               });
    } else {  // /hold: watch the socket while "generating"
      start_ = std::chrono::steady_clock::now();
      stream_.async_read_some(
          buffer_.prepare(1), [self = shared_from_this()](beast::error_code ec, size_t n) {
            self->buffer_.commit(n);
            if (ec) {
              self->timer_.cancel();
              std::fprintf(stderr, "hold: client gone after %lld ms (%s)\n",
                           (long long)std::chrono::duration_cast<std::chrono::milliseconds>(
                               std::chrono::steady_clock::now() - self->start_)
                               .count(),
                           ec.message().c_str());
            }
          });
      timer_.expires_after(std::chrono::seconds(3));
      timer_.async_wait([self = shared_from_this()](beast::error_code) {});
    }
  }
  void Event(int i) {
    auto body = std::make_shared<std::string>(
        i > 20 ? "data: [DONE]\n\n" : "data: {\"i\":" + std::to_string(i) + "}\n\n");
    net::async_write(stream_, http::make_chunk(net::buffer(*body)),
                     [self = shared_from_this(), body, i](beast::error_code ec, size_t) {
                       if (ec) {
                         std::fprintf(stderr, "stream: write failed after %d events\n", i);
                         return;
                       }
                       if (i > 20) {
                         net::async_write(self->stream_, http::make_chunk_last(),
                                          [self](beast::error_code ec2, size_t) {
                                            if (!ec2) self->Read();
                                          });
                         return;
                       }
                       self->timer_.expires_after(std::chrono::milliseconds(50));
                       self->timer_.async_wait([self, i](beast::error_code ec3) {
                         if (!ec3) self->Event(i + 1);
                       });
                     });
  }
  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  http::request<http::string_body> req_;
  net::steady_timer timer_;
  std::chrono::steady_clock::time_point start_;
};
void Accept(tcp::acceptor& acceptor) {
  acceptor.async_accept([&acceptor](beast::error_code ec, tcp::socket socket) {
    if (!ec) {
      socket.set_option(tcp::no_delay(true));
      std::make_shared<Session>(std::move(socket))->Read();
    }
    Accept(acceptor);
  });
}
int main(int argc, char** argv) {
  net::io_context io(1);
  tcp::acceptor acceptor(io, {net::ip::make_address("127.0.0.1"), (unsigned short)atoi(argv[1])});
  Accept(acceptor);
  io.run();
}
