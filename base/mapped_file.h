// A read-only memory mapping of a whole file, released when the object dies. Model files (weights,
// configs, fixtures) are read through it so large files cost no copy and no read() loop.
#ifndef POLYSKETCH_BASE_MAPPED_FILE_H_
#define POLYSKETCH_BASE_MAPPED_FILE_H_

#include <cstddef>
#include <string>
#include <utility>

#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>
#include <absl/types/span.h>

namespace ps {

// Owns one read-only, private mapping of a regular file. Move-only; the moved-from object is
// empty (size 0). The bytes stay valid and at the same address until the owning object (the one
// it was last moved into) is destroyed.
//
// The file must not be truncated or rewritten while it is mapped: the kernel would deliver SIGBUS
// on access to a page past the new end. Writers of model files replace them atomically (write a
// temporary, rename), which leaves existing mappings intact.
//
// Thread-safety: const methods may be called from any number of threads at once.
class MappedFile {
 public:
  // Maps `path`. Errors name the path:
  //   NotFound          the file (or a directory on the way) does not exist;
  //   PermissionDenied  it cannot be opened for reading;
  //   InvalidArgument   it is not a regular file (a directory, a FIFO, ...);
  //   other codes       from the failing system call (errno mapped by absl::ErrnoToStatus).
  // An empty file maps to an empty span (data() == nullptr).
  [[nodiscard]] static absl::StatusOr<MappedFile> Open(std::string path);

  MappedFile() = default;  // empty: no file, size 0
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  // The whole file. No alignment beyond the page alignment of data() is promised for any offset.
  absl::Span<const std::byte> bytes() const { return {data_, size_}; }
  const std::byte* data() const { return data_; }
  size_t size() const { return size_; }
  // The file's contents as characters (for text files such as config.json).
  absl::string_view text() const { return {reinterpret_cast<const char*>(data_), size_}; }
  // The path given to Open(), for error messages.
  const std::string& path() const { return path_; }

 private:
  MappedFile(std::string path, const std::byte* data, size_t size)
      : path_(std::move(path)), data_(data), size_(size) {}
  void Reset();

  std::string path_;
  const std::byte* data_ = nullptr;  // start of the mapping, or nullptr when empty
  size_t size_ = 0;                  // bytes mapped == file size at Open()
};

}  // namespace ps

#endif  // POLYSKETCH_BASE_MAPPED_FILE_H_
