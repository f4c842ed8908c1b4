#include "actors/training_data.hpp"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "messages/events.hpp"

namespace tailor::actors {

namespace fs = std::filesystem;
using messages::errc;

caf::expected<std::string> resolve_data_ref(const std::string& root, const std::string& ref) {
  std::error_code ec;
  auto base = fs::canonical(root, ec);
  if (ec)
    return caf::make_error(
        errc::data_not_found,
        "data_ref: " + ref + ": the training data directory " + root + " does not exist");
  auto rel = fs::path(ref);
  if (rel.is_absolute())
    return caf::make_error(errc::path_escape, "data_ref: " + ref + " is an absolute path");
  // weakly_canonical resolves every symlink that exists, so a link pointing
  // out of the directory is caught like a `..`.
  auto full = fs::weakly_canonical(base / rel, ec);
  if (ec) return caf::make_error(errc::data_not_found, "data_ref: " + ref + ": " + ec.message());
  auto [b, f] = std::mismatch(base.begin(), base.end(), full.begin(), full.end());
  if (b != base.end())
    return caf::make_error(errc::path_escape,
                           "data_ref: " + ref + " resolves outside the training data directory");
  if (!fs::is_regular_file(full, ec))
    return caf::make_error(errc::data_not_found, "data_ref: " + ref + " is not a file");
  return full.string();
}

caf::expected<std::vector<std::string>> read_training_file(const std::string& path,
                                                           const std::string& ref,
                                                           std::size_t max_bytes) {
  std::error_code ec;
  auto size = fs::file_size(path, ec);
  if (ec) return caf::make_error(errc::data_not_found, "data_ref: " + ref + ": " + ec.message());
  if (size > max_bytes)
    return caf::make_error(errc::invalid_data, "data_ref: " + ref + " has " + std::to_string(size) +
                                                   " bytes, over the " + std::to_string(max_bytes) +
                                                   " allowed");
  std::ifstream in(path, std::ios::binary);
  if (!in) return caf::make_error(errc::data_not_found, "data_ref: " + ref + " cannot be read");
  std::stringstream ss;
  ss << in.rdbuf();
  auto text = ss.str();
  if (messages::repair_utf8(text) != text)
    return caf::make_error(errc::invalid_data, "data_ref: " + ref + " is not valid UTF-8");
  std::vector<std::string> entries;
  std::string cur, line;
  std::istringstream lines(text);
  auto flush = [&] {
    if (cur.find_first_not_of(" \t\r\n") != std::string::npos) entries.push_back(cur);
    cur.clear();
  };
  while (std::getline(lines, line)) {
    if (line == "%" || line == "%\r") {
      flush();
      continue;
    }
    cur += line;
    cur += '\n';
  }
  flush();
  if (entries.empty())
    return caf::make_error(errc::invalid_data, "data_ref: " + ref + " holds no text");
  return entries;
}

}  // namespace tailor::actors
