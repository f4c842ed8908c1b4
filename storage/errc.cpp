#include "storage/errc.hpp"

namespace tailor::storage {

std::string to_string(errc code) {
  switch (code) {
    case errc::none: return "none";
    case errc::io_error: return "io_error";
    case errc::not_found: return "not_found";
    case errc::invalid_transition: return "invalid_transition";
    case errc::already_exists: return "already_exists";
    case errc::corrupt_record: return "corrupt_record";
    case errc::truncated: return "truncated";
    case errc::header_too_large: return "header_too_large";
    case errc::bad_header: return "bad_header";
    case errc::unknown_dtype: return "unknown_dtype";
    case errc::shape_mismatch: return "shape_mismatch";
    case errc::offsets_out_of_range: return "offsets_out_of_range";
    case errc::offsets_overlap: return "offsets_overlap";
    case errc::incomplete_buffer: return "incomplete_buffer";
    case errc::checksum_mismatch: return "checksum_mismatch";
    case errc::no_space: return "no_space";
  }
  return "unknown";
}

}  // namespace tailor::storage
