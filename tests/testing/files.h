// Files for tests: a temporary directory that cleans up after itself, whole-file read/write, and
// paths into the source tree (golden fixtures, shipped models).
#ifndef POLYSKETCH_TESTS_TESTING_FILES_H_
#define POLYSKETCH_TESTS_TESTING_FILES_H_

#include <string>

#include <absl/strings/string_view.h>

namespace ps::test {

// A fresh directory under GoogleTest's temporary directory, deleted with its contents when the
// object dies. Unique per object, so tests running in parallel never share one.
class TempDir {
 public:
  TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir();

  const std::string& path() const { return path_; }
  // path() + "/" + name.
  std::string Join(absl::string_view name) const;

 private:
  std::string path_;
};

// Writes `bytes` to `path` (creating or truncating it); fails the test (ADD_FAILURE) on error.
void WriteFile(const std::string& path, absl::string_view bytes);
// The contents of `path`; fails the test (ADD_FAILURE) and returns "" on error.
std::string ReadFile(const std::string& path);
// The absolute path of `relative` inside the repository (e.g. "tests/golden/softmax"): under
// $PS_SOURCE_DIR when that is set (binaries run on another machine), else the configured tree.
std::string SourcePath(absl::string_view relative);

}  // namespace ps::test

#endif  // POLYSKETCH_TESTS_TESTING_FILES_H_
