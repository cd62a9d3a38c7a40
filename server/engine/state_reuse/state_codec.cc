#include "server/engine/state_reuse/state_codec.h"

#include <cstring>

#include <absl/strings/str_cat.h>

#include "base/hash.h"
#include "base/status_macros.h"

namespace ps::engine {
namespace {

constexpr char kMagic[8] = {'P', 'S', 'K', 'S', 'T', 'A', 'T', 'E'};
constexpr uint8_t kDtypeF32 = 0;
constexpr uint8_t kDtypeKvF16 = 1;

// The dtype byte a state of `layout` carries: 1 when it holds fp16 KV-cache rows, else 0 (also
// for an fp16 server whose model keeps no KV cache: its states are the fp32 ones).
uint8_t DtypeOf(const StateLayout& layout) {
  return layout.has_kv_cache_rows() && layout.kv_cache_dtype() == kernels::KvCacheDtype::kFp16
             ? kDtypeKvF16
             : kDtypeF32;
}

const char* DtypeName(uint8_t dtype) {
  return dtype == kDtypeKvF16 ? "fp16 KV caches (--kv_cache_dtype fp16)"
                              : "fp32 (--kv_cache_dtype fp32)";
}

template <typename T>
void Put(std::string& out, T value) {
  char raw[sizeof(T)];
  std::memcpy(raw, &value, sizeof(T));
  out.append(raw, sizeof(T));
}

// Reads fields in order, failing with DataLoss once the bytes run out.
class Reader {
 public:
  explicit Reader(absl::string_view bytes) : bytes_(bytes) {}

  template <typename T>
  absl::StatusOr<T> Get(absl::string_view field) {
    if (bytes_.size() < sizeof(T)) return Truncated(field);
    T value;
    std::memcpy(&value, bytes_.data(), sizeof(T));
    bytes_.remove_prefix(sizeof(T));
    return value;
  }
  absl::StatusOr<absl::string_view> Bytes(int64_t n, absl::string_view field) {
    if (n < 0 || static_cast<uint64_t>(n) > bytes_.size()) return Truncated(field);
    absl::string_view out = bytes_.substr(0, static_cast<size_t>(n));
    bytes_.remove_prefix(static_cast<size_t>(n));
    return out;
  }
  size_t left() const { return bytes_.size(); }

