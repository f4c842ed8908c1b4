// safetensors I/O: a reference file built byte by byte (independently of the
// writer) reads back exactly; every malformed case is its own clear error.
#include "storage/safetensors.hpp"
#include "temp_dir.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

using namespace tailor::storage;

namespace {

std::vector<std::byte> bytes_of(const std::string& s) {
  std::vector<std::byte> out(s.size());
  std::memcpy(out.data(), s.data(), s.size());
  return out;
}

// A file from a header text and raw data, with the length prefix written by hand.
std::vector<std::byte> file_of(const std::string& header, const std::string& data) {
  std::string f;
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) f.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  return bytes_of(f + header + data);
}

errc error_of(std::vector<std::byte> bytes,
              std::size_t max_header = safetensors_file::default_max_header) {
  auto r = safetensors_file::parse(std::move(bytes), max_header);
  EXPECT_FALSE(r) << "accepted a malformed file";
  return r ? errc::none : static_cast<errc>(r.error().code());
}

}  // namespace

TEST(Safetensors, ReferenceFileReadsBackExactly) {
  // Two F32 values 1.0 and -2.5, then one I64 value 7, little-endian.
  std::string data;
  data += std::string("\x00\x00\x80\x3f", 4);  // 1.0f
  data += std::string("\x00\x00\x20\xc0", 4);  // -2.5f
  data += std::string("\x07\x00\x00\x00\x00\x00\x00\x00", 8);
  std::string header =
      R"({"__metadata__":{"format":"pt","n_layer":"2"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("step":{"dtype":"I64","shape":[],"data_offsets":[8,16]}})";
  auto f = safetensors_file::parse(file_of(header, data));
  ASSERT_TRUE(f) << caf::to_string(f.error());
  EXPECT_EQ(f->metadata().at("format"), "pt");
  EXPECT_EQ(f->metadata().at("n_layer"), "2");
  const auto* w = f->find("w");
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(w->type, dtype::f32);
  EXPECT_EQ(w->shape, std::vector<int64_t>{2});
  float v[2];
  ASSERT_EQ(f->data(*w).size(), sizeof(v));
  std::memcpy(v, f->data(*w).data(), sizeof(v));
  EXPECT_EQ(v[0], 1.0f);
  EXPECT_EQ(v[1], -2.5f);
  const auto* step = f->find("step");
  ASSERT_NE(step, nullptr);
  EXPECT_TRUE(step->shape.empty());
  int64_t s = 0;
  std::memcpy(&s, f->data(*step).data(), 8);
  EXPECT_EQ(s, 7);
  EXPECT_EQ(f->find("nope"), nullptr);
}

TEST(Safetensors, WriterOutputIsReadBackAndPadded) {
  std::vector<float> a = {1, 2, 3, 4, 5, 6};
  std::vector<int32_t> b = {-1, 9};
  std::vector<tensor_to_write> ts = {
      {"a", dtype::f32, {2, 3}, std::as_bytes(std::span(a))},
      {"b", dtype::i32, {2}, std::as_bytes(std::span(b))},
  };
  auto enc = encode_safetensors(ts, {{"config", "{\"d\":1}"}});
  ASSERT_TRUE(enc);
  uint64_t n = 0;
  std::memcpy(&n, enc->data(), 8);
  EXPECT_EQ(n % 8, 0u) << "data starts 8-byte aligned";
  auto f = safetensors_file::parse(*enc);
  ASSERT_TRUE(f) << caf::to_string(f.error());
  EXPECT_EQ(f->metadata().at("config"), "{\"d\":1}");
  auto ra = f->data(*f->find("a"));
  EXPECT_EQ(std::memcmp(ra.data(), a.data(), ra.size()), 0);
  EXPECT_EQ(f->find("a")->shape, (std::vector<int64_t>{2, 3}));
  auto rb = f->data(*f->find("b"));
  EXPECT_EQ(std::memcmp(rb.data(), b.data(), rb.size()), 0);
  // A shape that disagrees with the bytes is refused when writing too.
  std::vector<tensor_to_write> bad = {{"a", dtype::f32, {7}, std::as_bytes(std::span(a))}};
  EXPECT_FALSE(encode_safetensors(bad, {}));
}

