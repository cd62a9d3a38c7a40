// The grpc.health.v1 probe for tests that run a server in process: Debian ships no C++ stub of
// the health service, so the call goes through a generic stub with the two messages encoded by
// hand: HealthCheckRequest {string service = 1}, HealthCheckResponse {ServingStatus status = 1}.
#ifndef POLYSKETCH_TESTS_TESTING_HEALTH_CHECK_H_
#define POLYSKETCH_TESTS_TESTING_HEALTH_CHECK_H_

#include <memory>
#include <string>

#include <grpcpp/channel.h>

namespace ps::test {

// grpc.health.v1.Health/Check of `service_name` ("" is liveness; at most 127 bytes) over
// `channel`, with no credentials of its own. Returns the ServingStatus (1 SERVING, 2 NOT_SERVING,
// 0 UNKNOWN), or minus the gRPC status code when the call fails. A malformed response fails the
// test.
int HealthStatus(const std::shared_ptr<grpc::Channel>& channel,
                 const std::string& service_name = "");

}  // namespace ps::test

#endif  // POLYSKETCH_TESTS_TESTING_HEALTH_CHECK_H_
