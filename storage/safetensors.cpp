#include "storage/safetensors.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "storage/artifacts.hpp"

namespace tailor::storage {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; a big-endian host needs byte swapping");

namespace {

using json = nlohmann::json;

struct dtype_info {
  dtype type;
  const char* name;
  std::size_t size;
};

constexpr dtype_info dtypes[] = {
    {dtype::f64, "F64", 8},      {dtype::f32, "F32", 4}, {dtype::f16, "F16", 2},
    {dtype::bf16, "BF16", 2},    {dtype::i64, "I64", 8}, {dtype::i32, "I32", 4},
    {dtype::i16, "I16", 2},      {dtype::i8, "I8", 1},   {dtype::u8, "U8", 1},
    {dtype::boolean, "BOOL", 1},
};

caf::error fail(errc code, std::string msg) {
  return caf::make_error(code, std::move(msg));
}

// Element count of `shape`, or false on a negative dimension or overflow.
bool element_count(const std::vector<int64_t>& shape, uint64_t& out) {
  out = 1;
  for (auto d : shape) {
    if (d < 0) return false;
    if (d != 0 && out > UINT64_MAX / static_cast<uint64_t>(d)) return false;
    out *= static_cast<uint64_t>(d);
  }
  return true;
}

}  // namespace

std::size_t dtype_size(dtype t) {
  for (const auto& d : dtypes)
    if (d.type == t) return d.size;
  return 0;
}

const char* dtype_name(dtype t) {
  for (const auto& d : dtypes)
    if (d.type == t) return d.name;
  return "?";
}

caf::expected<safetensors_file> safetensors_file::parse(std::vector<std::byte> bytes,
                                                        std::size_t max_header) {
  if (bytes.size() < 8)
    return fail(errc::truncated,
                "file of " + std::to_string(bytes.size()) + " bytes has no header length");
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  if (n > max_header)
    return fail(errc::header_too_large, "header of " + std::to_string(n) +
                                            " bytes is over the limit of " +
                                            std::to_string(max_header));
  if (n > bytes.size() - 8)
    return fail(errc::truncated, "header of " + std::to_string(n) + " bytes but only " +
                                     std::to_string(bytes.size() - 8) + " bytes follow");
  auto* begin = reinterpret_cast<const char*>(bytes.data()) + 8;
  json header = json::parse(begin, begin + n, nullptr, false);
  if (header.is_discarded() || !header.is_object())
    return fail(errc::bad_header, "header is not a JSON object");
  safetensors_file f;
  f.data_start_ = 8 + n;
  const std::size_t data_size = bytes.size() - f.data_start_;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const auto& name = it.key();
    const auto& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) return fail(errc::bad_header, "__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string())
          return fail(errc::bad_header, "__metadata__." + m.key() + " is not a string");
        f.metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") ||
        !v.contains("data_offsets"))
      return fail(errc::bad_header, name + ": needs dtype, shape and data_offsets");
    const auto& dt = v["dtype"];
    const auto& shape = v["shape"];
    const auto& offs = v["data_offsets"];
    if (!dt.is_string()) return fail(errc::bad_header, name + ": dtype is not a string");
    tensor_entry e;
    e.name = name;
    bool known = false;
    for (const auto& d : dtypes)
      if (dt.get<std::string>() == d.name) e.type = d.type, known = true;
    if (!known) return fail(errc::unknown_dtype, name + ": unknown dtype " + dt.get<std::string>());
    if (!shape.is_array()) return fail(errc::bad_header, name + ": shape is not an array");
    for (const auto& d : shape) {
      if (!d.is_number_integer())
        return fail(errc::bad_header, name + ": shape holds a non-integer");
      e.shape.push_back(d.get<int64_t>());
    }
    if (!offs.is_array() || offs.size() != 2 || !offs[0].is_number_unsigned() ||
        !offs[1].is_number_unsigned())
      return fail(errc::bad_header, name + ": data_offsets must be two non-negative integers");
    auto b = offs[0].get<uint64_t>(), en = offs[1].get<uint64_t>();
    if (b > en || en > data_size)
      return fail(errc::offsets_out_of_range, name + ": data_offsets [" + std::to_string(b) + ", " +
                                                  std::to_string(en) + ") outside the " +
                                                  std::to_string(data_size) + " data bytes");
    uint64_t count = 0;
    if (!element_count(e.shape, count) || count > (en - b) / dtype_size(e.type) + 1 ||
        count * dtype_size(e.type) != en - b)
      return fail(errc::shape_mismatch, name + ": shape and " + std::to_string(en - b) +
                                            " bytes of " + dtype_name(e.type) + " disagree");
    e.begin = b;
    e.end = en;
    f.tensors_.push_back(std::move(e));
  }
  // Byte ranges must tile the data section: no overlap, no hole.
  auto order = f.tensors_;
  std::sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::size_t pos = 0;
  for (const auto& t : order) {
    if (t.begin < pos) return fail(errc::offsets_overlap, t.name + ": overlaps another tensor");
    if (t.begin > pos)
      return fail(errc::incomplete_buffer, "bytes [" + std::to_string(pos) + ", " +
                                               std::to_string(t.begin) + ") belong to no tensor");
    pos = t.end;
  }
  if (pos != data_size)
    return fail(errc::incomplete_buffer, "bytes [" + std::to_string(pos) + ", " +
                                             std::to_string(data_size) + ") belong to no tensor");
  f.bytes_ = std::move(bytes);
  return f;
}

caf::expected<safetensors_file> safetensors_file::read(const std::string& path,
                                                       std::size_t max_header) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return fail(errc::io_error, "cannot open " + path);
  auto size = static_cast<std::size_t>(in.tellg());
  std::vector<std::byte> bytes(size);
  in.seekg(0);
  if (!in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size)))
    return fail(errc::io_error, "cannot read " + path);
  auto f = parse(std::move(bytes), max_header);
  if (!f) {
    const auto& ctx = f.error().context();
    std::string what =
        ctx.match_elements<std::string>() ? ctx.get_as<std::string>(0) : std::string{};
    return caf::make_error(static_cast<errc>(f.error().code()), path + ": " + what);
  }
  return f;
}

const tensor_entry* safetensors_file::find(const std::string& name) const {
  for (const auto& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

caf::expected<std::vector<std::byte>> encode_safetensors(
    const std::vector<tensor_to_write>& tensors,
    const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::size_t offset = 0;
  for (const auto& t : tensors) {
    uint64_t count = 0;
    if (!element_count(t.shape, count) || count * dtype_size(t.type) != t.bytes.size())
      return fail(errc::shape_mismatch,
                  t.name + ": shape and " + std::to_string(t.bytes.size()) + " bytes disagree");
    if (header.contains(t.name)) return fail(errc::bad_header, t.name + ": named twice");
    header[t.name] = {{"dtype", dtype_name(t.type)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');
  std::vector<std::byte> out(8 + h.size() + offset);
  uint64_t n = h.size();
  std::memcpy(out.data(), &n, 8);
  std::memcpy(out.data() + 8, h.data(), h.size());
  std::size_t pos = 8 + h.size();
  for (const auto& t : tensors) {
    if (!t.bytes.empty()) std::memcpy(out.data() + pos, t.bytes.data(), t.bytes.size());
    pos += t.bytes.size();
  }
  return out;
}

caf::error write_safetensors(const std::string& path, const std::vector<tensor_to_write>& tensors,
                             const std::map<std::string, std::string>& metadata) {
  auto bytes = encode_safetensors(tensors, metadata);
  if (!bytes) return bytes.error();
  return write_file_atomic(path, *bytes);
}

}  // namespace tailor::storage
