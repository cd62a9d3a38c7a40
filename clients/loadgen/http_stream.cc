// Blocking HTTP/1.1 with chunked server-sent events, enough for polysketch's own HTTP API: the
// status line, headers, a chunked body whose events are "data: {...}" lines. Timestamps are
// taken as each chunk is read, so the figures include parsing no more than the gRPC side does.
#include "clients/loadgen/http_stream.h"

#include <cstdio>
#include <cstring>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <absl/strings/ascii.h>
#include <absl/strings/match.h>
#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_split.h>

namespace ps::loadgen {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// The unsigned integer after `"key":` in `json` (the usage chunk's counts), or 0.
uint64_t JsonCount(absl::string_view json, absl::string_view key) {
  const std::string needle = absl::StrCat("\"", key, "\":");
  const size_t at = json.find(needle);
  if (at == absl::string_view::npos) return 0;
  size_t end = at + needle.size();
  while (end < json.size() && json[end] == ' ') ++end;
  size_t digits = end;
  while (digits < json.size() && absl::ascii_isdigit(static_cast<unsigned char>(json[digits]))) {
    ++digits;
  }
  uint64_t value = 0;
  if (!absl::SimpleAtoi(json.substr(end, digits - end), &value)) return 0;
  return value;
}

}  // namespace

std::string JsonString(const std::string& text) {
  std::string out = "\"";
  for (const char c : text) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char escaped[8];
          std::snprintf(escaped, sizeof(escaped), "\\u%04x", static_cast<unsigned>(c));
          out += escaped;
        } else {
          out += c;
        }
    }
  }
  out += '"';
  return out;
}

HttpConnection::HttpConnection(std::string host, int port, std::string authorization)
    : host_(std::move(host)), port_(port), authorization_(std::move(authorization)) {}

HttpConnection::~HttpConnection() { Disconnect(); }

void HttpConnection::Disconnect() {
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
  buffer_.clear();
  pos_ = 0;
}

bool HttpConnection::Connect(std::string* error) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (const int rc = getaddrinfo(host_.c_str(), absl::StrCat(port_).c_str(), &hints, &found);
      rc != 0) {
    *error = absl::StrCat("cannot resolve ", host_, ": ", gai_strerror(rc));
    return false;
  }
  for (addrinfo* a = found; a != nullptr && fd_ < 0; a = a->ai_next) {
    fd_ = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
    if (fd_ < 0) continue;
    if (connect(fd_, a->ai_addr, a->ai_addrlen) != 0) {
      close(fd_);
      fd_ = -1;
    }
  }
  freeaddrinfo(found);
  if (fd_ < 0) {
    *error = absl::StrCat("cannot connect to ", host_, ":", port_, ": ", std::strerror(errno));
    return false;
  }
  const int yes = 1;
  setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &yes, sizeof(yes));
  return true;
}

bool HttpConnection::Fill() {
  if (pos_ > 0 && pos_ == buffer_.size()) {
    buffer_.clear();
    pos_ = 0;
  }
  char chunk[16384];
  const ssize_t n = recv(fd_, chunk, sizeof(chunk), 0);
  if (n <= 0) return false;
  buffer_.append(chunk, static_cast<size_t>(n));
  return true;
}

bool HttpConnection::ReadLine(std::string* line) {
  for (;;) {
    const size_t end = buffer_.find("\r\n", pos_);
    if (end != std::string::npos) {
      *line = buffer_.substr(pos_, end - pos_);
      pos_ = end + 2;
      return true;
    }
    if (!Fill()) return false;
  }
}

bool HttpConnection::ReadExactly(size_t n, std::string* out) {
  while (buffer_.size() - pos_ < n) {
    if (!Fill()) return false;
  }
  *out = buffer_.substr(pos_, n);
  pos_ += n;
  return true;
}

