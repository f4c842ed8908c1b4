#pragma once

#include <atomic>
#include <cstdint>
#include <string>

namespace tailor::actors {

// A fault injector for tests (docs/operations.md, "Stopping and crashing"):
// environment variable `name` set to N makes the Nth occurrence of one kind
// of operation fail, and N+ (where allowed) the Nth and every later one.
// Unset or malformed (with a warning: an injector that silently did
// nothing would pass a test for the wrong reason), it never fires.
//
// Where it counts decides what N means: a fault_point in an actor's state
// counts that actor's operations; a static one counts the process's, so
// that the actor restarted after the fault does not fail again at the same
// count. Thread-safe.
class fault_point {
 public:
  fault_point() = default;  // never fires
  // Reads `name` now, for `who` (named in the log), whose `what` (such as
  // "adapter placement") it counts.
  fault_point(const char* name, const std::string& who, const char* what,
              bool every_later_allowed);
  fault_point(fault_point&& other) noexcept { *this = std::move(other); }
  fault_point& operator=(fault_point&& other) noexcept;
  // Counts one operation; true when it is to fail.
  bool fires();
  // Counts one operation and throws std::runtime_error naming the injector
  // when it is to fail.
  void throw_if_fires();
  // Counts one operation and, when it is to fail, kills the process
  // (SIGKILL) as a crash at that point would, after logging `where`.
  void kill_if_fires(const std::string& where);
  // Kills the process so (for a caller that prepares the crash first).
  [[noreturn]] void kill(const std::string& where);

 private:
  // Counts one operation: its number when it is to fail, else 0.
  int64_t count_one();
  const char* name_ = "";
  int64_t n_ = 0;  // 0: never fires
  bool every_later_ = false;
  std::atomic<int64_t> count_{0};
};

}  // namespace tailor::actors
