#pragma once

#include <caf/expected.hpp>
#include <cstddef>
#include <string>
#include <vector>

#include "messages/errc.hpp"

// Training data named by reference: a file inside the configured training
// data directory, never anywhere else.
namespace tailor::actors {

// The canonical path of `ref` under `root`. A path that leaves `root` (`..`,
// absolute, or a symlink pointing out) is path_escape; a missing or
// non-regular file is data_not_found. Both name the field and the reason.
caf::expected<std::string> resolve_data_ref(const std::string& root, const std::string& ref);

// The entries of a training file: UTF-8 text whose entries are separated by
// lines holding only `%` (the fortune format), or one entry when it has no
// such line. Over `max_bytes`, not UTF-8, or without any text: invalid_data.
caf::expected<std::vector<std::string>> read_training_file(const std::string& path,
                                                           const std::string& ref,
                                                           std::size_t max_bytes);

}  // namespace tailor::actors
