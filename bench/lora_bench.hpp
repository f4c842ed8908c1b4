#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace tailor::bench {

struct lora_options {
  int batch = 32;
  int adapters = 32;
  int rank = 8;
  bool mlp = false;  // adapters on the MLP projections too
  int prompt_tokens = 32;
  int new_tokens = 32;
  int repeats = 3;  // each figure is the median of this many runs
  int loads = 200;
  std::string config = "tailor-base";
};

// Decode throughput of one batch whose rows each use their own adapter
// (gathered path) against the dense model (one adapter merged: the ceiling)
// and against the same requests served one at a time, each merged.
nlohmann::json run_lora(const lora_options& o);

}  // namespace tailor::bench
