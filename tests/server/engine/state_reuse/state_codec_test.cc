// The exported-state format: round trip, and every kind of damage refused with a clear error,
// including edits that keep the checksum valid (a counter or a float changed and the checksum
// recomputed), which ValidateStateBytes must catch because kernels index by those counters.
#include "server/engine/state_reuse/state_codec.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>

#include <absl/strings/str_cat.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "base/hash.h"
#include "kernels/cpu/cpu_backend.h"
#include "server/engine/model/model.h"
#include "server/engine/model_io/weights.h"
#include "tests/testing/files.h"
#include "tests/testing/status_matchers.h"

namespace ps::engine {
namespace {

using ::ps::test::IsOk;
using ::ps::test::StatusIs;

class StateCodecTest : public ::testing::Test {
 protected:
  // A model of `fixture` with one slot that has seen `n` tokens; its state and identity.
  void Load(const std::string& fixture, int64_t n,
            kernels::KvCacheDtype kv_dtype = kernels::KvCacheDtype::kFp32) {
    absl::StatusOr<ModelWeights> weights = LoadWeights(test::SourcePath("tests/golden/" + fixture));
    ASSERT_THAT(weights.status(), IsOk());
    ModelOptions options;
    options.num_slots = 1;
    options.max_context = 128;
    options.kv_cache_dtype = kv_dtype;
    auto model = Model::Create(*weights, backend_, options);
    ASSERT_THAT(model.status(), IsOk());
    model_ = *std::move(model);
    PS_ASSERT_OK_AND_ASSIGN(const SlotId slot, model_->AcquireSlot());
    std::vector<int32_t> tokens;
    for (int64_t i = 0; i < n; ++i) tokens.push_back(static_cast<int32_t>((i * 7) % 50));
    ASSERT_THAT(model_->Prefill(slot, 0, tokens, {}), IsOk());
    ASSERT_THAT(model_->SaveSlot(slot, &state_.snapshot), IsOk());
    state_.pending = {3};
    identity_ = {ModelFingerprint(*weights), &model_->config(), &model_->layout(),
                 model_->max_context()};
    weights_ = *std::move(weights);
  }

  // `bytes` with its checksum recomputed, as an attacker would.
  static std::string Reseal(std::string bytes) {
    const uint64_t sum = Fingerprint64(bytes.data(), bytes.size() - 8, kStateChecksumSeed);
    std::memcpy(bytes.data() + bytes.size() - 8, &sum, 8);
    return bytes;
  }

  // Offset in the encoded bytes of a component of layer 0.
  int64_t PayloadOffset(const std::string& bytes, StateComponent component, int64_t layer = 0) {
    const int64_t payload_start =
        static_cast<int64_t>(bytes.size()) - 8 - model_->layout().bytes_per_slot();
    return payload_start + model_->layout().layer(layer).region(component).offset_bytes;
  }

