// The golden-fixture helpers: a fixture folder without its golden.safetensors is still listed, so
// the parameterized tests over the fixtures fail on it (LoadGoldenFixture: NotFound) instead of
// dropping it without a word; and the fixtures the engine tests rely on are all there.
#include "tests/testing/golden.h"

#include <filesystem>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/testing/files.h"
#include "tests/testing/status_matchers.h"

namespace ps::test {
namespace {

using ::testing::ElementsAre;

TEST(GoldenTest, AFixtureFolderWithoutItsFileIsListedAndFailsToLoad) {
  TempDir root;
  std::filesystem::create_directory(root.Join("complete"));
  WriteFile(root.Join("complete/golden.safetensors"), "");
  std::filesystem::create_directory(root.Join("lost-its-file"));
  EXPECT_THAT(GoldenFixtureNamesIn(root.path()), ElementsAre("complete", "lost-its-file"));
  EXPECT_THAT(LoadGoldenFixture("no-such-fixture"), StatusIs(absl::StatusCode::kNotFound));
}

TEST(GoldenTest, EveryCheckedInFixtureLoads) {
  const std::vector<std::string> names = GoldenFixtureNames();
  EXPECT_GE(names.size(), 16u);
  for (const std::string& name : names) {
    SCOPED_TRACE(name);
    EXPECT_THAT(LoadGoldenFixture(name), IsOk());
  }
}

}  // namespace
}  // namespace ps::test
