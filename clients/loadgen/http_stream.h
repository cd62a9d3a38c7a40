// The HTTP side of polysketch-loadgen (--api http): one streamed POST /v1/completions
// (server-sent events) over a keep-alive HTTP/1.1 connection, timed as the gRPC streams are:
// time to the first event with text, time to each later event, the end. Plaintext only (for
// TLS, measure through a proxy or use the gRPC mode); blocking sockets, one connection per
// worker thread, so N workers are N keep-alive connections.
#ifndef POLYSKETCH_CLIENTS_LOADGEN_HTTP_STREAM_H_
#define POLYSKETCH_CLIENTS_LOADGEN_HTTP_STREAM_H_

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace ps::loadgen {

// One streamed completion as the client saw it.
struct HttpStreamResult {
  int status = 0;     // HTTP status; 0: no answer (connection failed or closed)
  std::string error;  // why, when status != 200 or the stream broke
  bool got_first_event = false;
  double ttft_seconds = 0;                 // request sent -> first event with text
  std::vector<double> event_gaps_seconds;  // between consecutive events with text
  double first_to_last_seconds = 0;        // first -> last event with text
  double e2e_seconds = 0;                  // request sent -> [DONE]
  uint64_t completion_tokens = 0;          // from the usage chunk
  uint64_t prompt_tokens = 0;
};

// The JSON string literal of `text` (quotes included; control characters escaped).
std::string JsonString(const std::string& text);

// A keep-alive connection to host:port; reconnects when the server closed it.
class HttpConnection {
 public:
  HttpConnection(std::string host, int port, std::string authorization);
  ~HttpConnection();
  HttpConnection(const HttpConnection&) = delete;
  HttpConnection& operator=(const HttpConnection&) = delete;

  // POSTs `body` (a completions request with "stream": true) to /v1/completions and reads the
  // stream to its end.
  HttpStreamResult StreamCompletion(const std::string& body);

 private:
  bool Connect(std::string* error);
  void Disconnect();
  // Reads more bytes into buffer_; false on EOF or error.
  bool Fill();
  // One line (without CRLF) from the buffer; false when the connection ended first.
  bool ReadLine(std::string* line);
  bool ReadExactly(size_t n, std::string* out);

  const std::string host_;
  const int port_;
  const std::string authorization_;
  int fd_ = -1;
  std::string buffer_;
  size_t pos_ = 0;
};

}  // namespace ps::loadgen

#endif  // POLYSKETCH_CLIENTS_LOADGEN_HTTP_STREAM_H_
