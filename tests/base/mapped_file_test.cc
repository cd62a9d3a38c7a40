// MappedFile: contents, empty files, missing files, directories, and moves.
#include "base/mapped_file.h"

#include <string>
#include <sys/stat.h>
#include <unistd.h>
#include <utility>

#include <absl/status/status.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/testing/files.h"
#include "tests/testing/status_matchers.h"

namespace ps {
namespace {

using ::ps::test::IsOk;
using ::ps::test::StatusIs;
using ::ps::test::TempDir;
using ::ps::test::WriteFile;

TEST(MappedFileTest, MapsTheWholeFile) {
  TempDir dir;
  std::string contents("hello\0world", 11);
  contents += std::string(10000, 'x');  // more than one page
  WriteFile(dir.Join("f"), contents);
  PS_ASSERT_OK_AND_ASSIGN(MappedFile file, MappedFile::Open(dir.Join("f")));
  EXPECT_EQ(file.size(), contents.size());
  EXPECT_EQ(file.text(), contents);
  EXPECT_EQ(file.bytes().size(), contents.size());
  EXPECT_EQ(file.path(), dir.Join("f"));
}

TEST(MappedFileTest, EmptyFile) {
  TempDir dir;
  WriteFile(dir.Join("empty"), "");
  PS_ASSERT_OK_AND_ASSIGN(MappedFile file, MappedFile::Open(dir.Join("empty")));
  EXPECT_EQ(file.size(), 0u);
  EXPECT_EQ(file.data(), nullptr);
  EXPECT_EQ(file.text(), "");
}

TEST(MappedFileTest, MissingFileIsNotFoundNamingThePath) {
  TempDir dir;
  EXPECT_THAT(MappedFile::Open(dir.Join("absent")),
              StatusIs(absl::StatusCode::kNotFound, dir.Join("absent")));
  EXPECT_THAT(MappedFile::Open(dir.Join("absent/below")),
              StatusIs(absl::StatusCode::kNotFound, dir.Join("absent/below")));
}

TEST(MappedFileTest, FileUnderAFileIsNotFound) {
  TempDir dir;
  WriteFile(dir.Join("f"), "x");
  EXPECT_THAT(MappedFile::Open(dir.Join("f/g")),
              StatusIs(absl::StatusCode::kNotFound, dir.Join("f/g")));
}

TEST(MappedFileTest, DirectoryIsRefused) {
  TempDir dir;
  EXPECT_THAT(MappedFile::Open(dir.path()),
              StatusIs(absl::StatusCode::kInvalidArgument, dir.path() + ": not a regular file"));
}

TEST(MappedFileTest, UnreadableFileIsPermissionDenied) {
  if (::geteuid() == 0) GTEST_SKIP() << "root reads every file";
  TempDir dir;
  WriteFile(dir.Join("secret"), "x");
  ASSERT_EQ(::chmod(dir.Join("secret").c_str(), 0), 0);
  EXPECT_THAT(MappedFile::Open(dir.Join("secret")),
              StatusIs(absl::StatusCode::kPermissionDenied, dir.Join("secret")));
}

TEST(MappedFileTest, MoveKeepsTheMappingAndEmptiesTheSource) {
  TempDir dir;
  WriteFile(dir.Join("f"), "abc");
  PS_ASSERT_OK_AND_ASSIGN(MappedFile a, MappedFile::Open(dir.Join("f")));
  const std::byte* data = a.data();
  MappedFile b(std::move(a));
  EXPECT_EQ(b.data(), data);
  EXPECT_EQ(b.text(), "abc");
  EXPECT_EQ(a.size(), 0u);  // NOLINT(bugprone-use-after-move): documented moved-from state
  EXPECT_EQ(a.data(), nullptr);

  WriteFile(dir.Join("g"), "defg");
  PS_ASSERT_OK_AND_ASSIGN(MappedFile c, MappedFile::Open(dir.Join("g")));
  c = std::move(b);  // unmaps "g", takes "f"
  EXPECT_EQ(c.text(), "abc");
  EXPECT_EQ(c.path(), dir.Join("f"));
  EXPECT_EQ(b.size(), 0u);  // NOLINT(bugprone-use-after-move)
}

TEST(MappedFileTest, DefaultConstructedIsEmpty) {
  MappedFile file;
  EXPECT_EQ(file.size(), 0u);
  EXPECT_TRUE(file.bytes().empty());
}

}  // namespace
}  // namespace ps
