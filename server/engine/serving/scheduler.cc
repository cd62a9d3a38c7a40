#include "server/engine/serving/scheduler.h"

#include <algorithm>
#include <utility>

#include <absl/strings/str_cat.h>

#include "base/status_macros.h"
#include "server/engine/model_io/tokenizer.h"

namespace ps::engine {

absl::string_view EnginePhaseName(EnginePhase phase) {
  switch (phase) {
    case EnginePhase::kIdle:
      return "idle";
    case EnginePhase::kEndingRequests:
      return "ending cancelled and expired requests";
    case EnginePhase::kAdmitting:
      return "admitting queued requests";
    case EnginePhase::kDecoding:
      return "decoding";
    case EnginePhase::kPrefilling:
      return "prefilling";
    case EnginePhase::kStepCallback:
      return "step callback (metrics)";
  }
  return "unknown";
}

// A request holding a slot. Engine thread only.
struct Scheduler::Active {
  EngineRequest request;
  SlotId slot;
  Sampler sampler;
  StopChecker stop_checker;
  IncrementalDetokenizer detokenizer;
  // The tokens to prefill (feed()): the prompt, or for a session with pending tokens, those
  // first and then the prompt (session_feed; empty otherwise, so a prompt is never copied).
  // feed()[i] goes to
  // position base + i; base is the session's position (0 without one).
  std::vector<int32_t> session_feed;
  int64_t base = 0;
  std::optional<SequenceState> session;  // the session's state before this request
  PrefixTier::Found shared_prefix;       // from the shared tier (Submit), until PrepareState
  int64_t prefilled = 0;    // feed tokens in the state so far (or restored from the cache)
  int64_t cached = 0;       // tokens this request did not prefill (cache hit or session)
  int32_t next_token = -1;  // sampled, not yet fed to the model (decode phase)
  int32_t last_token = -1;  // the last token sampled
  int64_t generated = 0;
  bool finished = false;
  // Prefix cache: keys of the feed's whole blocks, and the feed positions to snapshot at
  // (ascending).
  std::vector<uint64_t> prefix_hashes;
  PrefixCache::Scope prefix_scope;  // the owner's (unless shared) and the salt's
  std::deque<int64_t> snapshot_at;
  absl::Time submitted, admitted, prefill_done, first_token;

