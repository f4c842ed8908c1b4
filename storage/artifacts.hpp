#pragma once

#include <caf/expected.hpp>
#include <cstddef>
#include <span>
#include <string>
#include <vector>

#include "storage/errc.hpp"

// The artifact store's file primitives: atomic writes and checksums, so a
// reader never sees a partial adapter and a damaged one is refused on load.
namespace tailor::storage {

// "sha256:<64 hex digits>" of `bytes`.
std::string checksum_of(std::span<const std::byte> bytes);

// Writes `bytes` to a temporary file beside `path`, fsyncs it, renames it over
// `path` and fsyncs the directory: after a crash there is the old file or the
// new one, never a mix.
caf::error write_file_atomic(const std::string& path, std::span<const std::byte> bytes);

// Where the artifact store under `artifact_dir` keeps a user's adapter: in
// a folder of the user's own, below `adapters/`, whatever the id.
std::string adapter_artifact_path(const std::string& artifact_dir, const std::string& user_id,
                                  const std::string& model_id);

// A user's adapter (safetensors bytes) written there atomically, its
// directories made: where it went and its checksum, as a model record
// names them.
struct stored_artifact {
  std::string path;
  std::string checksum;
};
caf::expected<stored_artifact> store_adapter(const std::string& artifact_dir,
                                             const std::string& user_id,
                                             const std::string& model_id,
                                             std::span<const std::byte> bytes);

// Reads `path` whole; when `checksum` is not empty, the bytes must match it
// (else checksum_mismatch).
caf::expected<std::vector<std::byte>> read_file(const std::string& path,
                                                const std::string& checksum = {});

}  // namespace tailor::storage
