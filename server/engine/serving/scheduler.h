// Scheduler: continuous batching on one engine thread (architecture.md, "One request, end to
// end" and "Threads"). Requests come in from any thread through Submit and Cancel; the engine
// thread alone owns the Model, its state slots and every running sequence. Each engine step:
//   1. ends requests that were cancelled or passed their deadline (queued or running), freeing
//      their slots in the same step;
//   2. admits queued requests, oldest first, while state slots are free;
//   3. runs one decode step for every running sequence that is past its prompt, as one batch;
//   4. prefills at most `prefill_tokens_per_step` prompt tokens (oldest request first), so a long
//      prompt is spread over many steps and never stalls the running streams. A request that
//      asked for prompt log-probabilities gets the logits of every token of each model prefill
//      chunk, scored (log_softmax of the next prompt token, top alternatives) and sent before the
//      chunk's buffer is reused: its memory stays prefill_chunk x V whatever the prompt's length.
// The recurrent state is also kept beyond a request (docs/sessions.md):
//   * the prefix cache (prefix_cache.h): a new request restores the state of the longest cached
//     prefix of its prompt and prefills only the rest; snapshots are taken during prefill;
//   * sessions (session_store.h): a request naming a session starts from the state its previous
//     request left, and leaves its own final state there when it completes;
//   * export / import of a session's state as bytes (state_codec.h).
// Outputs leave through each request's RequestObserver, called on the engine thread; what a step,
// a finished request and the engine's gauges report is in scheduler_reports.h.
//
// Thread-safety: Submit, Cancel, CancelAll, StartDrain, Stats, Progress and the destructor may be
// called from any thread. Observers are called on the engine thread only and must not block (hand
// the event to another thread) and must not call back into the scheduler.
#ifndef POLYSKETCH_SERVER_ENGINE_SERVING_SCHEDULER_H_
#define POLYSKETCH_SERVER_ENGINE_SERVING_SCHEDULER_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <absl/container/flat_hash_map.h>
#include <absl/container/flat_hash_set.h>
#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>
#include <absl/time/time.h>

#include "server/engine/model/model.h"
#include "server/engine/serving/sampler.h"
#include "server/engine/serving/scheduler_reports.h"
#include "server/engine/serving/stop_checker.h"
#include "server/engine/state_reuse/prefix_cache.h"
#include "server/engine/state_reuse/prefix_tier.h"
#include "server/engine/state_reuse/session_store.h"
#include "server/engine/state_reuse/state_codec.h"

