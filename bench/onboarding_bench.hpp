#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace tailor::bench {

struct onboarding_options {
  int jobs = 1000;
  int slots = 2;
  int steps = 5;
  int admission_queue = 32;
  double timeout_minutes = 60;
  std::string bootstrap;  // empty: start a broker
  bool keep_topics = false;  // on a given broker, after the run (engine_run_options)
  std::string tailord = TAILORD_PATH;
  int store_memory_mb = -1;  // tailord's store_memory_mb; -1: its default
  int text_bytes = 0;        // one more text of this size per request (a user's own writing)
  std::string tailord_config;  // an operator's tailord configuration to start from
  double settle_seconds = 30;  // after the spike: up to this long for tailord's idle trim
};

// A sign-up spike: N onboarding requests published as fast as possible to a
// tailord of its own; waits until every job has ended and reports what
// happened to them, the engine's memory, and how busy the training slots were.
nlohmann::json run_onboarding_spike(const onboarding_options& o);

}  // namespace tailor::bench
