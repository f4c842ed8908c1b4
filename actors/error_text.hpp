#pragma once

#include <caf/error.hpp>
#include <string>

namespace tailor::actors {

// The message a Tailor error carries (its context string), for an answer or
// a log line; CAF's own rendering for any other error.
inline std::string error_text(const caf::error& err) {
  const auto& ctx = err.context();
  if (ctx.match_elements<std::string>()) return ctx.get_as<std::string>(0);
  return caf::to_string(err);
}

}  // namespace tailor::actors
