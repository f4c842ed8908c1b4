#include "interrupt.hpp"

#include <atomic>
#include <csignal>
#include <string>

namespace tailor::bench {

namespace {

std::atomic<int> caught{0};

extern "C" void on_interrupt(int sig) {
  caught.store(sig);
  // The next signal, either one, finds the default action: it ends the bench.
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  ::sigaction(SIGINT, &dfl, nullptr);
  ::sigaction(SIGTERM, &dfl, nullptr);
}

}  // namespace

interrupted_error::interrupted_error(int sig)
    : std::runtime_error(std::string("interrupted by ") + (sig == SIGINT ? "SIGINT" : "SIGTERM") +
                         "; the run's tailord, topics and broker were cleaned up"),
      signal(sig) {}

void catch_interrupts() {
  struct sigaction sa {};
  sa.sa_handler = on_interrupt;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
}

void throw_if_interrupted() {
  if (const int sig = caught.load(); sig != 0) throw interrupted_error(sig);
}

}  // namespace tailor::bench