  Active(EngineRequest r, SlotId s, Sampler sam, StopChecker stop)
      : request(std::move(r)), slot(s), sampler(std::move(sam)), stop_checker(std::move(stop)) {}
  bool decoding() const { return next_token >= 0; }
  absl::Span<const int32_t> feed() const {
    return session_feed.empty() ? absl::MakeConstSpan(request.prompt)
                                : absl::MakeConstSpan(session_feed);
  }
  int64_t feed_size() const { return static_cast<int64_t>(feed().size()); }
};

namespace {

constexpr absl::string_view kPromptLogprobsWithSession =
    "prompt_logprobs: not available with session_id: a session turn's earlier tokens are not "
    "re-scored (send the whole text without a session to score it)";

// The prefix-cache granularity when the options leave it to the model: the block size of the
// first local_exact polysketch layer (snapshots then fall on block boundaries, where the local
// buffer is full and about to be folded into S), else 64 tokens.
PrefixCacheOptions ResolvePrefixCache(PrefixCacheOptions options, const ModelConfig& config) {
  if (options.granularity == 0) {
    options.granularity = 64;
    for (const AttentionConfig& layer : config.layers) {
      if (layer.kind == AttentionKind::kPolysketch && layer.local_exact) {
        options.granularity = layer.block_size;
        break;
      }
    }
  }
  return options;
}

// What one session reserves: the state and its bookkeeping.
int64_t SessionBytes(const Model& model) {
  return model.layout().bytes_per_slot() + kMaxPendingTokens * 4 + 256;
}

}  // namespace

Scheduler::Scheduler(std::unique_ptr<Model> model, SchedulerOptions options)
    : model_(std::move(model)),
      options_(std::move(options)),
      identity_{options_.model_fingerprint, &model_->config(), &model_->layout(),
                model_->max_context()},
      sessions_(options_.sessions, SessionBytes(*model_)),
      prefix_cache_(ResolvePrefixCache(options_.prefix_cache, model_->config()),
                    options_.model_fingerprint) {
  if (options_.shared_tier != nullptr && sessions_.enabled()) {
    SessionTierOptions tier_options = options_.shared_tier_options;
    tier_options.ttl = options_.sessions.ttl;
    session_tier_ =
        std::make_unique<SessionTier>(options_.shared_tier, &identity_, std::move(tier_options));
    sessions_.SetTier(session_tier_.get());
  }
  if (options_.shared_tier != nullptr && options_.share_prefixes && prefix_cache_.enabled()) {
    prefix_tier_ = std::make_unique<PrefixTier>(options_.shared_tier, &identity_,
                                                options_.shared_prefix_options);
  }
  logits_.resize(static_cast<size_t>(model_->options().max_batch * model_->config().vocab_size));
  engine_ = std::thread([this] { EngineLoop(); });
}

absl::StatusOr<std::unique_ptr<Scheduler>> Scheduler::Create(std::unique_ptr<Model> model,
                                                             SchedulerOptions options) {
  if (model == nullptr) return absl::InvalidArgumentError("scheduler: no model");
  if (options.max_waiting < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_waiting: must be >= 0, got ", options.max_waiting));
  }
  if (options.max_waiting_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_waiting_tokens: must be >= 1, got ", options.max_waiting_tokens));
  }
  if (options.prefill_tokens_per_step < 1) {
    return absl::InvalidArgumentError(absl::StrCat("prefill_tokens_per_step: must be >= 1, got ",
                                                   options.prefill_tokens_per_step));
  }
  if (options.prefix_cache.budget_bytes < 0 || options.prefix_cache.granularity < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("prefix_cache: budget_bytes and granularity must be >= 0, got ",
                     options.prefix_cache.budget_bytes, " and ", options.prefix_cache.granularity));
  }
  if (options.shared_tier != nullptr &&
      (options.shared_tier_options.replica.empty() ||
       options.shared_tier_options.lease <= absl::ZeroDuration() ||
       options.shared_tier_options.lease_wait < absl::ZeroDuration() ||
       options.shared_tier_options.max_queued_bytes < 0 ||
       options.shared_prefix_options.ttl <= absl::ZeroDuration() ||
       options.shared_prefix_options.max_queued_bytes < 0)) {
    return absl::InvalidArgumentError(
        "shared tier: replica must be named, lease > 0, lease_wait >= 0, max_queued_bytes >= 0, "
        "prefix ttl > 0");
  }
  if (options.sessions.budget_bytes < 0 || options.sessions.ttl <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sessions: budget_bytes must be >= 0 and ttl > 0, got ", options.sessions.budget_bytes,
        " and ", absl::FormatDuration(options.sessions.ttl)));
  }
  return std::unique_ptr<Scheduler>(new Scheduler(std::move(model), std::move(options)));
}

Scheduler::~Scheduler() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  work_.notify_all();
  engine_.join();
}

