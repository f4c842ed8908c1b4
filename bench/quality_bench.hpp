#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "messages/jobs.hpp"
#include "model/trainer.hpp"

namespace tailor::bench {

// The recipe defaults to onboarding's defaults, so that the figures are
// those of an onboarding request that leaves its hyperparameters out.
struct quality_options {
  std::string config = "tailor-base";
  int64_t steps = messages::hyperparameter_values{}.steps;
  int64_t batch_size = messages::hyperparameter_values{}.batch_size;
  int64_t eval_window = 128;  // tokens per held-out window; training uses onboarding's windows
  double learning_rate = messages::hyperparameter_values{}.learning_rate;
  int64_t rank = messages::hyperparameter_values{}.rank;
  double alpha = messages::hyperparameter_values{}.alpha;
  bool mlp = false;  // adapters on the MLP projections too
  int64_t eval_windows = 128;
  double pretrain_minutes = 10;
  // A user with a few texts: each user gives only this many of their
  // training entries (drawn by texts_seed); 0: all of them.
  int64_t texts = 0;
  uint64_t texts_seed = 0;
  double validation_fraction = model::train_options{}.validation_fraction;
  int64_t eval_every = model::train_options{}.eval_every;  // onboarding's
  double small_data_lr_power = model::train_options{}.small_data_lr_power;  // onboarding's
};

// Personalization that is real and belongs to its user: eight users (six
// English fortune files held out of pre-training, all German, all Spanish
// fortunes) each get an adapter; every user's held-out bits/byte is measured
// under the base, their own adapter and every other user's adapter.
nlohmann::json run_quality(const quality_options& o);

}  // namespace tailor::bench
