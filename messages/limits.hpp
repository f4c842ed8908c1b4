#pragma once

#include <cstddef>
#include <cstdint>

namespace tailor::messages {

// Bounds of a grantable onboarding request; out of them is `out_of_bounds`.
struct hyperparameter_bounds {
  int64_t min_rank = 1, max_rank = 16;  // serving banks are sized for it
  double min_alpha = 0.0, max_alpha = 1024.0;
  int64_t min_steps = 1, max_steps = 10000;
  double min_learning_rate = 1e-7, max_learning_rate = 1.0;
  int64_t min_batch_size = 1, max_batch_size = 256;
};

// Size limits of incoming events; over one is `too_large` (tailor.dlq).
struct limits {
  std::size_t max_event_bytes = 1 << 20;
  std::size_t max_texts = 10000;
  std::size_t max_texts_bytes = 512 * 1024;
  std::size_t max_prompts = 16;
  std::size_t max_prompt_bytes = 8 * 1024;
  std::size_t max_stops = 4;
  std::size_t max_stop_bytes = 64;
  std::size_t max_data_ref_bytes = 1024;
  int64_t max_tokens = 4096;
  hyperparameter_bounds hyperparameters;
};

}  // namespace tailor::messages
