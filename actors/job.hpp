#pragma once

#include <atomic>
#include <caf/actor.hpp>
#include <caf/typed_actor.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <caf/typed_response_promise.hpp>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "actors/config.hpp"
#include "actors/egress.hpp"
#include "actors/metrics.hpp"
#include "actors/store_actor.hpp"
#include "actors/trainer.hpp"
#include "messages/events.hpp"
#include "messages/type_ids.hpp"

namespace tailor::actors {

// What a job actor tells the training pool that owns it: its slot is free
// (`release`), it waits for a slot again after a backoff (`requeue`), it has
// ended (`done`). The pool's full interface extends this one.
using job_owner = caf::typed_actor<caf::reacts_to<release_atom, std::string>,
                                   caf::reacts_to<requeue_atom, std::string>,
                                   caf::reacts_to<done_atom, std::string>>;

// One per fine-tuning job: drives queued -> admitted -> training -> saving ->
// ready, or retrying / failed / cancelled. Every transition is persisted
// before it is announced on tailor.events. `admit` hands it a training slot
// (a trainer_actor, as an untyped handle); `started`, `progress` and `saving`
// come from that slot; `cancel` answers once the job has stopped (or at once
// when it cannot be cancelled any more); `done` announces a final state
// found at recovery and ends the actor. `moved` says that another instance
// ran the job to its end: it stops at its next step, unless it is saving,
// and becomes `moved` without a word on tailor.events.
using job_actor =
    caf::typed_actor<caf::reacts_to<admit_atom, caf::actor>, caf::reacts_to<started_atom>,
                     caf::reacts_to<progress_atom, int64_t, int64_t, double>,
                     caf::reacts_to<saving_atom>,
                     caf::replies_to<cancel_atom>::with<std::vector<outgoing_message>>,
                     caf::reacts_to<requeue_atom>, caf::reacts_to<done_atom>,
                     caf::reacts_to<moved_atom, std::string>>;

struct job_state {
  job_record job;
  engine_config cfg;
  store_actor db;
  egress_actor out;
  job_owner pool;
  std::shared_ptr<metrics> stats;
  std::shared_ptr<std::atomic<bool>> cancel = std::make_shared<std::atomic<bool>>(false);
  std::shared_ptr<std::atomic<bool>> abandon;  // the pool's: set once this actor has failed
  std::vector<caf::typed_response_promise<std::vector<outgoing_message>>> cancel_waiters;
  bool in_slot = false;
  // A run ordered and its outcome not yet back: a failed write then stops
  // the run (through `abandon`) and parks the job once it is back, never
  // while the slot still runs it.
  bool running = false;
  bool park_after_run = false;
  int full_disk_waits = 0;  // runs ended by a full disk: its backoff doubles with each
  std::string moved_to;  // the instance that ended the job, once told
  static inline const char* name = "tailor.job";
};

// `abandon`: the pool sets it when this actor fails, so that a training run
// it ordered stops at its next step rather than run on beside the job's
// fresh actor; the actor sets it when the store cannot record the run's
// progress, and clears it once the run has stopped.
job_actor::behavior_type job(job_actor::stateful_pointer<job_state> self, job_record rec,
                             engine_config cfg, store_actor db, egress_actor out, job_owner pool,
                             std::shared_ptr<metrics> stats,
                             std::shared_ptr<std::atomic<bool>> abandon);

// The model a job registers: derived from the job id, so a retried or
// resumed job can only ever register one.
std::string model_id_for(const std::string& job_id);

// The answer to a job.cancel that cannot be granted.
outgoing_message cancel_rejected(const std::string& job_id, const std::string& request_id,
                                 const std::string& user_id, errc code, std::string message);

// The job event of `type` for `job`: with its error for failures, with how
// its training went for model.ready.
outgoing_message job_event_message(const job_record& job, const std::string& type,
                                   std::optional<training_summary> training = std::nullopt);

// The ready model `job` made, as the group's other instances read it on
// tailor.state: its artifact's path relative to `artifact_dir`, and the
// job's request.
outgoing_message model_state_message(const model_record& model, const job_record& job,
                                     const std::string& artifact_dir);

// `job` as the group's other instances read it on tailor.state, run by
// instance `owner`: closed when final, else open (queued) with its request,
// so that another instance can take it over if `owner` is gone.
outgoing_message job_state_message(const job_record& job, const std::string& owner);

// A cancel of open job `open`, passed on through tailor.state to the
// instance that runs it: the job's record, now `cancelling`.
outgoing_message cancelling_message(messages::job_state_record open);

}  // namespace tailor::actors