absl::Status Scheduler::Submit(EngineRequest request) {
  const ModelConfig& cfg = model_->config();
  if (request.id.empty()) return absl::InvalidArgumentError("request id: must not be empty");
  if (request.observer == nullptr) return absl::InvalidArgumentError("request: no observer");
  if (request.prompt.empty()) return absl::InvalidArgumentError("prompt: must not be empty");
  for (size_t i = 0; i < request.prompt.size(); ++i) {
    if (request.prompt[i] < 0 || request.prompt[i] >= cfg.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("prompt token ids[", i,
                                                     "]: ", request.prompt[i], " is not in [0, ",
                                                     cfg.vocab_size, ")"));
    }
  }
  const int64_t n = static_cast<int64_t>(request.prompt.size());
  if (n > model_->max_context()) {
    return absl::OutOfRangeError(
        absl::StrCat("prompt: ", n, " tokens exceed the context limit ", model_->max_context()));
  }
  PS_RETURN_IF_ERROR(request.sampling.Validate(cfg.vocab_size));
  PS_RETURN_IF_ERROR(request.stops.Validate(cfg.vocab_size));
  if (request.prompt_top_logprobs < 0 || request.prompt_top_logprobs > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(absl::StrCat("prompt_top_logprobs: must be in [0, ",
                                                   kMaxTopLogprobs, "], got ",
                                                   request.prompt_top_logprobs));
  }
  if (request.prompt_top_logprobs > 0 && !request.prompt_logprobs) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt_top_logprobs: must be 0 unless prompt_logprobs is set, got ",
                     request.prompt_top_logprobs));
  }
  if (request.prompt_logprobs && !request.session_id.empty()) {
    return absl::InvalidArgumentError(kPromptLogprobsWithSession);
  }
  if (request.prefix_cache_salt.size() > kMaxCacheSaltBytes) {
    return absl::InvalidArgumentError(absl::StrCat("cache_salt: must be at most ",
                                                   kMaxCacheSaltBytes, " bytes, got ",
                                                   request.prefix_cache_salt.size()));
  }
  const absl::Time now = absl::Now();
  Queued queued;
  queued.submitted = now;
  queued.tokens = n;
  if (!request.session_id.empty()) {
    PS_ASSIGN_OR_RETURN(SequenceState state,
                        sessions_.Take(request.session_id, request.owner, now));
    if (state.length() + n > model_->max_context()) {
      const int64_t held = state.length();
      sessions_.Return(request.session_id, request.owner, std::move(state), now);
      return absl::OutOfRangeError(absl::StrCat("prompt: ", n, " tokens after the session's ", held,
                                                " exceed the context limit ",
                                                model_->max_context()));
    }
    queued.tokens += static_cast<int64_t>(state.pending.size());
    queued.session = std::move(state);
  } else {
    queued.shared_prefix = LookupSharedPrefix(request);
  }
  absl::Status refused;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!failure_.ok()) {
      refused = absl::UnavailableError(
          absl::StrCat("the engine failed and serves no more requests (restart the server): ",
                       failure_.message()));
    } else if (draining_ || stopping_) {
      refused = absl::UnavailableError("the server is draining: no new requests");
    } else if (ids_.contains(request.id)) {
      refused = absl::AlreadyExistsError(
          absl::StrCat("request id \"", request.id, "\" is already in use"));
    } else if (static_cast<int64_t>(queue_.size()) >= options_.max_waiting ||
               queued_tokens_ + queued.tokens > options_.max_waiting_tokens) {
      refused = absl::ResourceExhaustedError(
          absl::StrCat("the queue is full (", queue_.size(), " requests, ", queued_tokens_,
                       " prompt tokens waiting; limits ", options_.max_waiting, " and ",
                       options_.max_waiting_tokens, ")"));
    } else {
      ids_.insert(request.id);
      queued_tokens_ += queued.tokens;
      queued.request = std::move(request);
      queue_.push_back(std::move(queued));
    }
  }
  if (!refused.ok()) {
    // `request` and `queued` were moved from only when the request was accepted (refused OK).
    // NOLINTBEGIN(bugprone-use-after-move)
    if (queued.session.has_value()) {
      sessions_.Return(request.session_id, request.owner, *std::move(queued.session), now);
    }
    // NOLINTEND(bugprone-use-after-move)
    return refused;
  }
  work_.notify_one();
  return absl::OkStatus();
}

absl::Status Scheduler::Cancel(absl::string_view id, FinishReason reason) {
  if (reason != FinishReason::kCancelled && reason != FinishReason::kDeadline) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cancel reason: must be cancelled or deadline, got ", FinishReasonName(reason)));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!ids_.contains(id)) {
      return absl::NotFoundError(absl::StrCat("no unfinished request has id \"", id, "\""));
    }
    cancelled_.insert_or_assign(std::string(id), reason);
  }
  work_.notify_one();
  return absl::OkStatus();
}

absl::StatusOr<std::string> Scheduler::OpenSession(absl::string_view owner) {
  return sessions_.Open(owner, absl::Now());
}

absl::Status Scheduler::CloseSession(absl::string_view id, absl::string_view owner) {
  return sessions_.Close(id, owner);
}

absl::Status Scheduler::FlushSessions(absl::Time deadline) {
  if (session_tier_ != nullptr) PS_RETURN_IF_ERROR(session_tier_->Flush(deadline));
  if (prefix_tier_ != nullptr) PS_RETURN_IF_ERROR(prefix_tier_->Flush(deadline));
  return absl::OkStatus();
}

absl::StatusOr<Scheduler::SessionState> Scheduler::ExportSession(absl::string_view id,
                                                                 absl::string_view owner) {
  PS_ASSIGN_OR_RETURN(SequenceState state, sessions_.Copy(id, owner, absl::Now()));
  return SessionState{std::string(id), EncodeState(state, identity_), state.length()};
}

absl::StatusOr<Scheduler::SessionState> Scheduler::ImportSession(absl::string_view bytes,
                                                                 absl::string_view owner) {
  PS_ASSIGN_OR_RETURN(SequenceState state, DecodeState(bytes, identity_));
  const int64_t tokens = state.length();
  PS_ASSIGN_OR_RETURN(std::string id, sessions_.Import(owner, std::move(state), absl::Now()));
  return SessionState{std::move(id), "", tokens};
}

int64_t Scheduler::CancelAll() {
  int64_t n = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const std::string& id : ids_) {
      if (cancelled_.try_emplace(id, FinishReason::kCancelled).second) ++n;
    }
  }
  work_.notify_one();
  return n;
}

