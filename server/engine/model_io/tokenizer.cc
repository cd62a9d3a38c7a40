// Byte tokenizer and UTF-8 decoding. The decoder is the WHATWG Encoding Standard's UTF-8 decoder
// (https://encoding.spec.whatwg.org/#utf-8-decoder) written byte by byte; IsValidUtf8 is an
// independent table-free check of Unicode's Table 3-7 (well-formed byte sequences), so that the
// tests can hold the two against each other.
#include "server/engine/model_io/tokenizer.h"

#include <absl/strings/str_cat.h>

#include "base/status_macros.h"

namespace ps::engine {
namespace {

absl::Status OutOfVocab(size_t index, int32_t id) {
  return absl::InvalidArgumentError(absl::StrCat(
      "token_ids[", index, "] = ", id, " is outside the vocabulary [0, ", kByteVocabSize, ")"));
}

bool InVocab(int32_t id) { return id >= 0 && id < kByteVocabSize; }

void AppendReplacement(std::string& out) {
  out.append(kReplacementCharacter.data(), kReplacementCharacter.size());
}

}  // namespace

int64_t FirstInvalidUtf8Byte(absl::string_view text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char b = s[i];
    if (b < 0x80) {
      ++i;
      continue;
    }
    // Table 3-7: the lead byte fixes the length and the range of the second byte; every later
    // byte is 80..BF.
    size_t length;
    unsigned char lo = 0x80, hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF) {
      length = 2;
    } else if (b >= 0xE0 && b <= 0xEF) {
      length = 3;
      if (b == 0xE0) lo = 0xA0;  // overlong below U+0800
      if (b == 0xED) hi = 0x9F;  // surrogates U+D800..U+DFFF
    } else if (b >= 0xF0 && b <= 0xF4) {
      length = 4;
      if (b == 0xF0) lo = 0x90;  // overlong below U+10000
      if (b == 0xF4) hi = 0x8F;  // past U+10FFFF
    } else {
      return static_cast<int64_t>(i);  // 80..C1 (continuation or overlong lead) and F5..FF
    }
    if (n - i < length) return static_cast<int64_t>(i);
    if (s[i + 1] < lo || s[i + 1] > hi) return static_cast<int64_t>(i);
    for (size_t k = 2; k < length; ++k) {
      if (s[i + k] < 0x80 || s[i + k] > 0xBF) return static_cast<int64_t>(i);
    }
    i += length;
  }
  return -1;
}

bool IsValidUtf8(absl::string_view text) { return FirstInvalidUtf8Byte(text) < 0; }

absl::StatusOr<ByteTokenizer> ByteTokenizer::Create(int64_t vocab_size) {
  if (vocab_size != kByteVocabSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("vocab_size: the byte tokenizer has exactly ", kByteVocabSize,
                     " token ids (one per byte), the model has ", vocab_size));
  }
  return ByteTokenizer();
}

std::vector<int32_t> ByteTokenizer::Encode(absl::string_view text) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size());
  for (char c : text) ids.push_back(static_cast<unsigned char>(c));
  return ids;
}

absl::Status ByteTokenizer::ValidateIds(absl::Span<const int32_t> ids) const {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (!InVocab(ids[i])) return OutOfVocab(i, ids[i]);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ByteTokenizer::DecodeBytes(absl::Span<const int32_t> ids) const {
  std::string out;
  out.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    if (!InVocab(ids[i])) return OutOfVocab(i, ids[i]);
    out += static_cast<char>(static_cast<unsigned char>(ids[i]));
  }
  return out;
}

absl::StatusOr<std::string> ByteTokenizer::Decode(absl::Span<const int32_t> ids) const {
  // Validate first so that a failure does not depend on where the bad id sits in a character.
  PS_RETURN_IF_ERROR(ValidateIds(ids));
  IncrementalDetokenizer detokenizer;
  std::string out;
  out.reserve(ids.size());
  for (int32_t id : ids) PS_RETURN_IF_ERROR(detokenizer.Push(id, out));
  out += detokenizer.Flush();
  return out;
}

absl::StatusOr<std::string> IncrementalDetokenizer::Push(int32_t token_id) {
  std::string out;
  PS_RETURN_IF_ERROR(Push(token_id, out));
  return out;
}

absl::Status IncrementalDetokenizer::Push(int32_t token_id, std::string& out) {
  if (!InVocab(token_id)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "token id ", token_id, " is outside the vocabulary [0, ", kByteVocabSize, ")"));
  }
  const auto byte = static_cast<uint8_t>(token_id);
  if (num_needed_ != 0) {
    if (byte >= lower_ && byte <= upper_) {
      pending_[num_pending_++] = static_cast<char>(byte);
      lower_ = 0x80;
      upper_ = 0xBF;
      if (num_pending_ == num_needed_) {  // complete: the bytes are a valid character
        out.append(pending_, static_cast<size_t>(num_pending_));
        num_pending_ = num_needed_ = 0;
      }
      return absl::OkStatus();
    }
    // The open sequence is a maximal subpart: one U+FFFD, then this byte starts afresh.
    AppendReplacement(out);
    num_pending_ = num_needed_ = 0;
    lower_ = 0x80;
    upper_ = 0xBF;
  }
  if (byte < 0x80) {
    out += static_cast<char>(byte);
  } else if (byte >= 0xC2 && byte <= 0xDF) {
    num_needed_ = 2;
  } else if (byte >= 0xE0 && byte <= 0xEF) {
    num_needed_ = 3;
    if (byte == 0xE0) lower_ = 0xA0;
    if (byte == 0xED) upper_ = 0x9F;
  } else if (byte >= 0xF0 && byte <= 0xF4) {
    num_needed_ = 4;
    if (byte == 0xF0) lower_ = 0x90;
    if (byte == 0xF4) upper_ = 0x8F;
  } else {  // continuation byte without a lead, C0, C1, F5..FF
    AppendReplacement(out);
  }
  if (num_needed_ != 0) pending_[num_pending_++] = static_cast<char>(byte);
  return absl::OkStatus();
}

std::string IncrementalDetokenizer::Flush() {
  const bool open = num_needed_ != 0;
  *this = IncrementalDetokenizer();
  return open ? std::string(kReplacementCharacter) : std::string();
}

}  // namespace ps::engine
