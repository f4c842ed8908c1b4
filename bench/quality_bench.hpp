#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace tailor::bench {

struct quality_options {
  std::string config = "tailor-base";
  int64_t steps = 300;
  int64_t batch_size = 8;
  int64_t seq_len = 128;
  double learning_rate = 3e-3;
  int64_t rank = 8;
  double alpha = 16;
  bool mlp = false;  // adapters on the MLP projections too
  int64_t eval_windows = 128;
  double pretrain_minutes = 10;
};

// Personalization that is real and belongs to its user: eight users (six
// English fortune files held out of pre-training, all German, all Spanish
// fortunes) each get an adapter; every user's held-out bits/byte is measured
// under the base, their own adapter and every other user's adapter.
nlohmann::json run_quality(const quality_options& o);

}  // namespace tailor::bench