void Scheduler::StartDrain() {
  std::lock_guard<std::mutex> lock(mu_);
  draining_ = true;
}

absl::Status Scheduler::failure() const {
  std::lock_guard<std::mutex> lock(mu_);
  return failure_;
}

void Scheduler::FailEngine(const absl::Status& error) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!failure_.ok()) return;
    failure_ = error;
  }
  // Unhealthy first, so that whoever hears of a request ending this way (the queued ones below)
  // already finds the server NOT_SERVING.
  if (options_.on_failure) options_.on_failure(error);
  // Every state slot is suspect: end everything, queued requests too (they would never run).
  std::deque<Queued> queue;
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue.swap(queue_);
    queued_tokens_ = 0;
  }
  for (Queued& q : queue) FinishQueued(q, FinishReason::kError, error);
  for (auto& active : active_) {
    if (!active->finished) Finish(*active, FinishReason::kError, error);
  }
}

bool Scheduler::Idle() const {
  std::lock_guard<std::mutex> lock(mu_);
  return ids_.empty();
}

SchedulerStats Scheduler::Stats() const {
  SchedulerStats stats;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats.waiting = static_cast<int64_t>(queue_.size());
    stats.waiting_tokens = queued_tokens_;
    stats.draining = draining_;
    stats.failed = !failure_.ok();
  }
  stats.running = running_.load();
  stats.slots_total = model_->pool().num_slots();
  stats.slots_used = stats.running;
  stats.steps = steps_.load();
  stats.prefix_cache = prefix_cache_.stats();
  stats.sessions = sessions_.stats();
  if (session_tier_ != nullptr) {
    stats.shared_tier = true;
    stats.tier = session_tier_->stats();
  }
  if (prefix_tier_ != nullptr) {
    stats.shared_prefixes = true;
    stats.prefix_tier = prefix_tier_->stats();
  }
  return stats;
}

EngineProgress Scheduler::Progress() const {
  const uint64_t word = progress_.load(std::memory_order_relaxed);
  EngineProgress progress;
  progress.sequence = word >> 8;
  progress.phase = static_cast<EnginePhase>(word & 0xff);
  progress.running = running_.load(std::memory_order_relaxed);
  return progress;
}

void Scheduler::EnterPhase(EnginePhase phase) {
  ++progress_sequence_;
  progress_.store((progress_sequence_ << 8) | static_cast<uint64_t>(phase),
                  std::memory_order_relaxed);
}

void Scheduler::EngineLoop() {
  bool worked = true;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      // Sleep while there is nothing to do; wake at least every 10 ms to honour deadlines of
      // queued requests. A step that found running requests but nothing to do (each waits for
      // its client: RequestObserver::Backlogged) is followed by a 1 ms nap, not a spin.
      if (!stopping_ && queue_.empty() && active_.empty() && cancelled_.empty()) {
        work_.wait_for(lock, std::chrono::milliseconds(10));
      } else if (!stopping_ && !worked) {
        work_.wait_for(lock, std::chrono::milliseconds(1));
      }
      if (stopping_) break;
    }
    worked = Step();
    EnterPhase(EnginePhase::kIdle);
  }
  // Shutdown: everything still queued or running ends as cancelled.
  std::deque<Queued> queue;
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue.swap(queue_);
  }
  for (Queued& q : queue) FinishQueued(q, FinishReason::kCancelled);
  for (auto& active : active_) {
    if (!active->finished) Finish(*active, FinishReason::kCancelled);
  }
  active_.clear();
}

void Scheduler::FinishQueued(Queued& queued, FinishReason reason, absl::Status error) {
  EngineRequest& request = queued.request;
  FinalResult result;
  result.reason = reason;
  result.error = std::move(error);
  result.prompt_tokens = static_cast<int64_t>(request.prompt.size());
  result.seed = request.sampling.seed;
  result.timings.queue = result.timings.total = absl::Now() - queued.submitted;
  // The request never ran: its session is as it was.
  if (queued.session.has_value()) {
    sessions_.Return(request.session_id, request.owner, *std::move(queued.session), absl::Now());
  }
  {
    // The id is free again once the observer hears of the end.
    std::lock_guard<std::mutex> lock(mu_);
    ids_.erase(request.id);
    cancelled_.erase(request.id);
  }
  request.observer->OnFinish(std::move(result));
}

