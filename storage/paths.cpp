#include "storage/paths.hpp"

#include <cstdlib>

namespace tailor::storage {

std::string tailor_home() {
  if (const char* h = std::getenv("TAILOR_HOME"); h && *h) return h;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return std::string(x) + "/tailor";
  const char* home = std::getenv("HOME");
  return std::string(home && *home ? home : ".") + "/.cache/tailor";
}

}  // namespace tailor::storage
