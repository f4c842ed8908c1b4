#pragma once

#include <caf/expected.hpp>
#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "storage/errc.hpp"

// The safetensors format, hand-written (no Debian package reads it): an
// 8-byte little-endian header length, a JSON header naming each tensor's
// dtype, shape and [begin, end) byte range, an optional "__metadata__"
// object of strings, then the raw little-endian data. Reading validates
// everything before any byte is handed out: a malformed file is an error,
// never a crash or an over-read.
namespace tailor::storage {

enum class dtype : uint8_t { f64, f32, f16, bf16, i64, i32, i16, i8, u8, boolean };

std::size_t dtype_size(dtype t);
const char* dtype_name(dtype t);

struct tensor_entry {
  std::string name;
  dtype type = dtype::f32;
  std::vector<int64_t> shape;
  std::size_t begin = 0;  // within the data section
  std::size_t end = 0;
};

class safetensors_file {
 public:
  // Parses `bytes` (the whole file). `max_header` bounds the JSON header.
  static caf::expected<safetensors_file> parse(std::vector<std::byte> bytes,
                                               std::size_t max_header = default_max_header);
  static caf::expected<safetensors_file> read(const std::string& path,
                                              std::size_t max_header = default_max_header);

  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::vector<tensor_entry>& tensors() const { return tensors_; }
  const tensor_entry* find(const std::string& name) const;
  std::span<const std::byte> data(const tensor_entry& t) const {
    return {bytes_.data() + data_start_ + t.begin, t.end - t.begin};
  }

  static constexpr std::size_t default_max_header = 16 << 20;

 private:
  std::vector<std::byte> bytes_;
  std::size_t data_start_ = 0;
  std::map<std::string, std::string> metadata_;
  std::vector<tensor_entry> tensors_;
};

struct tensor_to_write {
  std::string name;
  dtype type = dtype::f32;
  std::vector<int64_t> shape;
  std::span<const std::byte> bytes;
};

// The encoded file; tensors are laid out in the given order, the header padded
// with spaces to a multiple of 8 bytes.
caf::expected<std::vector<std::byte>> encode_safetensors(
    const std::vector<tensor_to_write>& tensors,
    const std::map<std::string, std::string>& metadata);

// Writes atomically: a temporary file beside `path`, fsync, rename, fsync of
// the directory. A reader never sees a partial file.
caf::error write_safetensors(const std::string& path, const std::vector<tensor_to_write>& tensors,
                             const std::map<std::string, std::string>& metadata);

}  // namespace tailor::storage
