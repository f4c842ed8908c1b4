#include "actors/health.hpp"

namespace tailor::actors {

void engine_health::fail(const std::string& reason) {
  {
    std::lock_guard lock(mtx_);
    if (!failure_.empty()) return;
    failure_ = reason.empty() ? "unknown failure" : reason;
  }
  cv_.notify_all();
}

std::string engine_health::failure() const {
  std::lock_guard lock(mtx_);
  return failure_;
}

std::string engine_health::wait() {
  std::unique_lock lock(mtx_);
  cv_.wait(lock, [this] { return !failure_.empty() || released_; });
  return failure_;
}

void engine_health::release() {
  {
    std::lock_guard lock(mtx_);
    released_ = true;
  }
  cv_.notify_all();
}

void engine_health::stopping_at(std::string step) {
  std::lock_guard lock(mtx_);
  stop_step_ = std::move(step);
}

std::string engine_health::stop_step() const {
  std::lock_guard lock(mtx_);
  return stop_step_;
}

}  // namespace tailor::actors
