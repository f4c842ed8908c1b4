#include "actors/fault.hpp"

#include <spdlog/spdlog.h>

#include <csignal>
#include <cstdlib>
#include <stdexcept>

namespace tailor::actors {

fault_point::fault_point(const char* name, const std::string& who, const char* what,
                         bool every_later_allowed)
    : name_(name) {
  const char* f = std::getenv(name);
  if (!f) return;
  std::string spec = f;
  const bool later = every_later_allowed && !spec.empty() && spec.back() == '+';
  if (later) spec.pop_back();
  char* end = nullptr;
  const long long n = std::strtoll(spec.c_str(), &end, 10);
  if (spec.empty() || *end != '\0' || n <= 0) {
    spdlog::warn("{}: {}='{}' is not {} (a positive number): ignored", who, name, f,
                 every_later_allowed ? "N or N+" : "N");
    return;
  }
  spdlog::warn("{}: {}: {} {}{} will fail (fault injection)", who, name, what, n,
               later ? " and every later one" : "");
  n_ = n;
  every_later_ = later;
}

fault_point& fault_point::operator=(fault_point&& other) noexcept {
  name_ = other.name_;
  n_ = other.n_;
  every_later_ = other.every_later_;
  count_.store(other.count_.load());
  return *this;
}

int64_t fault_point::count_one() {
  if (n_ == 0) return 0;
  const auto n = ++count_;
  return n == n_ || (every_later_ && n > n_) ? n : 0;
}

bool fault_point::fires() {
  return count_one() > 0;
}

void fault_point::throw_if_fires() {
  if (const auto n = count_one(); n > 0)
    throw std::runtime_error(std::string("fault injected by ") + name_ + " (occurrence " +
                             std::to_string(n) + ")");
}

void fault_point::kill_if_fires(const std::string& where) {
  if (count_one() > 0) kill(where);
}

void fault_point::kill(const std::string& where) {
  spdlog::critical("killed {} (fault injected by {})", where, name_);
  spdlog::default_logger()->flush();
  ::raise(SIGKILL);
  std::abort();  // not reached
}

}  // namespace tailor::actors
