// The health probe of health_check.h: a generic unary call with hand-encoded messages.
#include "tests/testing/health_check.h"

#include <future>
#include <vector>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

namespace ps::test {

int HealthStatus(const std::shared_ptr<grpc::Channel>& channel, const std::string& service_name) {
  EXPECT_LT(service_name.size(), 128u) << "one length byte only";
  std::string request_bytes;
  if (!service_name.empty()) {      // proto3: an empty string is not on the wire
    request_bytes.push_back(0x0A);  // field 1, length-delimited
    request_bytes.push_back(static_cast<char>(service_name.size()));
    request_bytes += service_name;
  }
  grpc::Slice slice(request_bytes);
  grpc::ByteBuffer request(&slice, 1), response;
  grpc::GenericStub stub(channel);
  grpc::ClientContext context;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&done](grpc::Status s) { done.set_value(s); });
  const grpc::Status status = done.get_future().get();
  if (!status.ok()) return -static_cast<int>(status.error_code());
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(response.Dump(&slices).ok());
  std::string bytes;
  for (const grpc::Slice& s : slices) {
    bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  if (bytes.empty()) return 0;  // UNKNOWN (the default value, not on the wire)
  EXPECT_EQ(bytes[0], 0x08);    // field 1, varint
  return bytes.size() >= 2 ? bytes[1] : 0;
}

}  // namespace ps::test
