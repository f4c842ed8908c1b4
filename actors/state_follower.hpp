#pragma once

#include <librdkafka/rdkafkacpp.h>

#include <caf/typed_actor.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "actors/config.hpp"
#include "actors/egress.hpp"
#include "actors/group_view.hpp"
#include "actors/kafka.hpp"
#include "actors/metrics.hpp"
#include "actors/training_pool.hpp"
#include "messages/events.hpp"
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
//
// It also follows the group's open jobs and its instances' heartbeats. An
// open job whose instance has not been heard from for
// instance.takeover_after_ms is taken over by one live instance (the same
// for every instance that sees the same heartbeats: taker_of): that one
// imports the job, hands it to its pool and publishes the job again as its
// own. At its first catch-up (`hand_over`), jobs of this instance that
// another took over while this one was gone become `moved`, before the
// pool resumes unfinished jobs. A job of this instance that another marked
// `cancelling` (it read the job's cancel) is cancelled here, and the
// requester answered from here; one of a silent instance is closed as
// cancelled by its taker, without running. The open jobs it keeps in
// `group` (shared with the user actors, which pass cancels on).
//
// `catch_up` is answered once every partition has been read up to where
// it ended when the follower started: the supervisor recovers the last
// run's jobs and starts the ingress only then. `poll` drains the consumer
// (sent by librdkafka's wake-up); `tick` is the safety net, logs progress
// while catching up and looks for jobs to take over.
using state_follower_actor =
    caf::typed_actor<caf::replies_to<catch_up_atom>::with<caf::ok_atom>,
                     caf::reacts_to<poll_atom>, caf::reacts_to<tick_atom>>;

struct state_follower_state {
  engine_config cfg;
  std::shared_ptr<storage::metadata_store> db;
  std::shared_ptr<metrics> stats;
  pool_actor pool;
  egress_actor out;
  bool hand_over = false;
  // The group's open jobs, by id, as last published (their owner among
  // them), and when each instance was last heard from.
  std::shared_ptr<group_view> group;
  // What the topic shows, until this follower has read it all: then it
  // replaces `group` whole. A follower started again after one failed
  // leaves the last view in place meanwhile, not an empty one.
  std::unique_ptr<group_view> reading;
  // Jobs of this instance that another instance marked `cancelling`, each
  // with whether the pool has been asked to cancel it (answered: erased).
  std::map<std::string, bool> cancels;
  // Open jobs of silent instances published without their request, which
  // no other instance can run (logged once each).
  std::set<std::string> untakeable;
  // While catching up the first time: each job on the topic with the owner
  // its last record names (another owner: the job is handed over), and the
  // models there; what this instance has beyond them is published then
  // (publish_missing).
  std::map<std::string, std::string> last_owner;
  std::set<std::string> seen_models;
  std::set<std::pair<std::string, int64_t>> newer_kinds;  // logged once each
  static constexpr std::size_t max_newer_kinds = 64;
  std::unique_ptr<RdKafka::EventCb> events;  // watch_brokers; outlives the consumer
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
    std::shared_ptr<storage::metadata_store> db, std::shared_ptr<metrics> stats,
    pool_actor pool, egress_actor out, std::shared_ptr<group_view> group, bool hand_over);

// Which of the `live` instances takes over job `job_id` of an instance that
// is gone: the highest hash of (instance, job), so every instance that sees
// the same live ones picks the same, and a lost instance's jobs spread over
// them. Empty when none is live.
std::string taker_of(const std::string& job_id, const std::vector<std::string>& live);

}  // namespace tailor::actors
