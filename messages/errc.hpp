#pragma once

#include <caf/error.hpp>
#include <caf/make_message.hpp>
#include <cstdint>
#include <string>

namespace tailor::messages {

// Every error code Tailor puts on the wire (DLQ records, error results,
// job.failed events). The wire spelling is to_string(errc); it is part of
// the contract with consumers, so values may be added but never renamed.
enum class errc : uint8_t {
  none = 0,
  // Unreadable input: answered on tailor.dlq.
  invalid_json,
  not_an_object,
  missing_field,
  wrong_type,
  invalid_id,
  too_large,
  unknown_type,
  unsupported_schema_version,
  // Readable but ungrantable: answered to the requester.
  invalid_argument,
  out_of_bounds,
  path_escape,
  unknown_base_model,
  no_ready_model,
  model_not_found,
  model_not_owned,
  model_not_ready,
  duplicate_request_id,
  quota_exceeded,
  unavailable,
  job_not_found,
  job_not_cancellable,
  internal,
  // Onboarding: answered with job.failed.
  data_not_found,   // data_ref names no readable file
  invalid_data,     // training data that cannot be trained on
  training_failed,  // training or saving failed after every retry
  // Serving: answered with an error result.
  adapter_unavailable,  // the model's adapter cannot be loaded (missing, damaged, does not fit)
  prompt_too_long,      // the prompt fills more than the base model's context
  // Onboarding and serving: a request sent before its user was deleted
  // (user.delete), read after.
  user_deleted,
  // Onboarding: the engine's disk is full. Not a failure of the job, which
  // waits (job.retrying) and goes on once there is room.
  storage_full,
};

std::string to_string(errc code);

// The code whose wire spelling is `name`; internal for a name no code has.
errc errc_of(const std::string& name);

// True for codes that answer an unreadable event (tailor.dlq).
bool is_unreadable(errc code);

}  // namespace tailor::messages

CAF_ERROR_CODE_ENUM(tailor::messages::errc, "tailor_msg")
