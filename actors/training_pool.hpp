#pragma once

#include <atomic>
#include <caf/typed_actor.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <deque>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "actors/config.hpp"
#include "actors/egress.hpp"
#include "actors/job.hpp"
#include "actors/metrics.hpp"
#include "actors/store_actor.hpp"
#include "actors/trainer.hpp"
#include "messages/type_ids.hpp"

namespace tailor::actors {

// Owns the training slots, the admission queue and a job actor per job in
// flight. `submit` takes a persisted (queued) job; a job waits in the queue
// until a slot has room: each slot holds the job it runs and the next one, so
// a slot never waits for the bookkeeping between two jobs. The queue's length
// is published in `metrics`, where the ingress reads it to pause onboarding
// when the queue is full (the backlog stays in Kafka). `count` answers a
// user's jobs in flight (the per-user quota), `cancel` reaches a job
// wherever it is, `recover` resubmits the jobs a previous run left
// unfinished, and `stop` interrupts running jobs at their next step (they
// resume from their checkpoints at the next start). `restart` is its own
// delayed message to itself: a job whose actor failed starts again.
// `moved` (job, instance) says another instance ran the job to its end:
// its actor here stops it quietly (a job not here is left alone).
using pool_actor = job_owner::extend<
    caf::replies_to<submit_atom, job_record>::with<caf::ok_atom>,
    caf::replies_to<count_atom, std::string>::with<int64_t>,
    caf::replies_to<cancel_atom, std::string>::with<std::vector<outgoing_message>>,
    caf::replies_to<recover_atom>::with<caf::ok_atom>,
    caf::replies_to<stop_atom>::with<caf::ok_atom>, caf::reacts_to<restart_atom, std::string>,
    caf::reacts_to<moved_atom, std::string, std::string>>;

struct pool_state {
  struct entry {
    job_actor actor;
    std::string user_id;
    int slot = -1;  // -1: not on a slot
    // Set when the actor fails: a run it ordered stops at its next step.
    std::shared_ptr<std::atomic<bool>> abandon;
  };
  struct slot {
    trainer_actor trainer;
    std::vector<std::string> assigned;  // running first, then the next in line
  };
  engine_config cfg;
  store_actor db;
  egress_actor out;
  std::shared_ptr<metrics> stats;
  std::shared_ptr<std::atomic<bool>> shutdown = std::make_shared<std::atomic<bool>>(false);
  std::vector<slot> slots;
  std::deque<std::string> queue;
  std::unordered_map<std::string, entry> jobs;
  std::unordered_map<std::string, int64_t> per_user;
  // Failures of a job's actors (a bug, not the job's own failures, which it
  // retries itself) and the last one's reason, by job id, until the job
  // starts again for good or fails.
  struct actor_failures {
    int count = 0;
    std::string last;
  };
  std::unordered_map<std::string, actor_failures> job_actor_failures;
  static constexpr int max_job_actor_failures = 3;
  bool admitted_any = false;
  std::vector<caf::typed_response_promise<caf::ok_atom>> stop_waiters;
  static inline const char* name = "tailor.training_pool";
};

pool_actor::behavior_type training_pool(pool_actor::stateful_pointer<pool_state> self,
                                        engine_config cfg, store_actor db, egress_actor out,
                                        std::shared_ptr<metrics> stats,
                                        std::shared_ptr<const base_models> bases);

}  // namespace tailor::actors