void Scheduler::Finish(Active& active, FinishReason reason, absl::Status error) {
  if (active.finished) return;
  active.finished = true;
  const absl::Time now = absl::Now();
  FinalResult result;
  result.reason = reason;
  result.error = std::move(error);
  result.prompt_tokens = static_cast<int64_t>(active.request.prompt.size());
  result.cached_tokens = active.cached;
  result.generated_tokens = active.generated;
  result.seed = active.request.sampling.seed;
  result.timings.queue = active.admitted - active.submitted;
  result.timings.prefill =
      (active.prefill_done == absl::InfinitePast() ? now : active.prefill_done) - active.admitted;
  result.timings.first_token = active.first_token == absl::InfinitePast()
                                   ? absl::ZeroDuration()
                                   : active.first_token - active.submitted;
  result.timings.total = now - active.submitted;
  if (active.session.has_value()) {
    // A completed turn leaves its state in the session: the state holds every token but the
    // last one sampled, which stays pending (fed first by the next request) unless the context
    // is full. A turn that did not complete leaves the session as it was.
    bool completed = reason == FinishReason::kLength || reason == FinishReason::kStopString ||
                     reason == FinishReason::kStopToken;
    if (completed) {
      SequenceState& state = *active.session;
      const absl::Status saved = model_->SaveSlot(active.slot, &state.snapshot);
      if (saved.ok()) {
        state.pending.clear();
        // Nothing sampled (max_new_tokens 0): the state holds every token, nothing is pending.
        if (active.last_token >= 0 && state.snapshot.position < model_->max_context()) {
          state.pending.push_back(active.last_token);
        }
      } else {
        completed = false;
        if (result.error.ok()) result.error = saved;
      }
    }
    sessions_.Return(active.request.session_id, active.request.owner, *std::move(active.session),
                     now, completed);
    active.session.reset();
  }
  // The slot goes back in the same step (architecture.md step 5).
  const absl::Status released = model_->ReleaseSlot(active.slot);
  if (!released.ok() && result.error.ok()) result.error = released;
  running_.fetch_sub(1);
  {
    std::lock_guard<std::mutex> lock(mu_);
    ids_.erase(active.request.id);
    cancelled_.erase(active.request.id);
  }
  active.request.observer->OnFinish(std::move(result));
}