TEST(Safetensors, AtomicWriteAndRead) {
  const tailor::test::temp_dir dir("st");
  auto path = (dir / "adapter.safetensors").string();
  std::vector<float> a(1000);
  std::iota(a.begin(), a.end(), 0.0f);
  ASSERT_FALSE(
      write_safetensors(path, {{"a", dtype::f32, {10, 100}, std::as_bytes(std::span(a))}}, {}));
  auto f = safetensors_file::read(path);
  ASSERT_TRUE(f);
  EXPECT_EQ(std::memcmp(f->data(*f->find("a")).data(), a.data(), a.size() * 4), 0);
  std::size_t files = 0;
  for ([[maybe_unused]] auto& e : std::filesystem::directory_iterator(dir.path())) ++files;
  EXPECT_EQ(files, 1u) << "no temporary file is left behind";
  // Truncating the stored file makes it unreadable with a clear error.
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 3);
  auto t = safetensors_file::read(path);
  ASSERT_FALSE(t);
  EXPECT_EQ(t.error(), errc::offsets_out_of_range);
  EXPECT_NE(caf::to_string(t.error()).find("adapter.safetensors"), std::string::npos);
  EXPECT_FALSE(safetensors_file::read((dir / "missing").string()));
}

TEST(Safetensors, MalformedFilesAreRefusedEachWithItsOwnError) {
  const std::string ok_tensor = R"("w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  const std::string data(8, '\0');
  // Truncated: no length prefix; a header longer than the file; data shorter than the offsets.
  EXPECT_EQ(error_of(bytes_of("abc")), errc::truncated);
  {
    auto f = file_of("{" + ok_tensor + "}", data);
    f.resize(12);
    EXPECT_EQ(error_of(f), errc::truncated);
  }
  EXPECT_EQ(error_of(file_of("{" + ok_tensor + "}", data.substr(0, 5))),
            errc::offsets_out_of_range);
  // Header over the limit (checked before anything is allocated or parsed).
  EXPECT_EQ(error_of(file_of("{" + ok_tensor + "}", data), 16), errc::header_too_large);
  {
    std::vector<std::byte> huge(16, std::byte{0xff});  // length 2^64-1
    EXPECT_EQ(error_of(huge), errc::header_too_large);
  }
  // Not JSON, not an object, missing keys, wrong metadata.
  EXPECT_EQ(error_of(file_of("{nope", data)), errc::bad_header);
  EXPECT_EQ(error_of(file_of("[1]", data)), errc::bad_header);
  EXPECT_EQ(error_of(file_of(R"({"w":{"dtype":"F32","shape":[2]}})", data)), errc::bad_header);
  EXPECT_EQ(error_of(file_of(R"({"__metadata__":{"a":1},)" + ok_tensor + "}", data)),
            errc::bad_header);
  EXPECT_EQ(error_of(file_of(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[-1,8]}})", data)),
            errc::bad_header);
  // Unknown dtype.
  EXPECT_EQ(error_of(file_of(R"({"w":{"dtype":"F128","shape":[2],"data_offsets":[0,8]}})", data)),
            errc::unknown_dtype);
  // Offsets out of range or reversed.
  EXPECT_EQ(error_of(file_of(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})", data)),
            errc::offsets_out_of_range);
  EXPECT_EQ(error_of(file_of(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", data)),
            errc::offsets_out_of_range);
  // Overlapping tensors.
  EXPECT_EQ(error_of(file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                             data)),
            errc::offsets_overlap);
  // Shape disagrees with the byte length; a negative or overflowing shape.
  EXPECT_EQ(error_of(file_of(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", data)),
            errc::shape_mismatch);
  EXPECT_EQ(error_of(file_of(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", data)),
            errc::shape_mismatch);
  EXPECT_EQ(
      error_of(file_of(
          R"({"w":{"dtype":"U8","shape":[4294967296,4294967296,2],"data_offsets":[0,8]}})", data)),
      errc::shape_mismatch);
  // Bytes that no tensor covers.
  EXPECT_EQ(error_of(file_of(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", data)),
            errc::incomplete_buffer);
}

TEST(Safetensors, RandomCorruptionNeverCrashes) {
  std::vector<float> a(64, 1.5f);
  auto enc =
      *encode_safetensors({{"a", dtype::f32, {8, 8}, std::as_bytes(std::span(a))}}, {{"k", "v"}});
  std::mt19937 rng(42);
  int refused = 0;
  for (int i = 0; i < 2000; ++i) {
    auto b = enc;
    auto pos = rng() % std::min<std::size_t>(b.size(), 120);  // mostly the header
    b[pos] = static_cast<std::byte>(rng() & 0xff);
    if (rng() % 4 == 0) b.resize(rng() % b.size());
    auto f = safetensors_file::parse(std::move(b));
    if (!f) {
      ++refused;
      continue;
    }
    for (const auto& t : f->tensors()) ASSERT_LE(f->data(t).size(), enc.size());
  }
  EXPECT_GT(refused, 0);
}
