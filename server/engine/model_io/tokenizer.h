// The byte-level tokenizer of format version 1 (token id = byte value, no special tokens) and the
// UTF-8 handling around it: incremental detokenization that never emits half a character, and
// validation of request text.
//
// Invalid UTF-8 becomes U+FFFD by the "maximal subpart" practice (Unicode 15, section 3.9, "U+FFFD
// Substitution of Maximal Subparts"; the WHATWG Encoding Standard's UTF-8 decoder; what Python's
// bytes.decode("utf-8", "replace") does): a lead byte and the continuation bytes that can still
// begin a valid character form one unit; when the next byte cannot continue it, the unit becomes
// one U+FFFD and that byte starts afresh. So a truncated 4-byte character is one U+FFFD, while
// each byte of an overlong encoding (C0 80), a surrogate (ED A0 80) or a code point past U+10FFFF
// (F4 90 80 80) is a U+FFFD of its own, as is every stray continuation byte and every byte
// C0, C1, F5..FF.
#ifndef POLYSKETCH_SERVER_ENGINE_MODEL_IO_TOKENIZER_H_
#define POLYSKETCH_SERVER_ENGINE_MODEL_IO_TOKENIZER_H_

#include <cstdint>
#include <string>
#include <vector>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>
#include <absl/types/span.h>

namespace ps::engine {

// Number of token ids of the byte tokenizer.
inline constexpr int64_t kByteVocabSize = 256;

// U+FFFD REPLACEMENT CHARACTER in UTF-8.
inline constexpr absl::string_view kReplacementCharacter = "\xEF\xBF\xBD";

// True when `text` is well-formed UTF-8 (no overlong forms, surrogates or code points past
// U+10FFFF). The empty string is valid; NUL bytes are valid characters.
bool IsValidUtf8(absl::string_view text);
// The byte offset where the first ill-formed sequence of `text` starts, or -1 when it is valid.
int64_t FirstInvalidUtf8Byte(absl::string_view text);

// Token id <-> byte. Immutable after construction: thread-safe.
class ByteTokenizer {
 public:
  // A tokenizer for a model with `vocab_size` ids. The byte tokenizer defines exactly 256 ids
  // (one per byte value, nothing else), so any other vocab_size is InvalidArgument: a model
  // whose embedding has more or fewer rows cannot be served with this tokenizer.
  [[nodiscard]] static absl::StatusOr<ByteTokenizer> Create(int64_t vocab_size);

  int64_t vocab_size() const { return kByteVocabSize; }

  // One id per byte of `text`, in [0, 256). Any bytes, valid UTF-8 or not.
  std::vector<int32_t> Encode(absl::string_view text) const;

  // InvalidArgument naming the first id outside [0, vocab_size) and its index ("token_ids[3] =
  // 300 is outside the vocabulary [0, 256)").
  [[nodiscard]] absl::Status ValidateIds(absl::Span<const int32_t> ids) const;

  // The bytes of `ids` (which may not be valid UTF-8). Errors as ValidateIds.
  [[nodiscard]] absl::StatusOr<std::string> DecodeBytes(absl::Span<const int32_t> ids) const;

  // The text of `ids`: valid UTF-8, with invalid sequences (including one cut off at the end)
  // replaced as described at the top of this file. Equal to feeding every id to an
  // IncrementalDetokenizer and then calling Flush(). Errors as ValidateIds.
  [[nodiscard]] absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids) const;

 private:
  ByteTokenizer() = default;
};

// Turns a stream of token ids into a stream of complete UTF-8 text. Each Push returns the text
// that the id completes (nothing while a multi-byte character is still open; possibly U+FFFD and
// more when an id breaks an open sequence); Flush ends the stream. The concatenated outputs equal
// ByteTokenizer::Decode of all ids, and every output on its own is valid UTF-8.
// One object per output stream; not thread-safe (engine thread only). Copyable (copies state).
class IncrementalDetokenizer {
 public:
  IncrementalDetokenizer() = default;

  // Feeds one id. InvalidArgument when it is outside [0, 256); the state is then unchanged.
  [[nodiscard]] absl::StatusOr<std::string> Push(int32_t token_id);

  // Same, appending to `out` instead of returning a string (no allocation in the steady state).
  [[nodiscard]] absl::Status Push(int32_t token_id, std::string& out);

  // Ends the stream: returns U+FFFD when a character is still open (a truncated sequence),
  // else "". Resets the detokenizer, so it can start a new stream.
  std::string Flush();

  // Bytes held back: the start of a character that later ids may complete (0 to 3).
  int pending_bytes() const { return num_pending_; }

 private:
  // The WHATWG UTF-8 decoder state: bytes of the open character, how many it needs in total,
  // and the range the next continuation byte must fall in (narrower after E0, ED, F0, F4).
  char pending_[4] = {};
  int num_pending_ = 0;
  int num_needed_ = 0;  // total length of the open character; 0 when none is open
  uint8_t lower_ = 0x80;
  uint8_t upper_ = 0xBF;
};

}  // namespace ps::engine

#endif  // POLYSKETCH_SERVER_ENGINE_MODEL_IO_TOKENIZER_H_
