#pragma once

#include <cstdint>
#include <string>

namespace tailor::actors {

// A fault injector for tests (docs/operations.md, "Stopping and crashing"):
// environment variable `name` set to N, or to N+ where `every_later` is
// allowed (then the Nth and every later one fail). {0, false} when unset
// or malformed (with a warning: an injector that silently did nothing
// would pass a test for the wrong reason).
struct fault_setting {
  int64_t n = 0;
  bool every_later = false;
};

// Reads `name` for `who` (named in the log), whose `what` (one event, such
// as "adapter placement") the injector counts.
fault_setting fault_from_env(const char* name, const std::string& who, const char* what,
                             bool every_later_allowed);

}  // namespace tailor::actors
