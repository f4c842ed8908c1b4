#pragma once

#include <caf/error.hpp>
#include <caf/make_message.hpp>
#include <cstdint>
#include <string>

namespace tailor::model {

enum class errc : uint8_t {
  none = 0,
  invalid_data,       // training data that cannot be trained on (no text)
  invalid_options,    // training options out of range
  checkpoint_failed,  // a checkpoint could not be written or read
};

std::string to_string(errc code);

}  // namespace tailor::model

CAF_ERROR_CODE_ENUM(tailor::model::errc, "tailor_mdl")
