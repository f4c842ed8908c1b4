#pragma once

// LoRA fine-tuning of one adapter on one user's texts: AdamW, linear
// warm-up then cosine decay, gradient clipping, a deterministic
// train/validation split, early stopping, progress reports, cancellation
// between steps, and checkpoints from which a run resumes with the same
// result as an uninterrupted one.
#include <caf/expected.hpp>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "model/transformer.hpp"

namespace tailor::model {

struct train_options {
  // 0: from the data, enough for `data_epochs` passes over the training
  // split (batch_size windows of seq_len tokens a step), within
  // [min_data_steps, max_data_steps]: a few KB of texts trains briefly, a
  // large corpus gets more than a sample of its tokens (docs/models.md).
  int64_t steps = 100;
  double data_epochs = 2.0;
  int64_t min_data_steps = 100;
  int64_t max_data_steps = 1200;
  double learning_rate = 2e-3;
  // Steps from the data only: when min_data_steps makes more than
  // data_epochs passes over a small training split, the peak learning rate
  // is multiplied by (data_epochs / passes)^small_data_lr_power, so that a
  // user's few texts are not learned by heart within the first evaluations
  // (docs/models.md, "A few texts"). 0: never scaled.
  double small_data_lr_power = 0.5;
  int64_t batch_size = 8;
  int64_t seq_len = 128;  // capped at the model's context; 128: the quality sweep's
  double weight_decay = 0.0;
  double warmup_fraction = 0.1;
  double min_lr_fraction = 0.1;  // cosine decays to this fraction of the peak
  double grad_clip = 1.0;
  double validation_fraction = 0.1;
  int64_t eval_every = 10;
  int64_t patience = 0;  // evaluations without improvement before stopping; 0: never stop early
  int64_t checkpoint_every = 0;  // 0: no checkpoints
  std::string checkpoint_path;   // resumes from here when the file exists
  uint64_t seed = 0;
};

struct train_progress {
  int64_t step = 0, steps = 0;
  double loss = 0;
  std::optional<double> validation_loss;
};

struct train_result {
  // The best adapter by validation loss, the untrained one (the base's
  // outputs) included; the last one without validation texts.
  lora_adapter adapter;
  int64_t steps_done = 0;
  int64_t best_step = 0;  // the step `adapter` is of: 0 for the untrained one
  int64_t train_texts = 0, validation_texts = 0;
  double learning_rate = 0;               // the peak it trained at
  double train_loss = 0;                  // of the last step
  std::optional<double> validation_loss;  // of the returned adapter
  double initial_validation_loss = 0;     // before training (the base alone)
  bool stopped_early = false;
  bool cancelled = false;
  // Why the checkpoint found at the start could not be read (then the run
  // started over); empty when there was none or it was read.
  std::string checkpoint_dropped;
};

using progress_fn = std::function<void(const train_progress&)>;
using cancel_fn = std::function<bool()>;

// Tokens of entries as one stream: each entry is preceded by end-of-text,
// so that the model learns where an entry starts and ends.
std::vector<int64_t> token_stream(const std::vector<std::string>& entries);

// Mean next-token loss (nats) of `adapter` (may be null) over `stream`, in
// non-overlapping windows of `seq_len`, at most `max_windows` of them.
double evaluate(const base_weights& base, const lora_adapter* adapter,
                const std::vector<int64_t>& stream, int64_t seq_len, int64_t max_windows = 64);

// The step count that `steps` = 0 stands for, for `train_tokens` tokens.
int64_t steps_for_data(const train_options& o, int64_t train_tokens);

// The peak learning rate that `steps` = 0 trains `train_tokens` tokens at
// (small_data_lr_power).
double learning_rate_for_data(const train_options& o, int64_t train_tokens);

// A checkpoint that cannot be written ends the run with checkpoint_failed,
// or with storage::errc::no_space when the disk is full.
caf::expected<train_result> train_lora(const base_weights& base,
                                       const std::vector<std::string>& texts, const lora_config& lc,
                                       const train_options& opt, const progress_fn& progress = {},
                                       const cancel_fn& cancelled = {});

}  // namespace tailor::model