namespace ps::engine {

// Longest EngineRequest::prefix_cache_salt.
inline constexpr size_t kMaxCacheSaltBytes = 256;

struct SchedulerOptions {
  // Queue bounds: past either, Submit answers ResourceExhausted at once.
  int64_t max_waiting = 256;                      // requests admitted to the queue, not yet running
  int64_t max_waiting_tokens = int64_t{1} << 22;  // prompt tokens of those requests
  // Prompt tokens prefilled per engine step (chunked prefill interleaved with decode steps).
  int64_t prefill_tokens_per_step = 512;
  // The prefix cache (off when budget_bytes is 0). granularity 0: the model's local_exact block
  // size, or 64 for a model without one.
  PrefixCacheOptions prefix_cache = {
      .budget_bytes = 0, .granularity = 0, .max_remembered = 1 << 20};
  // Sessions (off when budget_bytes is 0).
  SessionOptions sessions;
  // The shared state tier (docs/sessions.md, "Shared tier"): not owned, outlives the scheduler;
  // null: sessions and prefixes live in this process only. It holds the sessions when sessions
  // are on (shared_tier_options.ttl is taken from sessions.ttl), and the prefix cache's snapshots
  // when the cache is on and share_prefixes is set (docs/sessions.md, "Shared prefixes").
  StateTier* shared_tier = nullptr;
  SessionTierOptions shared_tier_options;
  bool share_prefixes = false;
  PrefixTierOptions shared_prefix_options;
  // ModelFingerprint of the served weights: seeds the prefix-cache keys and marks exported states.
  uint64_t model_fingerprint = 0;
  // Called on the engine thread after every step that did work (metrics).
  std::function<void(const StepStats&)> on_step;
  // Called once, on the engine thread, when the backend fails for good (Model::backend_failed):
  // the server turns unhealthy. The requests of the failed pass have ended by then; every other
  // queued and running request ends (kError) right after the call.
  std::function<void(const absl::Status&)> on_failure;
};

// One generated token.
struct TokenOutput {
  int32_t token_id = 0;
  float logprob = 0.0f;                    // when SamplingParams::logprobs
  std::vector<TokenLogprob> top_logprobs;  // when top_logprobs > 0
};

// What one engine step produced for a request: tokens and the text they released (text can lag
// tokens: an open UTF-8 character or a possible stop string is held back).
// Prompt log-probabilities (EngineRequest::prompt_logprobs) arrive in their own deltas, one per
// model prefill chunk, in prompt order and before the first generated token.
struct StreamDelta {
  std::vector<TokenOutput> tokens;
  std::string text;
  // The next entries of the prompt's log-probabilities: the entry for position j has token_id =
  // prompt token j + 1, logprob = log P(prompt[j + 1] | prompt[0..j]) under the raw model
  // distribution, and top_logprobs the prompt_top_logprobs most likely tokens at position j
  // (most likely first, ties to the lower id).
  std::vector<TokenOutput> prompt_logprobs;
};

// Receives one request's events, on the engine thread: OnDelta zero or more times, then OnFinish
// exactly once (also when the request never ran: cancelled in the queue, deadline, shutdown).
class RequestObserver {
 public:
  virtual ~RequestObserver() = default;
  virtual void OnDelta(StreamDelta delta) = 0;
  virtual void OnFinish(FinalResult result) = 0;
  // True while the consumer holds so much output it has not delivered that the engine should
  // produce no more bulk output for it for now: a request with prompt_logprobs is then not
  // prefilled this step (its deadline and cancellation still apply). Called on the engine thread
  // before each prefill of such a request; must be cheap and must not block.
  virtual bool Backlogged() { return false; }
};

struct EngineRequest {
  std::string id;               // non-empty, unique among requests not yet finished
  std::vector<int32_t> prompt;  // token ids, non-empty
  SamplingParams sampling;
  StopConditions stops;
  absl::Time deadline = absl::InfiniteFuture();  // gRPC deadline or time limit, whichever first
  std::shared_ptr<RequestObserver> observer;     // required
  // Continue this session (SessionStore id; empty: none). The prompt holds only the new tokens;
  // the session's state holds everything before them. When the request completes (length or a
  // stop), the session keeps its final state; when it does not (cancelled, deadline, error), the
  // session stays as it was before the request.
  std::string session_id;
  // The authenticated identity making the request ("" without authentication): sessions are
  // visible to their owner only, and so are the prefixes it leaves in the prefix cache (unless
  // PrefixCacheOptions::shared_across_owners).
  std::string owner;
  // Separates prefix-cache entries (vLLM's cache_salt): the request finds only prefixes cached by
  // requests with the same salt (and owner). Empty: none. At most kMaxCacheSaltBytes.
  std::string prefix_cache_salt;
  // Prompt log-probabilities (StreamDelta::prompt_logprobs) of every prompt token after the
  // first, with the prompt_top_logprobs [0, kMaxTopLogprobs] most likely alternatives (> 0 needs
  // prompt_logprobs). Not with a session (its earlier tokens are not re-scored). Such a request
  // prefills its whole prompt: it takes no prefix-cache hit (it may still store snapshots).
  bool prompt_logprobs = false;
  int32_t prompt_top_logprobs = 0;
};

// What the engine thread is doing, for the progress watchdog (watchdog.h).
enum class EnginePhase : uint8_t {
  kIdle = 0,        // between steps: waiting for work or about to start a step
  kEndingRequests,  // step 1: cancellations and deadlines (request observers run here)
  kAdmitting,       // step 2: queued requests take free slots
  kDecoding,        // step 3: the batched decode step and its sampling / observers
  kPrefilling,      // step 4: a prefill chunk and its sampling / observers
  kStepCallback,    // SchedulerOptions::on_step (metrics)
};
absl::string_view EnginePhaseName(EnginePhase phase);  // "idle", "decoding", ...

// A snapshot of the engine thread's progress, read without locks.
struct EngineProgress {
  // Grows at every phase change of the engine thread (several times per step, and at least every
  // 10 ms while it idles): a value that stays the same while `phase` is not kIdle means the
  // engine thread is stuck in that phase.
  uint64_t sequence = 0;
  EnginePhase phase = EnginePhase::kIdle;
  int64_t running = 0;  // requests holding a slot
};

class Scheduler {
 public:
  // Takes the model and starts the engine thread. InvalidArgument for options out of range.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Scheduler>> Create(
      std::unique_ptr<Model> model, SchedulerOptions options);
  // Ends every request still queued or running with kCancelled, then joins the engine thread.
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Validates and queues a request; its events then go to request.observer. Errors (nothing is
  // queued, the observer is never called): InvalidArgument naming the field (empty id or
  // prompt, token ids outside the vocabulary, sampling or stop values, prompt_top_logprobs out of
  // range or without prompt_logprobs, prompt_logprobs with a session, no observer,
  // prefix_cache_salt longer than kMaxCacheSaltBytes);
  // OutOfRange when the prompt does not fit the context limit (generation that reaches the limit
  // ends there with kLength); AlreadyExists for an id in use;
  // ResourceExhausted when the queue is full (by count or by prompt tokens); Unavailable while
  // draining or shutting down, and once the engine failed (failure()).
  [[nodiscard]] absl::Status Submit(EngineRequest request);

  // Ends request `id` (queued or running) within one engine step, with `reason`: kCancelled, or
  // kDeadline when the caller knows the request's deadline is why (a client whose own deadline
  // fired cancels a little before the server's copy of it). NotFound when no unfinished request
  // has that id; InvalidArgument for another reason.
  [[nodiscard]] absl::Status Cancel(absl::string_view id,
                                    FinishReason reason = FinishReason::kCancelled);

  // Sessions (see EngineRequest::session_id). Errors as SessionStore documents.
  [[nodiscard]] absl::StatusOr<std::string> OpenSession(absl::string_view owner);
  [[nodiscard]] absl::Status CloseSession(absl::string_view id, absl::string_view owner);
  // An exported session (or the session an import made): its id, the state in the
  // state_codec.h format, and the tokens of the conversation it holds.
  struct SessionState {
    std::string id;
    std::string bytes;   // ExportSession only
    int64_t tokens = 0;  // SequenceState::length()
  };
  [[nodiscard]] absl::StatusOr<SessionState> ExportSession(absl::string_view id,
                                                           absl::string_view owner);
  // A new session holding an exported state (DecodeState errors: a state of another model is
  // FailedPrecondition, a damaged one DataLoss).
  [[nodiscard]] absl::StatusOr<SessionState> ImportSession(absl::string_view bytes,
                                                           absl::string_view owner);
  const ModelIdentity& identity() const { return identity_; }
  const SchedulerOptions& options() const { return options_; }
  const SessionStore& sessions() const { return sessions_; }
  // Waits until every session write to the shared tier is done, then every prefix snapshot
  // write, or `deadline` (the end of a drain: held sessions reach the tier before the process
  // exits). OK at once without a tier; DeadlineExceeded naming how many writes are left.
  [[nodiscard]] absl::Status FlushSessions(absl::Time deadline);
  int64_t prefix_cache_granularity() const { return prefix_cache_.granularity(); }

  // OK, or the backend failure that stopped the engine for good. A forward whose backend fails
  // ends the requests of that forward with kError and the failure (Internal); a failure that
  // is sticky (Model::backend_failed) also calls SchedulerOptions::on_failure, ends every other
  // queued and running request the same way, and from then on Submit answers Unavailable.
  absl::Status failure() const;

  // Refuses new requests from now on (Unavailable); queued and running ones continue.
  void StartDrain();
  // Ends every queued and running request with kCancelled within one engine step (the end of a
  // drain), each through its observer as usual. Returns how many it asked to end.
  int64_t CancelAll();
  // True when nothing is queued or running.
  bool Idle() const;

  SchedulerStats Stats() const;
  // Lock-free (two atomic loads), so a monitor thread can read it even when the engine thread is
  // stuck holding the scheduler's mutex.
  EngineProgress Progress() const;
  const ModelConfig& config() const { return model_->config(); }
  const Model& model() const { return *model_; }

 private:
  struct Active;

  struct Queued;

  Scheduler(std::unique_ptr<Model> model, SchedulerOptions options);
  void EngineLoop();
  // One step; returns false when there was nothing to do.
  bool Step();
  void Admit(absl::Time now);
  void RunDecode(StepStats& stats);
  void RunPrefill(StepStats& stats);
  // Samples from `logits`, emits the token and text, and finishes the request when a stop
  // rule, the token limit or the context limit says so.
  void HandleLogits(Active& active, absl::Span<const float> logits);
  // Scores feed tokens [first + 1, first + rows] from the logits [rows, V] of feed positions
  // [first, first + rows) and sends them as one delta (nothing for the last feed position).
  // Internal for a broken logit (NaN, +inf).
  absl::Status EmitPromptLogprobs(Active& active, int64_t first, int64_t rows,
                                  absl::Span<const float> logits);
  void Finish(Active& active, FinishReason reason, absl::Status error = absl::OkStatus());
  void FinishQueued(Queued& queued, FinishReason reason, absl::Status error = absl::OkStatus());
  // The backend failed for good: see failure().
  void FailEngine(const absl::Status& error);
  // Restores the request's starting state into its slot (session or cached prefix) and plans
  // the prefix-cache snapshots of its prefill.
  absl::Status PrepareState(Active& active);
  // After a prefill pass: stores a snapshot if the prefill just reached a planned position.
  void MaybeSnapshot(Active& active);
  // On the submitting thread: the longest prefix of a request without a session that the shared
  // tier holds beyond what the prefix cache here holds (nothing without a prefix tier).
  PrefixTier::Found LookupSharedPrefix(const EngineRequest& request) const;
  // Publishes the engine thread's phase for Progress(): one relaxed atomic store, no lock.
  void EnterPhase(EnginePhase phase);

  std::unique_ptr<Model> model_;
  const SchedulerOptions options_;

  // Shared with other threads, guarded by mu_.
  mutable std::mutex mu_;
  std::condition_variable work_;
  struct Queued {
    EngineRequest request;
    absl::Time submitted;
    std::optional<SequenceState> session;  // taken from the store when request.session_id is set
    PrefixTier::Found shared_prefix;       // read from the shared tier at Submit (no session)
    int64_t tokens = 0;                    // to prefill: pending tokens of the session + prompt
  };
  std::deque<Queued> queue_;
  absl::flat_hash_set<std::string> ids_;  // unfinished requests
  // Ids to end at the next step, with the reason to end them with.
  absl::flat_hash_map<std::string, FinishReason> cancelled_;
  int64_t queued_tokens_ = 0;
  bool draining_ = false;
  bool stopping_ = false;
  absl::Status failure_;  // failure()

  // Gauges for Stats(), written by the engine thread. running_ (== slots in use) changes when a
  // slot is taken or returned, before the observer hears of it.
  std::atomic<int64_t> running_{0};
  std::atomic<int64_t> steps_{0};
  // (sequence << 8) | phase: one word, so a reader sees a matching pair. Written by the engine
  // thread only (EnterPhase).
  std::atomic<uint64_t> progress_{0};
  uint64_t progress_sequence_ = 0;  // engine thread only

  ModelIdentity identity_;
  SessionStore sessions_;  // thread-safe
  // The sessions' shared tier (null without one): after identity_, which its writer reads, and
  // destroyed before it.
  std::unique_ptr<SessionTier> session_tier_;
  // The prefix cache's shared tier (null without one); as session_tier_.
  std::unique_ptr<PrefixTier> prefix_tier_;

  // Engine thread only.
  PrefixCache prefix_cache_;
  absl::Time last_expiry_ = absl::InfinitePast();
  std::vector<std::unique_ptr<Active>> active_;
  std::vector<float> logits_;
  std::vector<DecodeItem> decode_items_;  // RunDecode's batch, reused across steps
  std::vector<Active*> decode_batch_;
  std::vector<int32_t> top_scratch_;  // TopLogprobs of prompt log-probabilities

  std::thread engine_;  // last: started when everything else is ready
};

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_SERVING_SCHEDULER_H_
