#pragma once

#include <librdkafka/rdkafkacpp.h>

#include <caf/typed_actor.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <caf/typed_response_promise.hpp>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "actors/config.hpp"
#include "actors/fault.hpp"
#include "actors/kafka.hpp"
#include "actors/metrics.hpp"
#include "messages/type_ids.hpp"

namespace tailor::actors {

using namespace tailor::messages;

// A Kafka producer that reports on batches of messages: a batch is done once
// every message of it has a successful delivery report (acks=all,
// idempotent), or at its first failure. Reports, and so `done`, run inside
// poll() on the caller's thread.
class batch_producer {
 public:
  // Empty `error`: every message of the batch was delivered.
  using done_fn = std::function<void(const std::string& error)>;
  // Null, with `err` set, when the producer cannot be created.
  static std::unique_ptr<batch_producer> make(const kafka_config& cfg,
                                              std::shared_ptr<metrics> stats,
                                              const std::string& client_id, std::string& err);
  ~batch_producer();
  // Produces every message of `batch`; waits (polling) while librdkafka's
  // queue is full.
  void send(const std::vector<outgoing_message>& batch, done_fn done);
  void poll() { producer_->poll(0); }
  bool waiting() const { return !batches_.empty(); }
  // Waits up to `timeout_ms` for every report; false if some did not come.
  bool flush(int timeout_ms);
  // The batches not yet done are forgotten: their `done` is never called
  // (for an owner about to go, whose callbacks must not run any more).
  void forget() { batches_.clear(); }
  RdKafka::Producer& producer() { return *producer_; }
  // The fatal error librdkafka raised on this producer (the idempotent
  // producer's sequence broken, say), after which it fails every message
  // for good; empty while there is none.
  std::string fatal_error() const;
  // Replaces a producer that had a fatal error with a fresh one of the same
  // configuration, without waiting for the old one: its batches not yet
  // done end with `reason`, so that their owners send them again. False,
  // with `err`, when the fresh one cannot be created. The owner's wake-up
  // on the old producer must be gone before (renew_if_fatal).
  bool replace(const std::string& reason, std::string& err);

 private:
  class reports;
  struct pending {
    done_fn done;
    std::size_t remaining = 0;
    std::string error;
  };
  batch_producer() = default;
  bool create(std::string& err);
  void settle(uint64_t id, const std::string& topic, const std::string& error);
  kafka_config cfg_;
  std::string client_id_;
  topic_names topics_;  // where each channel goes
  std::shared_ptr<metrics> stats_;
  std::unique_ptr<RdKafka::DeliveryReportCb> on_delivery_;
  std::unique_ptr<RdKafka::Producer> producer_;
  std::map<uint64_t, pending> batches_;
  uint64_t next_batch_ = 1;
};

// The owner's side of batch_producer::replace: when `out` has had a fatal
// error, its wake-up goes, the producer is replaced and the wake-up made
// anew. Throws when no fresh producer can be created: the owner then fails
// and the supervisor restarts it, or stops the engine.
template <class Handle, class Self>
void renew_if_fatal(Self* self, batch_producer& out, std::unique_ptr<queue_wakeup>& wakeup) {
  const auto fatal = out.fatal_error();
  if (fatal.empty()) return;
  wakeup.reset();
  std::string err;
  if (!out.replace(fatal, err))
    throw std::runtime_error("a producer with a fatal error (" + fatal +
                             ") cannot be replaced: " + err);
  wakeup = poll_on_wakeup<Handle>(self, out.producer().c_ptr(), queue_wakeup::queue::main);
}

// The process's producer of events, and of what actors other than the
// ingress publish (the ingress publishes results and DLQ records with a
// batch_producer of its own, a thread hop closer to Kafka each way; answers
// with events come here, so that a job's events keep their order).
// `publish` answers once every message of
// the batch has a successful delivery report (acks=all, idempotent), or with
// an error naming the first failure. Runs detached. `poll` serves delivery
// reports, sent by librdkafka's wake-up when they arrive; `tick` does too,
// every 100 ms while some are awaited, as a safety net.
using egress_actor = caf::typed_actor<
    caf::replies_to<publish_atom, std::vector<outgoing_message>>::with<caf::ok_atom>,
    caf::reacts_to<poll_atom>, caf::reacts_to<tick_atom>>;

struct egress_state {
  std::unique_ptr<batch_producer> out;
  std::unique_ptr<queue_wakeup> wakeup;  // reset before the producer goes
  bool ticking = false;                  // the safety net's poll is scheduled
  fault_point fault_publish;  // TAILOR_FAULT_PUBLISH: the Nth publish throws
  ~egress_state();
  static inline const char* name = "tailor.egress";
};

egress_actor::behavior_type egress(egress_actor::stateful_pointer<egress_state> self,
                                   kafka_config cfg, std::shared_ptr<metrics> stats);

}  // namespace tailor::actors
