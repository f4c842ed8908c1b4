#include "messages/errc.hpp"

namespace tailor::messages {

std::string to_string(errc code) {
  switch (code) {
    case errc::none: return "none";
    case errc::invalid_json: return "invalid_json";
    case errc::not_an_object: return "not_an_object";
    case errc::missing_field: return "missing_field";
    case errc::wrong_type: return "wrong_type";
    case errc::invalid_id: return "invalid_id";
    case errc::too_large: return "too_large";
    case errc::unknown_type: return "unknown_type";
    case errc::unsupported_schema_version: return "unsupported_schema_version";
    case errc::invalid_argument: return "invalid_argument";
    case errc::out_of_bounds: return "out_of_bounds";
    case errc::path_escape: return "path_escape";
    case errc::unknown_base_model: return "unknown_base_model";
    case errc::no_ready_model: return "no_ready_model";
    case errc::model_not_found: return "model_not_found";
    case errc::model_not_owned: return "model_not_owned";
    case errc::model_not_ready: return "model_not_ready";
    case errc::duplicate_request_id: return "duplicate_request_id";
    case errc::quota_exceeded: return "quota_exceeded";
    case errc::unavailable: return "unavailable";
    case errc::job_not_found: return "job_not_found";
    case errc::job_not_cancellable: return "job_not_cancellable";
    case errc::internal: return "internal";
    case errc::data_not_found: return "data_not_found";
    case errc::invalid_data: return "invalid_data";
    case errc::training_failed: return "training_failed";
    case errc::adapter_unavailable: return "adapter_unavailable";
    case errc::prompt_too_long: return "prompt_too_long";
    case errc::user_deleted: return "user_deleted";
    case errc::storage_full: return "storage_full";
  }
  return "unknown";
}

errc errc_of(const std::string& name) {
  for (int c = 0; c <= UINT8_MAX; ++c)
    if (to_string(static_cast<errc>(c)) == name) return static_cast<errc>(c);
  return errc::internal;
}

bool is_unreadable(errc code) {
  switch (code) {
    case errc::invalid_json:
    case errc::not_an_object:
    case errc::missing_field:
    case errc::wrong_type:
    case errc::invalid_id:
    case errc::too_large:
    case errc::unknown_type:
    case errc::unsupported_schema_version: return true;
    default: return false;
  }
}

}  // namespace tailor::messages