bool Scheduler::Step() {
  const absl::Time start = absl::Now();
  // 1. Cancellations and deadlines, queued and running.
  EnterPhase(EnginePhase::kEndingRequests);
  absl::flat_hash_map<std::string, FinishReason> cancelled;
  std::vector<Queued> ended;
  std::vector<FinishReason> ended_reasons;
  {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled.swap(cancelled_);
    for (auto it = queue_.begin(); it != queue_.end();) {
      const auto cancel = cancelled.find(it->request.id);
      if (cancel != cancelled.end() || it->request.deadline <= start) {
        queued_tokens_ -= it->tokens;
        ended_reasons.push_back(cancel != cancelled.end() ? cancel->second
                                                          : FinishReason::kDeadline);
        ended.push_back(std::move(*it));
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (size_t i = 0; i < ended.size(); ++i) FinishQueued(ended[i], ended_reasons[i]);
  if (sessions_.enabled() && start - last_expiry_ > absl::Seconds(1)) {
    sessions_.ExpireIdle(start);
    last_expiry_ = start;
  }
  int64_t ended_running = 0;
  for (auto& active : active_) {
    if (const auto cancel = cancelled.find(active->request.id); cancel != cancelled.end()) {
      Finish(*active, cancel->second);
      ++ended_running;
    } else if (active->request.deadline <= start) {
      Finish(*active, FinishReason::kDeadline);
      ++ended_running;
    }
  }
  // 2. Admission.
  EnterPhase(EnginePhase::kAdmitting);
  Admit(start);
  // 3 and 4. Decode, then prefill.
  StepStats stats;
  EnterPhase(EnginePhase::kDecoding);
  RunDecode(stats);
  EnterPhase(EnginePhase::kPrefilling);
  RunPrefill(stats);
  std::erase_if(active_, [](const std::unique_ptr<Active>& a) { return a->finished; });
  // Ending a request is work too: the step callback refreshes the gauges (slots used) with it.
  const bool worked =
      !ended.empty() || ended_running > 0 || stats.decode_batch > 0 || stats.prefill_tokens > 0;
  if (worked) {
    steps_.fetch_add(1);
    stats.step_time = absl::Now() - start;
    EnterPhase(EnginePhase::kStepCallback);
    if (options_.on_step) options_.on_step(stats);
  }
  return worked;
}

void Scheduler::Admit(absl::Time now) {
  while (model_->pool().num_free() > 0) {
    Queued q;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (queue_.empty()) return;
      q = std::move(queue_.front());
      queue_.pop_front();
      queued_tokens_ -= q.tokens;
    }
    // Submit validated both, so these only fail on an internal error.
    absl::StatusOr<Sampler> sampler =
        Sampler::Create(q.request.sampling, model_->config().vocab_size, q.request.prompt);
    absl::StatusOr<StopChecker> stops =
        StopChecker::Create(q.request.stops, model_->config().vocab_size);
    absl::StatusOr<SlotId> slot = model_->AcquireSlot();
    if (!sampler.ok() || !stops.ok() || !slot.ok()) {
      FinishQueued(q, FinishReason::kError);
      if (slot.ok()) (void)model_->ReleaseSlot(*slot);
      continue;
    }
    auto active = std::make_unique<Active>(std::move(q.request), *slot, *std::move(sampler),
                                           *std::move(stops));
    active->session = std::move(q.session);
    active->shared_prefix = std::move(q.shared_prefix);
    active->submitted = q.submitted;
    active->admitted = now;
    active->prefill_done = absl::InfinitePast();
    active->first_token = absl::InfinitePast();
    running_.fetch_add(1);
    if (absl::Status status = PrepareState(*active); !status.ok()) {
      // Unhealthy before the request's error reaches its client (see FailEngine).
      const bool failed = model_->backend_failed();
      if (failed) FailEngine(status);
      Finish(*active, FinishReason::kError, status);
      if (failed) return;
      continue;
    }
    active_.push_back(std::move(active));
  }
}

absl::Status Scheduler::PrepareState(Active& active) {
  const std::vector<int32_t>& prompt = active.request.prompt;
  if (active.session.has_value()) {
    const SequenceState& state = *active.session;
    PS_RETURN_IF_ERROR(model_->RestoreSlot(active.slot, state.snapshot));
    active.base = state.snapshot.position;
    active.cached = state.snapshot.position;
    if (!state.pending.empty()) {
      active.session_feed.reserve(state.pending.size() + prompt.size());
      active.session_feed.assign(state.pending.begin(), state.pending.end());
      active.session_feed.insert(active.session_feed.end(), prompt.begin(), prompt.end());
    }
    return absl::OkStatus();
  }
  if (!prefix_cache_.enabled()) return absl::OkStatus();
  // At least the last prompt token is prefilled: its logits give the first generated token.
  const int64_t n = active.feed_size();
  const int64_t g = prefix_cache_.granularity();
  active.prefix_scope =
      prefix_cache_.MakeScope(active.request.owner, active.request.prefix_cache_salt);
  active.prefix_hashes = prefix_cache_.Hashes(active.feed(), active.prefix_scope);
  // Prompt log-probabilities need the logits of every prompt token: no hit may skip any.
  const PrefixCache::Hit hit =
      active.request.prompt_logprobs
          ? PrefixCache::Hit{}
          : prefix_cache_.Lookup(active.feed(), active.prefix_hashes, n - 1, active.prefix_scope);
  // The shared tier's prefix (read at Submit) when it is longer than what the cache here has
  // now; it goes into the cache here too, for the next requests of this scope.
  const PrefixTier::Found from_tier = std::move(active.shared_prefix);
  active.shared_prefix = {};
  if (from_tier.state != nullptr && from_tier.length > hit.length && from_tier.length <= n - 1) {
    PS_RETURN_IF_ERROR(model_->RestoreSlot(active.slot, *from_tier.state));
    active.prefilled = from_tier.length;
    active.cached = from_tier.length;
    prefix_cache_.Insert(active.feed().subspan(0, static_cast<size_t>(from_tier.length)),
                         active.prefix_hashes[static_cast<size_t>(from_tier.length / g - 1)],
                         *from_tier.state, active.prefix_scope);
  } else if (hit.state != nullptr) {
    PS_RETURN_IF_ERROR(model_->RestoreSlot(active.slot, *hit.state));
    active.prefilled = hit.length;
    active.cached = hit.length;
  }
  // Snapshots worth taking: where this prompt stops sharing an earlier one, and its last block
  // boundary (the next turn of a conversation resent in full starts there).
  const int64_t shared = prefix_cache_.Remember(active.prefix_hashes, n - 1);
  for (const int64_t at : {shared, (n - 1) / g * g}) {
    if (at > active.prefilled &&
        !prefix_cache_.Contains(active.prefix_hashes[static_cast<size_t>(at / g - 1)]) &&
        (active.snapshot_at.empty() || active.snapshot_at.back() < at)) {
      active.snapshot_at.push_back(at);
    }
  }
  return absl::OkStatus();
}

void Scheduler::MaybeSnapshot(Active& active) {
  if (active.snapshot_at.empty() || active.prefilled != active.snapshot_at.front()) return;
  const int64_t at = active.snapshot_at.front();
  active.snapshot_at.pop_front();
  StateSnapshot snapshot;
  if (!model_->SaveSlot(active.slot, &snapshot).ok()) return;  // the slot is ours: cannot fail
  const int64_t g = prefix_cache_.granularity();
  const absl::Span<const int32_t> prefix = active.feed().subspan(0, static_cast<size_t>(at));
  const uint64_t hash = active.prefix_hashes[static_cast<size_t>(at / g - 1)];
  if (prefix_tier_ != nullptr && !prefix_cache_.Contains(hash)) {
    // A copy for the shared tier, written behind (the engine thread neither encodes nor waits).
    prefix_tier_->Publish(hash, active.prefix_scope.key,
                          std::vector<int32_t>(prefix.begin(), prefix.end()), snapshot);
  }
  prefix_cache_.Insert(prefix, hash, std::move(snapshot), active.prefix_scope);
}

PrefixTier::Found Scheduler::LookupSharedPrefix(const EngineRequest& request) const {
  if (prefix_tier_ == nullptr || request.prompt_logprobs) return {};
  const int64_t n = static_cast<int64_t>(request.prompt.size());
  const int64_t g = prefix_cache_.granularity();
  // Whole blocks only, and at least the last prompt token is prefilled (PrepareState).
  const int64_t max_blocks = (n - 1) / g;
  if (max_blocks < 1) return {};
  const PrefixCache::Scope scope =
      prefix_cache_.MakeScope(request.owner, request.prefix_cache_salt);
  const std::vector<uint64_t> hashes = prefix_cache_.Hashes(request.prompt, scope);
  // Only prefixes longer than the longest one cached here (it may be evicted before the request
  // runs: then the request prefills more, no harm done).
  int64_t local_blocks = max_blocks;
  while (local_blocks > 0 && !prefix_cache_.Holds(hashes[static_cast<size_t>(local_blocks - 1)])) {
    --local_blocks;
  }
  return prefix_tier_->Lookup(request.prompt, hashes, g, local_blocks, max_blocks, scope.key);
}

void Scheduler::RunDecode(StepStats& stats) {
  std::vector<DecodeItem>& items = decode_items_;
  std::vector<Active*>& batch = decode_batch_;
  items.clear();
  batch.clear();
  for (auto& active : active_) {
    if (active->finished || !active->decoding()) continue;
    if (static_cast<int64_t>(items.size()) == model_->options().max_batch) break;
    items.push_back({active->slot, model_->SlotPosition(active->slot), active->next_token});
    batch.push_back(active.get());
  }
  if (items.empty()) return;
  const absl::Time start = absl::Now();
  const int64_t V = model_->config().vocab_size;
  const absl::Span<float> logits = absl::MakeSpan(logits_).subspan(0, items.size() * V);
  const absl::Status status = model_->Decode(items, logits);
  // Unhealthy before the requests' errors reach their clients (see FailEngine).
  if (!status.ok() && model_->backend_failed()) FailEngine(status);
  for (size_t i = 0; i < batch.size(); ++i) {
    if (!status.ok()) {
      Finish(*batch[i], FinishReason::kError, status);
      continue;
    }
    HandleLogits(*batch[i], logits.subspan(i * V, V));
  }
  stats.decode_batch = static_cast<int64_t>(items.size());
  stats.decode_time = absl::Now() - start;
}

void Scheduler::RunPrefill(StepStats& stats) {
  int64_t budget = options_.prefill_tokens_per_step;
  const absl::Time start = absl::Now();
  const int64_t V = model_->config().vocab_size;
  for (auto& active : active_) {
    if (budget == 0) break;
    if (active->finished || active->decoding()) continue;
    // Its client has not read the prompt log-probabilities sent so far: wait for it.
    if (active->request.prompt_logprobs && active->request.observer->Backlogged()) continue;
    int64_t n = std::min(budget, active->feed_size() - active->prefilled);
    // Stop at a planned snapshot position.
    if (!active->snapshot_at.empty()) {
      n = std::min(n, active->snapshot_at.front() - active->prefilled);
    }
    const bool last = active->prefilled + n == active->feed_size();
    const absl::Span<const int32_t> tokens =
        active->feed().subspan(static_cast<size_t>(active->prefilled), static_cast<size_t>(n));
    // max_new_tokens 0 samples nothing: no logits of the last token.
    const bool sample = last && active->request.stops.max_new_tokens > 0;
    const absl::Span<float> logits = absl::MakeSpan(logits_).subspan(0, sample ? V : 0);
    const int64_t position = active->base + active->prefilled;
    absl::Status status;
    if (active->request.prompt_logprobs) {
      const int64_t first = active->prefilled;
      absl::Status scored;
      const auto score = [&](int64_t chunk_first, int64_t rows, absl::Span<const float> chunk) {
        if (scored.ok()) scored = EmitPromptLogprobs(*active, first + chunk_first, rows, chunk);
      };
      status = model_->Prefill(active->slot, position, tokens, logits, Model::ChunkLogitsFn(score));
      if (status.ok()) status = scored;
    } else {
      status = model_->Prefill(active->slot, position, tokens, logits);
    }
    budget -= n;
    stats.prefill_tokens += n;
    if (!status.ok()) {
      // Unhealthy before the request's error reaches its client (see FailEngine).
      const bool failed = model_->backend_failed();
      if (failed) FailEngine(status);
      Finish(*active, FinishReason::kError, status);
      if (failed) break;
      continue;
    }
    active->prefilled += n;
    MaybeSnapshot(*active);
    if (last) {
      active->prefill_done = absl::Now();
      if (!sample) {
        Finish(*active, FinishReason::kLength);
        continue;
      }
      HandleLogits(*active, logits);
    }
  }
  if (stats.prefill_tokens > 0) stats.prefill_time = absl::Now() - start;
}

absl::Status Scheduler::EmitPromptLogprobs(Active& active, int64_t first, int64_t rows,
                                           absl::Span<const float> logits) {
  const int64_t V = model_->config().vocab_size;
  const absl::Span<const int32_t> feed = active.feed();
  // Position j's logits score feed token j + 1; the last feed token has none to score.
  const int64_t scored = std::min(rows, active.feed_size() - 1 - first);
  if (scored <= 0) return absl::OkStatus();
  StreamDelta delta;
  delta.prompt_logprobs.reserve(static_cast<size_t>(scored));
  for (int64_t r = 0; r < scored; ++r) {
    const absl::Span<const float> row =
        logits.subspan(static_cast<size_t>(r * V), static_cast<size_t>(V));
    PS_ASSIGN_OR_RETURN(const double log_normalizer, LogNormalizer(row));
    const int32_t target = feed[static_cast<size_t>(first + r + 1)];
    TokenOutput& out = delta.prompt_logprobs.emplace_back();
    out.token_id = target;
    out.logprob = static_cast<float>(static_cast<double>(row[target]) - log_normalizer);
    if (active.request.prompt_top_logprobs > 0) {
      out.top_logprobs =
          TopLogprobs(row, log_normalizer, active.request.prompt_top_logprobs, &top_scratch_);
    }
  }
  active.request.observer->OnDelta(std::move(delta));
  return absl::OkStatus();
}

void Scheduler::HandleLogits(Active& active, absl::Span<const float> logits) {
  absl::StatusOr<SampleResult> sample = active.sampler.Sample(logits);
  if (!sample.ok()) return Finish(active, FinishReason::kError, sample.status());
  const int32_t token = sample->token_id;
  if (absl::Status s = active.sampler.Accept(token); !s.ok()) {
    return Finish(active, FinishReason::kError, s);
  }
  ++active.generated;
  active.last_token = token;
  absl::StatusOr<std::string> text = active.detokenizer.Push(token);
  if (!text.ok()) return Finish(active, FinishReason::kError, text.status());
  // The next token would not fit the context: this one is the last.
  const bool at_limit = model_->SlotPosition(active.slot) >= model_->max_context();
  const bool last_possible = active.generated == active.request.stops.max_new_tokens || at_limit;
  if (last_possible) *text += active.detokenizer.Flush();
  absl::StatusOr<StopStep> step = active.stop_checker.Append(token, *text);
  if (!step.ok()) return Finish(active, FinishReason::kError, step.status());
  StreamDelta delta;
  delta.tokens.push_back({token, sample->logprob, std::move(sample->top_logprobs)});
  delta.text = std::move(step->released);
  if (!step->finish_reason.has_value() && at_limit) delta.text += active.stop_checker.Release();
  if (active.first_token == absl::InfinitePast()) active.first_token = absl::Now();
  active.request.observer->OnDelta(std::move(delta));
  if (step->finish_reason.has_value()) return Finish(active, *step->finish_reason);
  if (at_limit) return Finish(active, FinishReason::kLength);
  active.next_token = token;
}

}  // namespace ps::engine