HttpStreamResult HttpConnection::StreamCompletion(const std::string& body) {
  HttpStreamResult result;
  const std::string request = absl::StrCat(
      "POST /v1/completions HTTP/1.1\r\nHost: ", host_, "\r\nContent-Type: application/json\r\n",
      authorization_.empty() ? "" : absl::StrCat("Authorization: ", authorization_, "\r\n"),
      "Content-Length: ", body.size(), "\r\n\r\n", body);
  // A kept-alive connection the server has closed in the meantime fails at the first read:
  // retry once on a fresh one (nothing was processed: no status line came back).
  Clock::time_point start;
  std::string status_line;
  for (int attempt = 0; attempt < 2; ++attempt) {
    if (fd_ < 0 && !Connect(&result.error)) return result;
    start = Clock::now();
    if (send(fd_, request.data(), request.size(), MSG_NOSIGNAL) ==
            static_cast<ssize_t>(request.size()) &&
        ReadLine(&status_line)) {
      break;
    }
    Disconnect();
    status_line.clear();
  }
  if (status_line.empty()) {
    result.error = "connection closed before an answer";
    return result;
  }
  std::vector<std::string> parts = absl::StrSplit(status_line, absl::MaxSplits(' ', 2));
  if (parts.size() < 2 || !absl::SimpleAtoi(parts[1], &result.status)) {
    result.error = absl::StrCat("bad status line: ", status_line);
    Disconnect();
    return result;
  }
  bool chunked = false, close_after = false;
  size_t content_length = 0;
  for (std::string line; ReadLine(&line) && !line.empty();) {
    const std::string lower = absl::AsciiStrToLower(line);
    chunked |= lower == "transfer-encoding: chunked";
    close_after |= lower == "connection: close";
    if (absl::StartsWith(lower, "content-length:")) {
      if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(absl::string_view(lower).substr(15)),
                            &content_length)) {
        result.error = absl::StrCat("bad header: ", line);
        Disconnect();
        return result;
      }
    }
  }
  if (!chunked) {  // an error answer
    std::string answer;
    ReadExactly(content_length, &answer);
    result.error = answer;
    if (close_after) Disconnect();
    return result;
  }
  std::string events;  // event text not yet split
  Clock::time_point last_event;
  bool done = false;
  for (;;) {  // chunks, up to the last (empty) one, which follows [DONE]
    std::string size_line, data;
    size_t size = 0;
    if (!ReadLine(&size_line) || !absl::SimpleHexAtoi(size_line, &size)) {
      result.error = "the stream broke";
      Disconnect();
      return result;
    }
    if (!ReadExactly(size + 2, &data)) {
      result.error = "the stream broke";
      Disconnect();
      return result;
    }
    if (size == 0) break;
    const Clock::time_point now = Clock::now();
    events.append(data, 0, size);
    for (size_t end; (end = events.find("\n\n")) != std::string::npos; events.erase(0, end + 2)) {
      const absl::string_view event = absl::string_view(events).substr(0, end);
      if (event == "data: [DONE]") {
        done = true;
        result.e2e_seconds = Seconds(now - start);
        continue;
      }
      if (absl::StrContains(event, "\"error\":")) result.error = std::string(event);
      if (absl::StrContains(event, "\"usage\":{")) {
        result.completion_tokens = JsonCount(event, "completion_tokens");
        result.prompt_tokens = JsonCount(event, "prompt_tokens");
        continue;
      }
      // An event with text (not the last chunk's empty text and finish reason).
      if (absl::StrContains(event, "\"text\":\"\"")) continue;
      if (!result.got_first_event) {
        result.got_first_event = true;
        result.ttft_seconds = Seconds(now - start);
      } else {
        result.event_gaps_seconds.push_back(Seconds(now - last_event));
        result.first_to_last_seconds = Seconds(now - start) - result.ttft_seconds;
      }
      last_event = now;
    }
  }
  if (!done && result.error.empty()) result.error = "the stream ended without [DONE]";
  if (close_after) Disconnect();
  return result;
}

}  // namespace ps::loadgen
