// Fuzz target: the byte tokenizer and the incremental detokenizer (tokenizer.h). The byte
// tokenizer has no vocabulary file to parse; its untrusted inputs are request text (Encode) and
// token id streams (Decode, IncrementalDetokenizer). Each input byte is one token id; after every
// id the harness also pushes an id outside the vocabulary, which must be refused without changing
// the state. Invariants (tokenizer.h's contract):
//   every Push output and the Flush output is valid UTF-8 on its own;
//   the concatenated outputs equal ByteTokenizer::Decode of all ids;
//   Decode(ids) == the input bytes exactly when they are valid UTF-8 (and differs otherwise);
//   Encode and DecodeBytes are inverse; at most 3 bytes are ever held back.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <absl/strings/string_view.h>

#include "fuzz/fuzz_check.h"
#include "server/engine/model_io/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using ps::engine::IsValidUtf8;
  const absl::string_view text(reinterpret_cast<const char*>(data), size);
  static const ps::engine::ByteTokenizer tokenizer = *ps::engine::ByteTokenizer::Create(256);

  const std::vector<int32_t> ids = tokenizer.Encode(text);
  PS_FUZZ_CHECK(ids.size() == size, "Encode gave %zu ids for %zu bytes", ids.size(), size);
  absl::StatusOr<std::string> raw = tokenizer.DecodeBytes(ids);
  PS_FUZZ_CHECK(raw.ok() && *raw == text, "DecodeBytes(Encode(x)) != x");

  ps::engine::IncrementalDetokenizer detokenizer;
  std::string streamed;
  for (size_t i = 0; i < ids.size(); ++i) {
    const int pending_before = detokenizer.pending_bytes();
    // Ids just outside the vocabulary on both sides, varied by position.
    const int32_t bad = (i % 2 == 0) ? 256 + static_cast<int32_t>(i % 7) : -1 - ids[i];
    absl::StatusOr<std::string> refused = detokenizer.Push(bad);
    PS_FUZZ_CHECK(refused.status().code() == absl::StatusCode::kInvalidArgument,
                  "id %d not refused", bad);
    PS_FUZZ_CHECK(detokenizer.pending_bytes() == pending_before, "a refused id changed the state");

    absl::StatusOr<std::string> piece = detokenizer.Push(ids[i]);
    PS_FUZZ_CHECK(piece.ok(), "Push(%d) failed", ids[i]);
    PS_FUZZ_CHECK(IsValidUtf8(*piece), "Push(%d) at %zu gave invalid UTF-8", ids[i], i);
    PS_FUZZ_CHECK(detokenizer.pending_bytes() >= 0 && detokenizer.pending_bytes() <= 3,
                  "%d bytes pending", detokenizer.pending_bytes());
    streamed += *piece;
  }
  const std::string tail = detokenizer.Flush();
  PS_FUZZ_CHECK(IsValidUtf8(tail), "Flush gave invalid UTF-8");
  PS_FUZZ_CHECK(detokenizer.pending_bytes() == 0, "Flush did not reset");
  streamed += tail;

  absl::StatusOr<std::string> decoded = tokenizer.Decode(ids);
  PS_FUZZ_CHECK(decoded.ok(), "Decode failed");
  PS_FUZZ_CHECK(*decoded == streamed, "concatenated Push outputs != Decode");
  PS_FUZZ_CHECK(IsValidUtf8(*decoded), "Decode gave invalid UTF-8");
  const bool valid = IsValidUtf8(text);
  PS_FUZZ_CHECK(valid == (*decoded == text), "valid input %d but Decode(x) == x is %d", valid,
                *decoded == text);
  PS_FUZZ_CHECK(valid == (ps::engine::FirstInvalidUtf8Byte(text) < 0), "validators disagree");

  // The other Push overload appends to one buffer and must give the same text.
  std::string appended;
  ps::engine::IncrementalDetokenizer second;
  for (int32_t id : ids) PS_FUZZ_CHECK(second.Push(id, appended).ok(), "Push(id, out) failed");
  appended += second.Flush();
  PS_FUZZ_CHECK(appended == streamed, "Push(id, out) != Push(id)");

  // Bad ids anywhere make Decode fail naming the first one, whatever precedes it.
  if (!ids.empty()) {
    std::vector<int32_t> with_bad = ids;
    with_bad[with_bad.size() / 2] = 256;
    PS_FUZZ_CHECK(tokenizer.Decode(with_bad).status().code() == absl::StatusCode::kInvalidArgument,
                  "Decode accepted id 256");
  }
  return 0;
}
