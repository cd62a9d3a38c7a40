#include "tests/testing/redis_server.h"

#include <arpa/inet.h>
#include <cstdlib>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <absl/strings/str_cat.h>
#include <absl/time/clock.h>
#include <gtest/gtest.h>

namespace ps::test {

int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  close(fd);
  return port;
}

RedisServer::RedisServer(std::vector<std::string> extra) : extra_(std::move(extra)) {
  port_ = FreePort();
  Start();
}

RedisServer::~RedisServer() { Stop(); }

std::string RedisServer::address() const { return absl::StrCat("127.0.0.1:", port_); }

bool RedisServer::Start() {
  if (running()) return true;
  std::vector<std::string> args = {
      "redis-server", "--port",    absl::StrCat(port_),   "--bind", "127.0.0.1",
      "--save",       "",          "--appendonly",        "no",     "--dir",
      dir_.path(),    "--logfile", dir_.Join("redis.log")};
  args.insert(args.end(), extra_.begin(), extra_.end());
  const pid_t pid = fork();
  if (pid == 0) {
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execvp("redis-server", argv.data());
    _exit(127);
  }
  if (pid < 0) {
    ADD_FAILURE() << "fork failed";
    return false;
  }
  pid_ = pid;
  const std::string ping = absl::StrCat("redis-cli -p ", port_, " ping > /dev/null 2>&1");
  for (int i = 0; i < 200; ++i) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      ADD_FAILURE() << "redis-server exited at start (is it installed? scripts/setup-deps "
                       "installs redis-server and redis-tools)";
      return false;
    }
    if (std::system(ping.c_str()) == 0) return true;
    absl::SleepFor(absl::Milliseconds(25));
  }
  ADD_FAILURE() << "redis-server on port " << port_ << " does not answer PING";
  Stop();
  return false;
}

void RedisServer::Stop() {
  if (!running()) return;
  kill(pid_, SIGCONT);
  kill(pid_, SIGKILL);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

void RedisServer::Pause() {
  if (running()) kill(pid_, SIGSTOP);
}

void RedisServer::Resume() {
  if (running()) kill(pid_, SIGCONT);
}

}  // namespace ps::test
