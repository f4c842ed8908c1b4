#pragma once

#include <librdkafka/rdkafkacpp.h>

#include <caf/typed_actor.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "actors/config.hpp"
#include "actors/egress.hpp"
#include "actors/kafka.hpp"
#include "actors/log_limit.hpp"
#include "actors/metrics.hpp"
#include "actors/reply_watch.hpp"
#include "actors/user.hpp"
#include "messages/type_ids.hpp"

namespace tailor::actors {

// The process's consumer-group member for all input topics: it parses each
// event, sends unreadable ones to the DLQ and readable ones to their user
// actor, publishes the answers, and commits an offset only once every event
// before it has been answered (persisted and delivered); under exactly-once
// output it sends each answer to the egress in its partition's order, with
// the offset that the egress's transaction commits. One consumer for all
// input topics, with the range assignor, keeps partition p of every topic on
// the same instance: a user's onboarding, inference and control events meet
// at one user actor (co-partitioning, as in Kafka Streams). A topic with too
// many events in flight is held (inference: its queue is not read; the
// others: their partitions are paused), so a backlog waits in Kafka rather
// than in memory. `poll` drains the queues (sent by librdkafka's wake-up
// when a queue turns non-empty, so the actor never
// blocks while answers wait in its mailbox); `tick` runs the timed chores
// (retries, commits, backpressure, lag) and drains as a safety net; `stop`
// commits what is done and leaves the group.
using ingress_actor = caf::typed_actor<caf::reacts_to<poll_atom>, caf::reacts_to<tick_atom>,
                                       caf::replies_to<stop_atom>::with<caf::ok_atom>>;

struct ingress_state {
  struct input {
    input_topic kind = input_topic::onboarding;
    int64_t in_flight = 0;
    bool paused = false;
  };
  struct partition_progress {
    std::map<int64_t, bool> outstanding;  // offset -> answered
    int64_t committable = -1;             // next offset to commit, -1: nothing new
    // Exactly-once output: answers wait here until every event before
    // theirs has had its answer sent to the egress, which commits each
    // offset with the answers up to it.
    std::map<int64_t, std::pair<std::shared_ptr<incoming_event>, std::vector<outgoing_message>>>
        held;
    int64_t sent_through = -1;  // the last offset whose answer went to the egress
  };
  using partition_key = std::pair<std::string, int32_t>;
  engine_config cfg;
  caf::actor_system* system = nullptr;  // for a blocking request in the rebalance callback
  std::map<std::string, input> inputs;  // by topic name
  registry_actor registry;
  egress_actor out;
  std::shared_ptr<metrics> stats;
  std::unique_ptr<RdKafka::RebalanceCb> on_rebalance;
  std::unique_ptr<RdKafka::EventCb> events;  // watch_brokers; outlives the consumer
  std::unique_ptr<RdKafka::KafkaConsumer> consumer;
  std::unique_ptr<queue_wakeup> wakeup;  // reset before the consumer closes
  // The inference partitions' events, kept apart from the other topics'
  // (each partition's queue forwards here). Backpressure stops reading this
  // queue instead of pausing the partitions: librdkafka stops fetching once
  // it holds queued.max.messages.kbytes, and a resume reads what is here at
  // once, where a resumed partition waited for the fetch in flight, up to
  // fetch.wait.max.ms. Destroyed after the consumer closes.
  rd_kafka_queue_s* inference_queue = nullptr;
  std::unique_ptr<queue_wakeup> inference_wakeup;  // reset before the queue goes
  // Answers without events (results, DLQ records) go out through a producer
  // of the ingress's own: their delivery reports come back on this thread,
  // not through the egress's (two thread hops fewer per request). Events
  // keep to the egress, so that a job's events stay in order.
  // Null under exactly-once output: every answer then goes through the
  // egress's transactions.
  std::unique_ptr<batch_producer> answers;
  std::unique_ptr<queue_wakeup> answers_wakeup;  // reset before the producer goes
  std::map<partition_key, partition_progress> partitions;
  std::shared_ptr<group_membership> membership;
  uint64_t epoch = 0;  // this ingress's, in every input_offset it sends
  bool stopping = false;
  bool dirty = false;  // committable offsets not yet committed
  uint64_t generation =
      0;  // bumped on every revoke: late answers of revoked partitions are dropped
  std::chrono::steady_clock::time_point next_commit{};
  // How long the ingress waits for an event's answer from its user actor
  // (watched in route_replies, see dispatch in ingress.cpp), and for the
  // egress to publish a job's events, before it tries again.
  static constexpr std::chrono::seconds route_timeout{120};
  reply_watch route_replies{route_timeout};
  // Events retried each second (a full disk fails them all): a line every
  // ten seconds, not one per event and second.
  log_limit retry_log{std::chrono::seconds(10)};
  // Events whose handling failed, re-run from the poll loop once due.
  std::deque<std::pair<std::chrono::steady_clock::time_point, std::function<void()>>> retries;
  ~ingress_state();
  static inline const char* name = "tailor.ingress";
};

ingress_actor::behavior_type ingress(ingress_actor::stateful_pointer<ingress_state> self,
                                     engine_config cfg, registry_actor registry, egress_actor out,
                                     std::shared_ptr<metrics> stats,
                                     std::shared_ptr<group_membership> membership);

}  // namespace tailor::actors
