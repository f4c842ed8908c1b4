#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>

namespace tailor::actors {

// At most one log line per `every` for a failure that repeats (every event
// retried each second while the disk is full, say); the next line says how
// many were held back. Thread-safe: one may serve many actors.
class log_limit {
 public:
  explicit log_limit(std::chrono::milliseconds every) : every_(every) {}

  // Whether to log now; then `held` is how many were held back before it.
  bool allow(uint64_t& held) {
    std::lock_guard<std::mutex> guard(mtx_);
    const auto now = std::chrono::steady_clock::now();
    if (logged_ && now - last_ < every_) {
      ++held_;
      return false;
    }
    logged_ = true;
    last_ = now;
    held = held_;
    held_ = 0;
    return true;
  }

 private:
  std::mutex mtx_;
  std::chrono::milliseconds every_;
  std::chrono::steady_clock::time_point last_{};
  bool logged_ = false;
  uint64_t held_ = 0;
};

}  // namespace tailor::actors
