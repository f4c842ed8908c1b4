#include "model/corpus.hpp"

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "messages/events.hpp"

namespace tailor::model {

const std::vector<std::string>& held_out_user_files() {
  static const std::vector<std::string> files = {"science", "love",     "food",
                                                 "sports",  "medicine", "literature"};
  return files;
}

std::vector<std::string> read_fortune_file(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> out;
  std::string entry, line;
  auto flush = [&] {
    while (!entry.empty() && (entry.back() == '\n' || entry.back() == ' ')) entry.pop_back();
    if (!entry.empty()) out.push_back(messages::repair_utf8(entry));
    entry.clear();
  };
  while (std::getline(in, line)) {
    if (line == "%") {
      flush();
      continue;
    }
    entry += line;
    entry += '\n';
  }
  flush();
  return out;
}

std::vector<std::string> english_fortune_files(const std::string& dir,
                                               const std::vector<std::string>& exclude) {
  namespace fs = std::filesystem;
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (!e.is_regular_file()) continue;
    auto name = e.path().filename().string();
    if (name.find('.') != std::string::npos) continue;  // .dat and .u8 indexes
    if (std::find(exclude.begin(), exclude.end(), name) != exclude.end()) continue;
    out.push_back(e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::string> fortune_files_in(const std::string& dir) {
  namespace fs = std::filesystem;
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    auto ext = e.path().extension().string();
    if (e.is_regular_file() && ext != ".dat" && ext != ".u8") out.push_back(e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

void split_by_hash(const std::vector<std::string>& entries, int percent,
                   std::vector<std::string>& train, std::vector<std::string>& held_out) {
  for (const auto& e : entries)
    (static_cast<int>(messages::fnv1a64(e) % 100) < percent ? held_out : train).push_back(e);
}

}  // namespace tailor::model
