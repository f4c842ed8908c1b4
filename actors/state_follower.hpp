#pragma once

#include <librdkafka/rdkafkacpp.h>

#include <caf/typed_actor.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "actors/config.hpp"
#include "actors/kafka.hpp"
#include "actors/metrics.hpp"
#include "messages/type_ids.hpp"
#include "storage/metadata_store.hpp"

namespace tailor::actors {

using namespace tailor::messages;

// Reads the compacted state topic (design section 6) from its beginning,
// every partition, and keeps following it: each ready model another
// instance of the group registered goes into this instance's metadata
// store, so that whichever instance a user's partition moves to serves
// the user's own model, and a fresh instance rebuilds the model registry
// from Kafka. It belongs to no consumer group and commits nothing: it
// reads the whole topic at each start (imports are idempotent).
// `catch_up` is answered once every partition has been read up to where
// it ended when the follower started: the supervisor starts the ingress
// only then. `poll` drains the consumer (sent by librdkafka's wake-up);
// `tick` is the safety net and logs progress while catching up.
using state_follower_actor =
    caf::typed_actor<caf::replies_to<catch_up_atom>::with<caf::ok_atom>,
                     caf::reacts_to<poll_atom>, caf::reacts_to<tick_atom>>;

struct state_follower_state {
  engine_config cfg;
  std::shared_ptr<storage::metadata_store> db;
  std::shared_ptr<metrics> stats;
  std::unique_ptr<RdKafka::KafkaConsumer> consumer;
  std::unique_ptr<queue_wakeup> wakeup;  // reset before the consumer closes
  // Per partition: the end offset when the follower started; erased once
  // read up to it.
  std::map<int32_t, int64_t> behind;
  std::chrono::steady_clock::time_point started, next_progress_log;
  int64_t read = 0, imported = 0;
  bool caught_up = false;
  std::vector<caf::typed_response_promise<caf::ok_atom>> catch_up_waiters;
  ~state_follower_state();
  static inline const char* name = "tailor.state_follower";
};

state_follower_actor::behavior_type state_follower(
    state_follower_actor::stateful_pointer<state_follower_state> self, engine_config cfg,
    std::shared_ptr<storage::metadata_store> db, std::shared_ptr<metrics> stats);

}  // namespace tailor::actors
