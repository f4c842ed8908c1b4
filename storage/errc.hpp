#pragma once

#include <caf/error.hpp>
#include <caf/make_message.hpp>
#include <cstdint>
#include <string>

namespace tailor::storage {

enum class errc : uint8_t {
  none = 0,
  io_error,  // RocksDB reported a failure (message carries its status)
  not_found,
  invalid_transition,  // the job is not in the state the transition starts from
  already_exists,
  corrupt_record,  // a stored value does not parse
};

std::string to_string(errc code);

}  // namespace tailor::storage

CAF_ERROR_CODE_ENUM(tailor::storage::errc, "tailor_db")
