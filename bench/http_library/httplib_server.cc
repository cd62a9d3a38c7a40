// cpp-httplib 0.11.4 (Debian): trivial JSON handler, SSE stream, and a held request.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <httplib.h>
#include <netinet/tcp.h>
#include <thread>
int main(int argc, char** argv) {
  httplib::Server server;
  // Fair to it: TCP_NODELAY on the listening socket (inherited by accepted ones; the library is
  // prebuilt without CPPHTTPLIB_TCP_NODELAY) and a pool of argv[2] threads (default 8 here).
  server.set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &yes, sizeof(yes));
  });
  const int threads = argc > 2 ? atoi(argv[2]) : 8;
  server.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  server.Post("/ping", [](const httplib::Request& req, httplib::Response& res) {
    res.set_content("{\"ok\":true,\"n\":" + std::to_string(req.body.size()) + "}",
                    "application/json");
  });
  // 20 events, 50 ms apart.
  server.Get("/stream", [](const httplib::Request&, httplib::Response& res) {
    auto count = std::make_shared<int>(0);
    res.set_chunked_content_provider("text/event-stream", [count](size_t, httplib::DataSink& sink) {
      if (*count > 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
      if (*count == 20) {
        sink.write("data: [DONE]\n\n", 14);
        sink.done();
        return true;
      }
      ++*count;
      std::string event = "data: {\"i\":" + std::to_string(*count) + "}\n\n";
      if (!sink.write(event.data(), event.size())) {
        std::fprintf(stderr, "stream: write failed after %d events\n", *count);
        return false;
      }
      return true;
    });
  });
  // Holds the request 3 s without writing: can the handler learn that the client left?
  server.Get("/hold", [](const httplib::Request&, httplib::Response& res) {
    auto start = std::chrono::steady_clock::now();
    std::this_thread::sleep_for(std::chrono::seconds(3));  // no API to watch the socket here
    res.set_content("late", "text/plain");
    std::fprintf(stderr, "hold: answered after %lld ms (the client may be gone)\n",
                 (long long)std::chrono::duration_cast<std::chrono::milliseconds>(
                     std::chrono::steady_clock::now() - start)
                     .count());
  });
  if (!server.listen("127.0.0.1", atoi(argv[1]))) perror("listen");
}
