#pragma once

// Pre-training of a base model on the English fortune corpus, with a time
// budget, and the cache of pre-trained bases under $TAILOR_HOME/models.
#include <caf/expected.hpp>
#include <functional>
#include <string>

#include "model/transformer.hpp"

namespace tailor::model {

struct pretrain_options {
  double minutes = 10.0;  // time budget
  int64_t max_steps = 0;  // 0: until the budget is spent
  double learning_rate = 3e-3;
  int64_t batch_size = 16;
  int64_t seq_len =
      128;  // capped at the model's context; shorter windows start at random positions
  double warmup_fraction = 0.03;  // of the budget (time or steps)
  double min_lr_fraction = 0.1;
  double weight_decay = 0.01;
  double grad_clip = 1.0;
  uint64_t seed = 0;
  int held_out_percent = 5;
};

struct pretrain_progress {
  int64_t step = 0;
  double elapsed_s = 0, budget_s = 0;
  double loss = 0;
  double tokens_per_s = 0;
};

struct pretrain_result {
  base_weights base;
  int64_t steps = 0;
  int64_t tokens = 0;
  double seconds = 0;
  double held_out_bits_per_byte = 0;
  std::size_t train_entries = 0, held_out_entries = 0;
};

// Named base model configurations; "tailor-base" is the default.
caf::expected<model_config> named_config(const std::string& name);

// The pre-training corpus: English fortunes minus the quality benchmark's
// user files, split into train and held-out entries.
void pretraining_corpus(int held_out_percent, std::vector<std::string>& train,
                        std::vector<std::string>& held_out);

caf::expected<pretrain_result> pretrain(
    const model_config& cfg, const pretrain_options& opt,
    const std::function<void(const pretrain_progress&)>& progress = {});

// Where the pre-trained base `name` is cached.
std::string base_model_path(const std::string& name);

// Bits per byte of `base` on `entries` (end-of-text tokens included).
double bits_per_byte(const base_weights& base, const std::vector<std::string>& entries,
                     int64_t seq_len, int64_t max_windows = 512);

}  // namespace tailor::model

namespace tailor::model {

// The cached base `name` if there is one; otherwise pre-trains it with `opt`
// (reporting progress), caches it atomically, and returns it.
// What a cached base records about how it was made (safetensors metadata).
std::map<std::string, std::string> pretrain_metadata(const pretrain_result& r,
                                                     const pretrain_options& o);

// `path` overrides where the base is cached (default base_model_path(name)).
caf::expected<base_weights> load_or_pretrain(
    const std::string& name, const pretrain_options& opt,
    const std::function<void(const pretrain_progress&)>& progress = {},
    const std::string& path = {});

}  // namespace tailor::model
