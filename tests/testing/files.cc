// TempDir and whole-file helpers on top of std::filesystem and mkdtemp.
#include "tests/testing/files.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdlib.h>
#include <system_error>
#include <vector>

#include <absl/strings/str_cat.h>
#include <gtest/gtest.h>

namespace ps::test {

TempDir::TempDir() {
  std::string pattern = ::testing::TempDir();
  if (pattern.empty() || pattern.back() != '/') pattern += '/';
  pattern += "polysketch_test_XXXXXX";
  std::vector<char> buffer(pattern.begin(), pattern.end());
  buffer.push_back('\0');
  if (::mkdtemp(buffer.data()) == nullptr) {
    ADD_FAILURE() << "mkdtemp(" << pattern << ") failed";
    return;
  }
  path_ = buffer.data();
}

TempDir::~TempDir() {
  if (path_.empty()) return;
  std::error_code error;
  std::filesystem::remove_all(path_, error);
}

std::string TempDir::Join(absl::string_view name) const { return absl::StrCat(path_, "/", name); }

void WriteFile(const std::string& path, absl::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) ADD_FAILURE() << "cannot write " << path;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    ADD_FAILURE() << "cannot read " << path;
    return "";
  }
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::string SourcePath(absl::string_view relative) {
  // Test binaries packed for another machine (scripts/gpu-check) find the tree there through
  // the environment; the configure-time path otherwise.
  const char* env = std::getenv("PS_SOURCE_DIR");
  return absl::StrCat(env != nullptr && *env != '\0' ? env : PS_SOURCE_DIR, "/", relative);
}

}  // namespace ps::test
