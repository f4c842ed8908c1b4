#pragma once

#include <caf/typed_actor.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "actors/config.hpp"
#include "actors/egress.hpp"
#include "actors/gpu.hpp"
#include "actors/group_view.hpp"
#include "actors/metrics.hpp"
#include "actors/store_actor.hpp"
#include "actors/training_pool.hpp"
#include "messages/type_ids.hpp"

namespace tailor::actors {

using namespace tailor::messages;

// One per user with recent events: serializes the user's events (each is
// handled to the end before the next starts), deduplicates them by
// (user_id, request_id), decides the answer and persists it before replying.
// A granted onboarding request becomes a job: persisted, announced
// (job.queued) and submitted to the training pool before the reply, which is
// then empty; the offset is committed only after all of that.
// After `user_idle_seconds` without events it asks the registry to retire it;
// the registry's `stop` queues behind any event still being handled.
// A user.delete cancels the user's requests and jobs, waits for them to end
// (`erase` checks again), then deletes what is kept of the user; the user's
// events read meanwhile wait for it. Requests sent before the deletion and
// read after it are refused (user_deleted).
using user_actor = caf::typed_actor<
    caf::replies_to<handle_atom, incoming_event>::with<std::vector<outgoing_message>>,
    caf::reacts_to<idle_atom>, caf::reacts_to<erase_atom>, caf::reacts_to<stop_atom>>;

// Spawns user actors on a user's first event and forwards events to them.
// A user actor is retired only when it has handled every event routed to it,
// so no event is ever lost to passivation.
using registry_actor = caf::typed_actor<
    caf::replies_to<route_atom, incoming_event>::with<std::vector<outgoing_message>>,
    caf::reacts_to<idle_atom, std::string, uint64_t>>;

struct user_state {
  // An inference request on its way through a GPU actor; repeats of it that
  // arrive meanwhile wait for the same answer.
  struct pending {
    uint64_t payload_hash = 0;
    gpu_actor gpu;
    std::vector<caf::typed_response_promise<std::vector<outgoing_message>>> waiters;
  };
  std::string user_id;
  engine_config cfg;
  metadata_access db;
  egress_actor out;
  pool_actor pool;
  serving_routes routes;
  registry_actor registry;
  std::shared_ptr<group_view> group;  // jobs open on other instances
  std::shared_ptr<metrics> stats;
  std::map<std::string, pending> inflight;  // by request id
  // Times a request was in a GPU actor that failed, by request id, until it
  // is answered: one that keeps failing devices gets an error result.
  std::map<std::string, int> device_failures;
  static constexpr int max_device_failures = 3;
  // Answers generated whose storing failed (a full disk), by request id:
  // the ingress retries the event, which then stores this answer rather
  // than generate it again, each second for as long as the disk is full.
  struct unstored_answer {
    uint64_t payload_hash = 0;
    outgoing_message result;
  };
  std::map<std::string, unstored_answer> unstored;
  // Cancels of requests not in flight and not answered, oldest first: a
  // cancel and its request come on different topics, so the cancel may be
  // read first (minutes first, while backpressure holds inference), or
  // while its request waits to be sent again. The request then ends as
  // cancelled when it comes. Kept until that answer is stored, for
  // `early_cancel_wait`, or until `max_early_cancels` newer ones push it
  // out; the actor is not passivated while it keeps one.
  struct early_cancel {
    std::string request_id;
    std::chrono::steady_clock::time_point read;
  };
  std::deque<early_cancel> early_cancels;
  static constexpr std::size_t max_early_cancels = 256;
  static constexpr auto early_cancel_wait = std::chrono::minutes(10);
  // The newest ready model (none: the user has none), as read when the
  // store's models_generation was `generation`: every request without a
  // model_id needs it, and listing the models cost a quarter of the user
  // actors' time per request.
  struct newest_ready {
    uint64_t generation = 0;
    std::optional<messages::model_record> model;
  };
  std::optional<newest_ready> newest;
  // A user.delete under way, waiting for the user's requests and jobs to end.
  struct erasure {
    user_delete request;
    uint64_t payload_hash = 0;
    int64_t at_ms = 0;  // it covers what was sent until then
    caf::typed_response_promise<std::vector<outgoing_message>> rp;
    std::chrono::steady_clock::time_point deadline;
  };
  std::optional<erasure> erasing;
  static constexpr auto erasure_wait = std::chrono::minutes(10);
  // Events read while a deletion is under way, handled once it ends.
  std::deque<
      std::pair<incoming_event, caf::typed_response_promise<std::vector<outgoing_message>>>>
      held;
  // When the user was last deleted (0: never), once read from the store.
  std::optional<int64_t> erased_at;
  uint64_t handled = 0;
  uint64_t handled_at_last_check = 0;
  static inline const char* name = "tailor.user";
};

struct registry_state {
  struct entry {
    user_actor actor;
    uint64_t routed = 0;
  };
  engine_config cfg;
  metadata_access db;
  egress_actor out;
  pool_actor pool;
  serving_routes routes;
  std::shared_ptr<group_view> group;
  std::shared_ptr<metrics> stats;
  std::unordered_map<std::string, entry> users;
  static inline const char* name = "tailor.registry";
};

user_actor::behavior_type user(user_actor::stateful_pointer<user_state> self, std::string user_id,
                               engine_config cfg, metadata_access db, egress_actor out,
                               pool_actor pool, serving_routes routes, registry_actor registry,
                               std::shared_ptr<group_view> group, std::shared_ptr<metrics> stats);

registry_actor::behavior_type registry(registry_actor::stateful_pointer<registry_state> self,
                                       engine_config cfg, metadata_access db, egress_actor out,
                                       pool_actor pool, serving_routes routes,
                                       std::shared_ptr<group_view> group,
                                       std::shared_ptr<metrics> stats);

}  // namespace tailor::actors
