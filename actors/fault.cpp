#include "actors/fault.hpp"

#include <spdlog/spdlog.h>

#include <cstdlib>

namespace tailor::actors {

fault_setting fault_from_env(const char* name, const std::string& who, const char* what,
                             bool every_later_allowed) {
  const char* f = std::getenv(name);
  if (!f) return {};
  std::string spec = f;
  const bool later = every_later_allowed && !spec.empty() && spec.back() == '+';
  if (later) spec.pop_back();
  char* end = nullptr;
  const long long n = std::strtoll(spec.c_str(), &end, 10);
  if (spec.empty() || *end != '\0' || n <= 0) {
    spdlog::warn("{}: {}='{}' is not {} (a positive number): ignored", who, name, f,
                 every_later_allowed ? "N or N+" : "N");
    return {};
  }
  spdlog::warn("{}: {}: {} {}{} will fail (fault injection)", who, name, what, n,
               later ? " and every later one" : "");
  return {n, later};
}

}  // namespace tailor::actors
