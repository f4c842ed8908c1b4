#include "storage/artifacts.hpp"

#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

namespace tailor::storage {

namespace fs = std::filesystem;

std::string checksum_of(std::span<const std::byte> bytes) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(bytes.data(), bytes.size(), digest, &len, EVP_sha256(), nullptr);
  static const char* hex = "0123456789abcdef";
  std::string out = "sha256:";
  for (unsigned i = 0; i < len; ++i) {
    out.push_back(hex[digest[i] >> 4]);
    out.push_back(hex[digest[i] & 15]);
  }
  return out;
}

std::string adapter_artifact_path(const std::string& artifact_dir, const std::string& user_id,
                                  const std::string& model_id) {
  // "." and ".." are valid ids, but as a folder they name another one:
  // theirs get a '_' first, which no id has.
  const bool dots = user_id == "." || user_id == "..";
  return artifact_dir + "/adapters/" + (dots ? "_" : "") + user_id + "/" + model_id +
         ".safetensors";
}

caf::expected<stored_artifact> store_adapter(const std::string& artifact_dir,
                                             const std::string& user_id,
                                             const std::string& model_id,
                                             std::span<const std::byte> bytes) {
  stored_artifact out{adapter_artifact_path(artifact_dir, user_id, model_id), checksum_of(bytes)};
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(out.path).parent_path(), ec);
  if (ec) return caf::make_error(errc::io_error, "creating " + out.path + ": " + ec.message());
  if (auto err = write_file_atomic(out.path, bytes)) return err;
  return out;
}

caf::error write_file_atomic(const std::string& path, std::span<const std::byte> bytes) {
  // Unique per process and call: two threads may write beside each other.
  static std::atomic<uint64_t> seq{0};
  auto target = fs::path(path);
  auto tmp = target;
  tmp += ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(seq++);
  auto fail = [&](const std::string& what) {
    const auto code = errno == ENOSPC || errno == EDQUOT ? errc::no_space : errc::io_error;
    return caf::make_error(code, what + ": " + std::strerror(errno));
  };
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return fail("cannot create " + tmp.string());
  const auto* p = reinterpret_cast<const char*>(bytes.data());
  std::size_t left = bytes.size();
  while (left > 0) {
    auto w = ::write(fd, p, left);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      auto err = fail("cannot write " + tmp.string());
      ::close(fd);
      ::unlink(tmp.c_str());
      return err;
    }
    p += w;
    left -= static_cast<std::size_t>(w);
  }
  if (::fsync(fd) != 0) {
    auto err = fail("cannot sync " + tmp.string());
    ::close(fd);
    ::unlink(tmp.c_str());
    return err;
  }
  if (::close(fd) != 0) {
    auto err = fail("cannot close " + tmp.string());
    ::unlink(tmp.c_str());
    return err;
  }
  std::error_code ec;
  fs::rename(tmp, target, ec);
  if (ec) {
    ::unlink(tmp.c_str());
    return caf::make_error(errc::io_error, "cannot rename to " + path + ": " + ec.message());
  }
  // The rename itself is durable only once the directory is synced.
  auto dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return fail("cannot open directory " + dir.string());
  int rc = ::fsync(dfd);
  ::close(dfd);
  if (rc != 0) return fail("cannot sync directory " + dir.string());
  return {};
}

caf::expected<std::vector<std::byte>> read_file(const std::string& path,
                                                const std::string& checksum) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return caf::make_error(errc::not_found, "cannot open " + path);
  auto size = static_cast<std::size_t>(in.tellg());
  std::vector<std::byte> bytes(size);
  in.seekg(0);
  if (!in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size)))
    return caf::make_error(errc::io_error, "cannot read " + path);
  if (!checksum.empty()) {
    auto actual = checksum_of(bytes);
    if (actual != checksum)
      return caf::make_error(errc::checksum_mismatch,
                             path + ": checksum " + actual + " is not the registered " + checksum);
  }
  return bytes;
}

}  // namespace tailor::storage