  kernels::cpu::CpuBackend backend_{1};
  ModelWeights weights_;
  std::unique_ptr<Model> model_;
  SequenceState state_;
  ModelIdentity identity_;
};

TEST_F(StateCodecTest, RoundTripKeepsEverything) {
  Load("mixed", 37);
  const std::string bytes = EncodeState(state_, identity_);
  PS_ASSERT_OK_AND_ASSIGN(const SequenceState back, DecodeState(bytes, identity_));
  EXPECT_EQ(back.snapshot.position, 37);
  EXPECT_EQ(back.pending, state_.pending);
  EXPECT_EQ(back.snapshot.bytes, state_.snapshot.bytes);
}

TEST_F(StateCodecTest, TheEmptyStateRoundTrips) {
  Load("polysketch-random-local", 1);
  const std::string bytes = EncodeState(SequenceState{}, identity_);
  PS_ASSERT_OK_AND_ASSIGN(const SequenceState back, DecodeState(bytes, identity_));
  EXPECT_EQ(back.snapshot.position, 0);
  EXPECT_TRUE(back.pending.empty());
}

TEST_F(StateCodecTest, DamageIsRefused) {
  Load("polysketch-learned-local", 20);
  const std::string bytes = EncodeState(state_, identity_);
  for (size_t at : {size_t{0}, size_t{9}, bytes.size() / 2, bytes.size() - 1}) {
    std::string damaged = bytes;
    damaged[at] ^= 0x01;
    EXPECT_THAT(DecodeState(damaged, identity_), StatusIs(absl::StatusCode::kDataLoss))
        << "byte " << at;
  }
  EXPECT_THAT(DecodeState(bytes.substr(0, 100), identity_), StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(DecodeState("", identity_), StatusIs(absl::StatusCode::kDataLoss, "magic"));
}

TEST_F(StateCodecTest, AnotherModelOrVersionIsRefused) {
  Load("polysketch-random", 5);
  ModelIdentity other = identity_;
  other.fingerprint ^= 1;
  EXPECT_THAT(DecodeState(EncodeState(state_, other), identity_),
              StatusIs(absl::StatusCode::kFailedPrecondition, "another model"));
  std::string bytes = EncodeState(state_, identity_);
  bytes[8] = 5;  // format version 5: a later one
  EXPECT_THAT(DecodeState(Reseal(bytes), identity_),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       "format version 5; this server reads versions 3 to 4"));
}

// A state of format version 1 (before the switch to xxHash: its checksum and model fingerprint
// used another hash) is refused by its version, with what to do, not as "corrupted".
TEST_F(StateCodecTest, StatesOfTheFormerFormatAreRefusedByVersion) {
  Load("polysketch-random", 5);
  EXPECT_EQ(kStateFormatVersion, 4u);
  std::string bytes = EncodeState(state_, identity_);
  bytes[8] = 1;  // as a version-1 server wrote it; its checksum does not match ours
  EXPECT_THAT(DecodeState(bytes, identity_),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       "state: format version 1 (an earlier polysketch server's"));
  EXPECT_THAT(DecodeState(bytes, identity_),
              StatusIs(absl::StatusCode::kFailedPrecondition, "reads versions 3 to 4 only"));
}

// Version 2 (issue 18 until issue 19) had the same header and checksum, but a local_exact layer's
// slot held S_cur [H, P, h+1] where version 3 keeps the block's sketched keys [H, b, r]: such a
// state is refused by its version (naming both), even when its checksum is valid, and its size
// is not what decides (a version-2 slot of this model was larger).
TEST_F(StateCodecTest, VersionTwoLocalExactStatesAreRefusedByVersion) {
  Load("polysketch-random-local", 12);
  const std::string current = EncodeState(state_, identity_);
  ASSERT_THAT(DecodeState(current, identity_).status(), IsOk());
  std::string bytes = current;
  bytes[8] = 2;
  for (const std::string& old : {bytes, Reseal(bytes)}) {
    EXPECT_THAT(DecodeState(old, identity_),
                StatusIs(absl::StatusCode::kFailedPrecondition,
                         "state: format version 2 (an earlier polysketch server's, whose "
                         "local_exact layers kept S_cur instead of the block's sketched keys); "
                         "this server reads versions 3 to 4 only: export the state again"));
  }
}

// Version 3 had the same bytes, with a local_exact layer's counter ("local_count") always 0: a
// version-3 state is read as a version-4 state with no rows pending.
TEST_F(StateCodecTest, VersionThreeStatesAreReadAsStatesWithNothingPending) {
  Load("polysketch-learned-local", 21);
  std::string bytes = EncodeState(state_, identity_);
  ASSERT_EQ(bytes[8], 4);
  bytes[8] = 3;
  PS_ASSERT_OK_AND_ASSIGN(const SequenceState back, DecodeState(Reseal(bytes), identity_));
  EXPECT_EQ(back.snapshot.position, 21);
  EXPECT_EQ(back.snapshot.bytes, state_.snapshot.bytes);
}

// local_pending (rows of the previous block not yet folded) must fit the position: 0 in the
// first block and at a block start, at most b - position % b otherwise; anything else would make
// the kernels fold rows the current block has written, or none that exist.
TEST_F(StateCodecTest, PendingRowsOutsideWhatThePositionAllowsAreRefused) {
  struct Case {
    int64_t position;
    int64_t pending;
    bool valid;
  };
  // polysketch-learned-local: blocks of 8.
  for (const Case& c :
       {Case{12, 4, true}, Case{12, 1, true}, Case{12, 5, false}, Case{12, -1, false},
        Case{16, 1, false}, Case{5, 1, false}, Case{9, 7, true}, Case{9, 8, false}}) {
    SCOPED_TRACE(absl::StrCat("position ", c.position, " pending ", c.pending));
    Load("polysketch-learned-local", c.position);
    ASSERT_EQ(model_->layout().layer(0).local_size, 8);
    std::string bytes = EncodeState(state_, identity_);
    std::memcpy(bytes.data() + PayloadOffset(bytes, StateComponent::kLocalPending), &c.pending, 8);
    if (c.valid) {
      EXPECT_THAT(DecodeState(Reseal(bytes), identity_).status(), IsOk());
    } else {
      EXPECT_THAT(DecodeState(Reseal(bytes), identity_),
                  StatusIs(absl::StatusCode::kDataLoss, "local_pending"));
    }
  }
}

TEST_F(StateCodecTest, EditedCountersAreRefusedEvenWithAValidChecksum) {
  Load("sliding-window", 30);
  std::string bytes = EncodeState(state_, identity_);
  const int64_t at = PayloadOffset(bytes, StateComponent::kRingCount);
  const int64_t huge = int64_t{1} << 40;
  std::memcpy(bytes.data() + at, &huge, 8);
  EXPECT_THAT(DecodeState(Reseal(bytes), identity_),
              StatusIs(absl::StatusCode::kDataLoss, "ring_count"));

  Load("softmax", 30);
  bytes = EncodeState(state_, identity_);
  const int64_t count_at = PayloadOffset(bytes, StateComponent::kKvCount);
  const int64_t too_many = 31;
  std::string edited = bytes;
  std::memcpy(edited.data() + count_at, &too_many, 8);
  EXPECT_THAT(DecodeState(Reseal(edited), identity_),
              StatusIs(absl::StatusCode::kDataLoss, "kv_count"));
  // A kept position swapped for one the cache cannot hold.
  edited = bytes;
  const int64_t future = 99;
  std::memcpy(edited.data() + PayloadOffset(bytes, StateComponent::kKvPositions) + 8, &future, 8);
  EXPECT_THAT(DecodeState(Reseal(edited), identity_),
              StatusIs(absl::StatusCode::kDataLoss, "kv_positions"));
}

// sparse_strided (w 5, s 4) keeps every key, also the ones the last query does not see (position
// 29 does not see key 20; query 33 will): such a state is accepted, with exactly 30 rows in
// position order, and the row count of the old rule (last w plus j % s == 0: 12) is refused.
TEST_F(StateCodecTest, StridedStatesKeepEveryKey) {
  Load("sparse-strided", 30);
  const std::string bytes = EncodeState(state_, identity_);
  PS_ASSERT_OK_AND_ASSIGN(const SequenceState back, DecodeState(bytes, identity_));
  EXPECT_EQ(back.snapshot.bytes, state_.snapshot.bytes);
  for (int64_t layer = 0; layer < model_->layout().num_layers(); ++layer) {
    int64_t count = 0;
    std::memcpy(&count, bytes.data() + PayloadOffset(bytes, StateComponent::kKvCount, layer), 8);
    EXPECT_EQ(count, 30) << "layer " << layer;
    for (int64_t row = 0; row < count; ++row) {
      int64_t position = -1;
      std::memcpy(
          &position,
          bytes.data() + PayloadOffset(bytes, StateComponent::kKvPositions, layer) + 8 * row, 8);
      EXPECT_EQ(position, row) << "layer " << layer;
    }
  }
  std::string edited = bytes;
  const int64_t old_rule = 12;
  std::memcpy(edited.data() + PayloadOffset(bytes, StateComponent::kKvCount), &old_rule, 8);
  EXPECT_THAT(DecodeState(Reseal(edited), identity_),
              StatusIs(absl::StatusCode::kDataLoss, "kv_count"));
}

TEST_F(StateCodecTest, NonFiniteValuesAndBadPendingTokensAreRefused) {
  Load("polysketch-random-local", 12);
  std::string bytes = EncodeState(state_, identity_);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(bytes.data() + PayloadOffset(bytes, StateComponent::kSketch) + 4, &nan, 4);
  EXPECT_THAT(DecodeState(Reseal(bytes), identity_),
              StatusIs(absl::StatusCode::kDataLoss, "not finite"));
  state_.pending = {static_cast<int32_t>(model_->config().vocab_size)};
  EXPECT_THAT(DecodeState(EncodeState(state_, identity_), identity_),
              StatusIs(absl::StatusCode::kInvalidArgument, "vocabulary"));
  state_.pending.clear();
  state_.snapshot.position = 129;  // past max_context
  EXPECT_THAT(DecodeState(EncodeState(state_, identity_), identity_),
              StatusIs(absl::StatusCode::kInvalidArgument, "context limit"));
}

// fp16 KV caches (--kv_cache_dtype fp16): the state is half the size in its KV rows, round-trips
// bit for bit, carries dtype 1, and a server of the other dtype refuses it by name (both ways).
TEST_F(StateCodecTest, Fp16KvStatesRoundTripAndAreRefusedByAnFp32Server) {
  Load("mixed", 37);
  const SequenceState fp32_state = state_;
  const ModelIdentity fp32_identity = identity_;
  std::unique_ptr<Model> fp32_model = std::move(model_);
  Load("mixed", 37, kernels::KvCacheDtype::kFp16);
  ASSERT_TRUE(model_->layout().has_kv_cache_rows());
  EXPECT_LT(model_->layout().bytes_per_slot(), fp32_model->layout().bytes_per_slot());
  const std::string bytes = EncodeState(state_, identity_);
  PS_ASSERT_OK_AND_ASSIGN(const SequenceState back, DecodeState(bytes, identity_));
  EXPECT_EQ(back.snapshot.position, 37);
  EXPECT_EQ(back.snapshot.bytes, state_.snapshot.bytes);
  EXPECT_THAT(DecodeState(bytes, fp32_identity),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       "exported with fp16 KV caches (--kv_cache_dtype fp16); this server keeps "
                       "fp32 (--kv_cache_dtype fp32)"));
  EXPECT_THAT(DecodeState(EncodeState(fp32_state, fp32_identity), identity_),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       "exported with fp32 (--kv_cache_dtype fp32); this server keeps fp16"));
  // An unknown dtype byte (after magic, version, fingerprint, layer count and kinds).
  std::string edited = bytes;
  edited[8 + 4 + 8 + 4 + model_->config().layers.size()] = 7;
  EXPECT_THAT(DecodeState(Reseal(edited), identity_),
              StatusIs(absl::StatusCode::kFailedPrecondition, "unknown dtype 7"));
  // A non-finite binary16 in a KV row (exponent all ones), checksum resealed, is refused.
  const int64_t layer = 1;  // mixed: polysketch, softmax, sparse_fixed
  ASSERT_TRUE(model_->layout().IsFp16(StateComponent::kKvKeys) &&
              model_->layout().layer(layer).region(StateComponent::kKvKeys).present());
  edited = bytes;
  const uint16_t infinity = 0x7c00;
  std::memcpy(edited.data() + PayloadOffset(edited, StateComponent::kKvKeys, layer) + 2, &infinity,
              2);
  EXPECT_THAT(DecodeState(Reseal(edited), identity_),
              StatusIs(absl::StatusCode::kDataLoss, "kv_keys: holds a value that is not finite"));
}

// A model without KV-cache rows exports the same fp32 state whatever --kv_cache_dtype says, so
// such states move freely between servers of either setting.
TEST_F(StateCodecTest, StatesWithoutKvRowsIgnoreTheKvDtype) {
  Load("polysketch-random-local", 12);
  const std::string fp32_bytes = EncodeState(state_, identity_);
  Load("polysketch-random-local", 12, kernels::KvCacheDtype::kFp16);
  ASSERT_FALSE(model_->layout().has_kv_cache_rows());
  EXPECT_EQ(EncodeState(state_, identity_), fp32_bytes);
  EXPECT_THAT(DecodeState(fp32_bytes, identity_).status(), IsOk());
}

}  // namespace
}  // namespace ps::engine
