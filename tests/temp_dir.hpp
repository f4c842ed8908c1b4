#pragma once

// A test's own directory under the system's temporary one, removed when the
// test ends, also when an assertion ended it early.
#include <unistd.h>

#include <filesystem>
#include <string>
#include <system_error>

namespace tailor::test {

class temp_dir {
 public:
  // /tmp/tailor-NAME-PID: one per process and name, so that tests running
  // in parallel processes do not share one.
  explicit temp_dir(const std::string& name)
      : path_(std::filesystem::temp_directory_path() /
              ("tailor-" + name + "-" + std::to_string(::getpid()))) {
    std::filesystem::remove_all(path_);  // an earlier process's of the same pid
    std::filesystem::create_directories(path_);
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;

  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

}  // namespace tailor::test
