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
  // Null, with `err` set, when the producer cannot be created. With a
  // `transactional_id` (kafka.exactly_once), messages go in transactions
  // (begin ... commit) and are seen by read_committed consumers only once
  // committed; making it aborts what a former producer of the same id left
  // open.
  static std::unique_ptr<batch_producer> make(const kafka_config& cfg,
                                              std::shared_ptr<metrics> stats,
                                              const std::string& client_id, std::string& err,
                                              const std::string& transactional_id = "");
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

  // The steps of a transaction. `error` is empty on success; otherwise the
  // step may be tried again (`retriable`), or the transaction is to be
  // aborted (`abortable`), or the producer is of no further use.
  struct txn_result {
    std::string error;
    bool retriable = false;
    bool abortable = false;
    bool ok() const { return error.empty(); }
  };
  bool transactional() const { return !transactional_id_.empty(); }
  txn_result begin();
  // Adds the consumer offsets (the next offset of each topic and
  // partition) to the transaction, as of `group`'s member.
  txn_result send_offsets(const std::map<std::pair<std::string, int32_t>, int64_t>& offsets,
                          const RdKafka::ConsumerGroupMetadata& group, int timeout_ms);
  // Delivers what is in the transaction first.
  txn_result commit(int timeout_ms);
  txn_result abort(int timeout_ms);

 private:
  class reports;
  struct pending {
    done_fn done;
    std::size_t remaining = 0;
    std::string error;
  };
  batch_producer() = default;
  bool create(std::string& err);
  // Each topic it writes to, looked up as it is made (look_up_topic).
  void look_up_topics();
  static constexpr int lookup_timeout_ms = 2000;
  static txn_result take(RdKafka::Error* e);  // and deletes it
  void settle(uint64_t id, const std::string& topic, const std::string& error);
  kafka_config cfg_;
  std::string client_id_;
  std::string transactional_id_;
  topic_names topics_;  // where each channel goes
  std::shared_ptr<metrics> stats_;
  std::unique_ptr<RdKafka::DeliveryReportCb> on_delivery_;
  std::unique_ptr<RdKafka::Producer> producer_;
  // Those topics' handles, which keep them known; gone before the producer.
  std::vector<std::unique_ptr<RdKafka::Topic>> known_topics_;
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
//
// Under exactly-once output (kafka.exactly_once, a `transactional_id`),
// every message goes in the open transaction, which commits as soon as
// what was queued when it opened is in it (a group commit), and `publish`
// answers once it is committed. The ingress publishes each answer with the
// offset after its event (input_offset), in each partition's order, and the
// transaction commits those offsets for the consumer group with the
// answers: a crash before the commit loses both, and the next run answers
// again, once. A transaction
// that aborts answers its publishers with an error, and the answers of the
// ingress that sent offsets in it are refused until a fresh ingress (a
// higher epoch) reads them again. `commit` commits the open transaction now
// (the ingress's revocation and stop); a transaction that can neither
// commit nor abort ends the egress, and so the engine.
using egress_actor = caf::typed_actor<
    caf::replies_to<publish_atom, std::vector<outgoing_message>>::with<caf::ok_atom>,
    caf::replies_to<publish_atom, std::vector<outgoing_message>, input_offset>::with<
        caf::ok_atom>,
    caf::replies_to<commit_atom>::with<caf::ok_atom>, caf::reacts_to<commit_atom, uint64_t>,
    caf::reacts_to<poll_atom>, caf::reacts_to<tick_atom>>;

struct egress_state {
  // The open transaction (exactly-once output).
  struct transaction {
    uint64_t number = 0;  // 0: none open
    std::map<std::pair<std::string, int32_t>, int64_t> offsets;  // the next of each
    uint64_t epoch = 0;  // the highest of the ingresses whose offsets are in it
    std::vector<caf::typed_response_promise<caf::ok_atom>> waiting;
    std::string failed;  // its first failed delivery
  };
  std::unique_ptr<batch_producer> out;
  std::unique_ptr<queue_wakeup> wakeup;  // reset before the producer goes
  bool ticking = false;                  // the safety net's poll is scheduled
  fault_point fault_publish;  // TAILOR_FAULT_PUBLISH: the Nth publish throws
  std::shared_ptr<group_membership> group;
  std::shared_ptr<metrics> stats;
  transaction txn;
  uint64_t transactions = 0;
  uint64_t refused_epoch = 0;  // answers of ingresses up to this one are refused
  ~egress_state();
  static inline const char* name = "tailor.egress";
};

// `transactional_id` empty: no transactions (at-least-once output).
egress_actor::behavior_type egress(egress_actor::stateful_pointer<egress_state> self,
                                   kafka_config cfg, std::shared_ptr<metrics> stats,
                                   std::string transactional_id,
                                   std::shared_ptr<group_membership> group);

}  // namespace tailor::actors
