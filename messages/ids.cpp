#include "messages/ids.hpp"

#include <cstdio>

#include "messages/events.hpp"

namespace tailor::messages {

bool is_valid_id(std::string_view id) {
  if (id.empty() || id.size() > max_id_length) return false;
  for (char c : id) {
    bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == ':' || c == '-';
    if (!ok) return false;
  }
  return true;
}

std::string job_id_for(const std::string& user_id, const std::string& request_id) {
  std::string key = user_id;
  key.push_back('\0');
  key += request_id;
  char buf[24];
  std::snprintf(buf, sizeof(buf), "job-%016llx", static_cast<unsigned long long>(fnv1a64(key)));
  return buf;
}

}  // namespace tailor::messages
