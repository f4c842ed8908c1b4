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
  // safetensors files
  truncated,             // shorter than its header says
  header_too_large,      // header length over the limit
  bad_header,            // header is not the expected JSON
  unknown_dtype,         // a dtype safetensors does not define
  shape_mismatch,        // shape and byte range disagree
  offsets_out_of_range,  // a byte range outside the data section
  offsets_overlap,       // two tensors share bytes
  incomplete_buffer,     // data bytes that no tensor covers
  checksum_mismatch,     // an artifact's bytes are not the ones registered
  no_space,              // the disk is full: ENOSPC, EDQUOT, or RocksDB's NoSpace
};

std::string to_string(errc code);

}  // namespace tailor::storage

CAF_ERROR_CODE_ENUM(tailor::storage::errc, "tailor_db")
