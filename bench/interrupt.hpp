#pragma once

#include <stdexcept>

namespace tailor::bench {

// SIGINT (Ctrl-C) or SIGTERM during a run that owns a tailord, topics or a
// broker: the run's waits call throw_if_interrupted(), which unwinds it
// through its destructors, so that its tailord stops, its topics and
// consumer groups are deleted and the broker it started stops, as when it
// ends. A second signal ends the bench at once (the default action).
struct interrupted_error : std::runtime_error {
  explicit interrupted_error(int sig);
  int signal;
};

// From now on, the first SIGINT or SIGTERM is caught.
void catch_interrupts();
// Throws interrupted_error once a caught signal came.
void throw_if_interrupted();

}  // namespace tailor::bench