 private:
  static absl::Status Truncated(absl::string_view field) {
    return absl::DataLossError(absl::StrCat("state: truncated at the ", field));
  }
  absl::string_view bytes_;
};

}  // namespace

std::string EncodeState(const SequenceState& state, const ModelIdentity& model) {
  const ModelConfig& config = *model.config;
  std::string out;
  out.reserve(state.snapshot.bytes.size() + 128 + config.layers.size());
  out.append(kMagic, sizeof(kMagic));
  Put<uint32_t>(out, kStateFormatVersion);
  Put<uint64_t>(out, model.fingerprint);
  Put<uint32_t>(out, static_cast<uint32_t>(config.layers.size()));
  for (const AttentionConfig& layer : config.layers) {
    Put<uint8_t>(out, static_cast<uint8_t>(layer.kind));
  }
  Put<uint8_t>(out, DtypeOf(*model.layout));
  Put<int64_t>(out, state.snapshot.position);
  Put<uint32_t>(out, static_cast<uint32_t>(state.pending.size()));
  for (int32_t token : state.pending) Put<int32_t>(out, token);
  // An empty snapshot (the empty state) is written out in full: the format has one shape.
  const int64_t size = model.layout->bytes_per_slot();
  Put<int64_t>(out, size);
  if (state.snapshot.bytes.empty()) {
    out.append(static_cast<size_t>(size), '\0');
  } else {
    out.append(reinterpret_cast<const char*>(state.snapshot.bytes.data()),
               state.snapshot.bytes.size());
  }
  Put<uint64_t>(out, Fingerprint64(out.data(), out.size(), kStateChecksumSeed));
  return out;
}

absl::StatusOr<SequenceState> DecodeState(absl::string_view bytes, const ModelIdentity& model) {
  const ModelConfig& config = *model.config;
  if (bytes.size() < sizeof(kMagic) + 8 || std::memcmp(bytes.data(), kMagic, sizeof(kMagic)) != 0) {
    return absl::DataLossError("state: not a polysketch state (bad magic)");
  }
  // A state of a format this server no longer reads is refused by name first: a
  // version-1 checksum used another hash, so the check below could only call it corrupted, and a
  // version-2 slot of a local_exact model has another layout (S_cur where the sketched keys are).
  uint32_t version;
  std::memcpy(&version, bytes.data() + sizeof(kMagic), sizeof(version));
  if (version >= 1 && version < kOldestStateFormatVersion) {
    const absl::string_view why =
        version == 1 ? "whose checksum and model fingerprint used another hash"
                     : "whose local_exact layers kept S_cur instead of the block's sketched keys";
    return absl::FailedPreconditionError(absl::StrCat(
        "state: format version ", version, " (an earlier polysketch server's, ", why,
        "); this server reads versions ", kOldestStateFormatVersion, " to ", kStateFormatVersion,
        " only: export the state again from a server of this version"));
  }
  // Integrity first, so that the field checks below report edits, not noise.
  uint64_t stored;
  std::memcpy(&stored, bytes.data() + bytes.size() - 8, 8);
  const absl::string_view body = bytes.substr(0, bytes.size() - 8);
  if (Fingerprint64(body.data(), body.size(), kStateChecksumSeed) != stored) {
    return absl::DataLossError(absl::StrCat("state: checksum mismatch (", bytes.size(),
                                            " bytes: truncated or corrupted)"));
  }
  Reader in(body.substr(sizeof(kMagic)));
  PS_ASSIGN_OR_RETURN(version, in.Get<uint32_t>("format version"));
  if (version < kOldestStateFormatVersion || version > kStateFormatVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("state: format version ", version, "; this server reads versions ",
                     kOldestStateFormatVersion, " to ", kStateFormatVersion));
  }
  PS_ASSIGN_OR_RETURN(const uint64_t fingerprint, in.Get<uint64_t>("model fingerprint"));
  if (fingerprint != model.fingerprint) {
    return absl::FailedPreconditionError(absl::StrCat(
        "state: from another model (fingerprint ", absl::Hex(fingerprint, absl::kZeroPad16),
        "; this server's model is ", absl::Hex(model.fingerprint, absl::kZeroPad16), ")"));
  }
  PS_ASSIGN_OR_RETURN(const uint32_t num_layers, in.Get<uint32_t>("layer count"));
  if (num_layers != config.layers.size()) {
    return absl::FailedPreconditionError(
        absl::StrCat("state: ", num_layers, " layers; this model has ", config.layers.size()));
  }
  for (uint32_t l = 0; l < num_layers; ++l) {
    PS_ASSIGN_OR_RETURN(const uint8_t kind, in.Get<uint8_t>("attention kinds"));
    if (kind != static_cast<uint8_t>(config.layers[l].kind)) {
      return absl::FailedPreconditionError(absl::StrCat("state: layer ", l, " has attention kind ",
                                                        kind, "; this model's is ",
                                                        AttentionKindName(config.layers[l].kind)));
    }
  }
  PS_ASSIGN_OR_RETURN(const uint8_t dtype, in.Get<uint8_t>("dtype"));
  if (dtype != kDtypeF32 && dtype != kDtypeKvF16) {
    return absl::FailedPreconditionError(
        absl::StrCat("state: unknown dtype ", dtype, " (this server reads 0: fp32, 1: fp16 KV)"));
  }
  if (const uint8_t want = DtypeOf(*model.layout); dtype != want) {
    return absl::FailedPreconditionError(
        absl::StrCat("state: exported with ", DtypeName(dtype), "; this server keeps ",
                     DtypeName(want), ": import it into a server with the same --kv_cache_dtype"));
  }
  SequenceState state;
  PS_ASSIGN_OR_RETURN(state.snapshot.position, in.Get<int64_t>("position"));
  PS_ASSIGN_OR_RETURN(const uint32_t num_pending, in.Get<uint32_t>("pending tokens"));
  if (num_pending > kMaxPendingTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("state: ", num_pending, " pending tokens; at most ", kMaxPendingTokens));
  }
  for (uint32_t i = 0; i < num_pending; ++i) {
    PS_ASSIGN_OR_RETURN(const int32_t token, in.Get<int32_t>("pending tokens"));
    if (token < 0 || token >= config.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("state: pending token ", token,
                                                     " is outside the vocabulary [0, ",
                                                     config.vocab_size, ")"));
    }
    state.pending.push_back(token);
  }
  PS_ASSIGN_OR_RETURN(const int64_t size, in.Get<int64_t>("state size"));
  if (size != model.layout->bytes_per_slot()) {
    return absl::FailedPreconditionError(
        absl::StrCat("state: ", size, " bytes of state; this server's is ",
                     model.layout->bytes_per_slot(), " (KV caches are sized by max_context)"));
  }
  PS_ASSIGN_OR_RETURN(const absl::string_view payload, in.Bytes(size, "state bytes"));
  if (in.left() != 0) {
    return absl::DataLossError(absl::StrCat("state: ", in.left(), " unexpected trailing bytes"));
  }
  if (state.length() > model.max_context) {
    return absl::InvalidArgumentError(absl::StrCat(
        "state: ", state.length(), " tokens exceed the context limit ", model.max_context));
  }
  const auto* data = reinterpret_cast<const std::byte*>(payload.data());
  PS_RETURN_IF_ERROR(ValidateStateBytes(config, *model.layout, state.snapshot.position,
                                        model.max_context,
                                        absl::MakeConstSpan(data, payload.size())));
  state.snapshot.bytes.assign(data, data + payload.size());
  return state;
}

}  // namespace ps::engine
