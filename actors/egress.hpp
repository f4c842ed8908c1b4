#pragma once

#include <librdkafka/rdkafkacpp.h>

#include <caf/typed_actor.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <caf/typed_response_promise.hpp>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "actors/config.hpp"
#include "actors/kafka.hpp"
#include "actors/metrics.hpp"
#include "messages/type_ids.hpp"

namespace tailor::actors {

using namespace tailor::messages;

// The process's one Kafka producer. `publish` answers once every message of
// the batch has a successful delivery report (acks=all, idempotent), or with
// an error naming the first failure. Runs detached. `poll` serves delivery
// reports, sent by librdkafka's wake-up when they arrive; `tick` does too,
// every 100 ms while some are awaited, as a safety net.
using egress_actor = caf::typed_actor<
    caf::replies_to<publish_atom, std::vector<outgoing_message>>::with<caf::ok_atom>,
    caf::reacts_to<poll_atom>, caf::reacts_to<tick_atom>>;

struct egress_state {
  struct pending {
    caf::typed_response_promise<caf::ok_atom> promise;
    std::size_t remaining = 0;
    std::string error;
  };
  kafka_config cfg;
  std::shared_ptr<metrics> stats;
  std::unique_ptr<RdKafka::DeliveryReportCb> on_delivery;
  std::unique_ptr<RdKafka::Producer> producer;
  std::unique_ptr<queue_wakeup> wakeup;  // reset before the producer goes
  std::map<uint64_t, pending> batches;
  uint64_t next_batch = 1;
  bool ticking = false;  // the safety net's poll is scheduled
  ~egress_state();
  static inline const char* name = "tailor.egress";
};

// Creates the producer; on failure `err` is set and null is returned, so the
// caller can report it before any actor runs.
std::unique_ptr<RdKafka::Producer> make_producer(const kafka_config& cfg,
                                                 RdKafka::DeliveryReportCb* cb, std::string& err);

egress_actor::behavior_type egress(egress_actor::stateful_pointer<egress_state> self,
                                   kafka_config cfg, std::shared_ptr<metrics> stats);

}  // namespace tailor::actors
