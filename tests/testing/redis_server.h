// A real redis-server for tests (Debian's redis-server, installed by scripts/setup-deps): started
// on a free loopback port with persistence off, in a fresh directory, and killed when the object
// dies. Stop / Start restart it on the same port (a Redis restart loses everything: no
// persistence), Pause / Resume freeze it (SIGSTOP / SIGCONT: a slow or hung Redis). Failures are
// test failures (ADD_FAILURE) and leave the object not running.
#ifndef POLYSKETCH_TESTS_TESTING_REDIS_SERVER_H_
#define POLYSKETCH_TESTS_TESTING_REDIS_SERVER_H_

#include <string>
#include <sys/types.h>
#include <vector>

#include "tests/testing/files.h"

namespace ps::test {

class RedisServer {
 public:
  // extra: more redis-server arguments (e.g. {"--maxmemory", "2mb"}).
  explicit RedisServer(std::vector<std::string> extra = {});
  ~RedisServer();
  RedisServer(const RedisServer&) = delete;
  RedisServer& operator=(const RedisServer&) = delete;

  bool running() const { return pid_ > 0; }
  int port() const { return port_; }
  std::string address() const;  // "127.0.0.1:<port>"

  void Stop();   // SIGKILL, waits for it to exit
  bool Start();  // on the same port; true when it answers PING
  void Pause();
  void Resume();

 private:
  TempDir dir_;
  std::vector<std::string> extra_;
  int port_ = 0;
  pid_t pid_ = -1;
};

// A loopback TCP port nobody listens on now.
int FreePort();

}  // namespace ps::test

#endif  // POLYSKETCH_TESTS_TESTING_REDIS_SERVER_H_
