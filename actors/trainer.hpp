#pragma once

#include <atomic>
#include <caf/typed_actor.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <memory>
#include <string>

#include "actors/config.hpp"
#include "actors/metrics.hpp"
#include "messages/type_ids.hpp"

namespace tailor::actors {

using namespace tailor::messages;

// The engine's base models, loaded once and shared read-only by every
// training slot (defined in trainer.cpp, so that only it includes LibTorch).
struct base_models;

// Loads every configured base model (pre-training one that is missing, with
// the configured budget) and sets the process's thread counts. Null and
// `err` set on failure.
std::shared_ptr<const base_models> load_base_models(const engine_config& cfg, std::string& err);

// One training slot: runs one job at a time on a thread of its own
// (detached), with the shared base kept warm. For each order it reports
// `started`, `progress` (at a bounded rate) and `saving` to the job actor that
// sent it, and answers with the outcome: the adapter written to the artifact
// store with its checksum, and the prompts' generations. It stops between
// steps when the job is cancelled or the engine shuts down (status
// `interrupted`; a checkpoint lets the job resume at the next start).
using trainer_actor =
    caf::typed_actor<caf::replies_to<train_atom, training_order>::with<training_outcome>>;

struct trainer_state {
  int slot = 0;
  engine_config cfg;
  std::shared_ptr<const base_models> bases;
  std::shared_ptr<metrics> stats;
  std::shared_ptr<std::atomic<bool>> shutdown;
  static inline const char* name = "tailor.trainer";
};

trainer_actor::behavior_type trainer(trainer_actor::stateful_pointer<trainer_state> self, int slot,
                                     engine_config cfg, std::shared_ptr<const base_models> bases,
                                     std::shared_ptr<metrics> stats,
                                     std::shared_ptr<std::atomic<bool>> shutdown);

// Where the checkpoint of `job_id` lives (the adapter: storage::store_adapter).
std::string checkpoint_path(const engine_config& cfg, const std::string& job_id);

}  // namespace tailor::actors
