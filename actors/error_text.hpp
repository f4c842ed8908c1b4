#pragma once

#include <caf/error.hpp>
#include <caf/scheduled_actor.hpp>
#include <caf/sec.hpp>
#include <exception>
#include <string>

namespace tailor::actors {

// The message a Tailor error carries (its context string), for an answer or
// a log line; CAF's own rendering for any other error.
inline std::string error_text(const caf::error& err) {
  const auto& ctx = err.context();
  if (ctx.match_elements<std::string>()) return ctx.get_as<std::string>(0);
  return caf::to_string(err);
}

// An actor's exception handler that keeps the exception's message in the
// actor's exit reason. CAF 0.17's default prints the message and leaves
// only `runtime_error`; with this, whoever watches the actor (the
// supervisor, the registry, the training pool) logs what happened.
inline caf::error exit_reason_of_exception(caf::scheduled_actor*, std::exception_ptr& x) {
  try {
    std::rethrow_exception(x);
  } catch (const std::exception& e) {
    return caf::make_error(caf::sec::runtime_error, std::string(e.what()));
  } catch (...) {
    return caf::make_error(caf::sec::runtime_error, std::string("an exception of unknown type"));
  }
}

}  // namespace tailor::actors
