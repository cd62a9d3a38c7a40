// Conversation-shaped workloads for polysketch-loadgen (--scenario), which measure what the
// server's state reuse buys (docs/sessions.md):
//   chat           one multi-turn conversation. Each turn adds turn_bytes of user text and the
//                  model's reply. With sessions, each request sends only the new turn; without,
//                  each request resends the whole conversation so far (what a stateless API
//                  needs), which the prefix cache may or may not shorten.
//   shared_prefix  requests that all start with the same system prompt and differ after it:
//                  what the prefix cache is for.
// Requests run one at a time, so each time to first token is the server's own latency for that
// prompt, not queueing behind the others. The report gives TTFT per turn / request (measured by
// the client from sending to the first token of the stream) and the tokens the server said it
// did not have to prefill (FinalInfo.cached_tokens).
#ifndef POLYSKETCH_CLIENTS_LOADGEN_SCENARIOS_H_
#define POLYSKETCH_CLIENTS_LOADGEN_SCENARIOS_H_

#include <cstdint>
#include <string>

#include <absl/time/time.h>

#include "polysketch/v1/generation.grpc.pb.h"

namespace ps::loadgen {

struct ScenarioOptions {
  std::string name;                               // "chat" or "shared_prefix"
  int turns = 10;                                 // chat: turns of the conversation
  int turn_bytes = 4000;                          // chat: user text per turn
  bool sessions = false;                          // chat: use a session instead of resending
  int requests = 32;                              // shared_prefix: requests
  int system_bytes = 16000;                       // shared_prefix: the shared system prompt
  int user_bytes = 200;                           // shared_prefix: each request's own text after it
  int max_new_tokens = 32;                        // per request
  absl::Duration timeout = absl::ZeroDuration();  // per request; 0: none
  uint64_t seed = 1;
  bool json = false;
  std::string authorization;  // "Bearer <token>" sent with every call; empty: none
};

// Runs the scenario against `stub`, printing the report (and a JSON line when options.json).
// Returns the process exit code: 0 when every request succeeded, 1 otherwise.
int RunScenario(polysketch::v1::GenerationService::Stub& stub, const ScenarioOptions& options);

}  // namespace ps::loadgen

#endif  // POLYSKETCH_CLIENTS_LOADGEN_SCENARIOS_H_
