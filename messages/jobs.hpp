#pragma once

#include <atomic>
#include <caf/meta/type_name.hpp>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "messages/errc.hpp"
#include "messages/events.hpp"
#include "messages/records.hpp"

// What a job actor hands a training slot, and what comes back.
namespace tailor::messages {

// Hyperparameters with every value set: a request's, completed by the
// configured defaults (`training.rank` ... `training.seed`).
struct hyperparameter_values {
  int64_t rank = 8;
  double alpha = 16.0;
  // 0: from the user's data (model::steps_for_data: two passes over it,
  // 100 to 1200 steps); at 3e-3 (the quality benchmark's sweep, docs/models.md).
  int64_t steps = 0;
  double learning_rate = 3e-3;
  int64_t batch_size = 8;
  uint64_t seed = 0;
};

inline hyperparameter_values resolve(const hyperparameters& given,
                                     const hyperparameter_values& defaults) {
  return {given.rank.value_or(defaults.rank),
          given.alpha.value_or(defaults.alpha),
          given.steps.value_or(defaults.steps),
          given.learning_rate.value_or(defaults.learning_rate),
          given.batch_size.value_or(defaults.batch_size),
          given.seed.value_or(defaults.seed)};
}

// One job's training, fully resolved: hyperparameters with defaults applied.
// Local only (it carries the cancellation flag the slot polls between
// steps), so it has no inspect and never leaves the process.
struct training_order {
  std::string job_id;
  std::string request_id;
  std::string user_id;
  std::string model_id;
  std::string base_model;
  std::vector<std::string> texts;  // inline texts, or ...
  std::string data_ref;            // ... a file under the training data directory
  hyperparameter_values hp;
  std::vector<std::string> prompts;
  std::shared_ptr<std::atomic<bool>> cancel;
  // Set when the job's actor has failed: the slot stops before its next
  // step and keeps the checkpoint, which the job's fresh actor resumes.
  std::shared_ptr<std::atomic<bool>> abandon;
};

struct training_outcome {
  std::string status;  // done | cancelled | failed
  errc code = errc::none;
  std::string message;
  bool transient = false;  // a failure worth retrying
  std::string artifact_path;
  std::string checksum;
  training_summary training;
  std::vector<outgoing_message> results;  // the prompts' generations
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, training_outcome& x) {
  return f(caf::meta::type_name("training_outcome"), x.status, x.code, x.message, x.transient,
           x.artifact_path, x.checksum, x.training, x.results);
}

}  // namespace tailor::messages
