#include "messages/ids.hpp"

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

}  // namespace tailor::messages
