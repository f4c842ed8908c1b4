#pragma once

// A one-line progress bar on stderr: redrawn in place on a terminal at most
// 4 times a second, a plain line every 10 s otherwise (logs, CI).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>

namespace tailor::cli {

class progress_bar {
 public:
  progress_bar() : tty_(::isatty(2) != 0) {}
  // `fraction` in [0, 1]; `text` follows the bar.
  void update(double fraction, const std::string& text, bool force = false) {
    auto now = std::chrono::steady_clock::now();
    auto gap = tty_ ? std::chrono::milliseconds(250) : std::chrono::milliseconds(10000);
    if (!force && now - last_ < gap) return;
    last_ = now;
    int filled = static_cast<int>(std::clamp(fraction, 0.0, 1.0) * 30);
    std::string bar(filled, '#');
    bar.resize(30, '.');
    std::fprintf(stderr, tty_ ? "\r[%s] %3.0f%% %s\033[K" : "[%s] %3.0f%% %s\n", bar.c_str(),
                 fraction * 100, text.c_str());
    std::fflush(stderr);
  }
  void done() {
    if (tty_) std::fprintf(stderr, "\n");
  }

 private:
  bool tty_;
  std::chrono::steady_clock::time_point last_{};
};

inline std::string format_duration(double seconds) {
  auto s = static_cast<long>(seconds + 0.5);
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%ld:%02ld", s / 60, s % 60);
  return buf;
}

}  // namespace tailor::cli
