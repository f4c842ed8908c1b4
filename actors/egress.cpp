#include "actors/egress.hpp"

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafkacpp.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <stdexcept>

#include "actors/error_text.hpp"
#include "actors/fault.hpp"
#include "actors/kafka.hpp"

namespace tailor::actors {

namespace {

const std::string& topic_of(const topic_names& topics, channel c) {
  switch (c) {
    case channel::results: return topics.results;
    case channel::events: return topics.events;
    case channel::dlq: return topics.dlq;
    case channel::state: return topics.state;
  }
  return topics.dlq;
}

}  // namespace

// Delivery reports arrive inside producer->poll(), i.e. on the owner's own
// thread, so the callback may touch its batches directly.
class batch_producer::reports : public RdKafka::DeliveryReportCb {
 public:
  explicit reports(batch_producer* owner) : owner_(owner) {}
  void dr_cb(RdKafka::Message& msg) override {
    const bool ok = msg.err() == RdKafka::ERR_NO_ERROR;
    owner_->settle(reinterpret_cast<uintptr_t>(msg.msg_opaque()), msg.topic_name(),
                   ok ? "" : msg.topic_name() + ": " + msg.errstr());
  }

 private:
  batch_producer* owner_;
};

std::unique_ptr<batch_producer> batch_producer::make(const kafka_config& cfg,
                                                     std::shared_ptr<metrics> stats,
                                                     const std::string& client_id,
                                                     std::string& err) {
  std::unique_ptr<batch_producer> p(new batch_producer());
  p->cfg_ = cfg;
  p->client_id_ = client_id;
  p->topics_ = cfg.topics;
  p->stats_ = std::move(stats);
  p->on_delivery_ = std::make_unique<reports>(p.get());
  if (!p->create(err)) return nullptr;
  return p;
}

bool batch_producer::create(std::string& err) {
  auto conf = make_conf(cfg_,
                        {{"enable.idempotence", "true"},
                         {"acks", "all"},
                         // Results are latency-bound: no wait for a batch to
                         // fill; messages produced while requests are in
                         // flight still share one. Measured: delivery p50
                         // 4.5 -> 2.2 ms at 150/s, closed-loop throughput equal.
                         {"linger.ms", "0"},
                         // One produce request at a time. librdkafka puts one
                         // partition in a request and the broker serves a
                         // connection's requests in turn, so a burst of
                         // answers (a batch step ending) pipelined as five
                         // one-message requests waits behind itself; with one
                         // in flight, the rest of the burst shares the next
                         // request. Measured (docs/operations.md): broker RTT
                         // p90 16-33 -> 3 ms in a closed loop, 100 adapters
                         // 12.3k -> 15.5k tokens/s; open loop unchanged.
                         {"max.in.flight", "1"},
                         {"client.id", client_id_}},
                        err);
  if (!conf) return false;
  if (conf->set("dr_cb", on_delivery_.get(), err) != RdKafka::Conf::CONF_OK) return false;
  producer_.reset(RdKafka::Producer::create(conf.get(), err));
  return producer_ != nullptr;
}

std::string batch_producer::fatal_error() const {
  char reason[512];
  const auto code = rd_kafka_fatal_error(producer_->c_ptr(), reason, sizeof reason);
  if (code == RD_KAFKA_RESP_ERR_NO_ERROR) return "";
  return std::string(rd_kafka_err2name(code)) + ": " + reason;
}

bool batch_producer::replace(const std::string& reason, std::string& err) {
  spdlog::critical("{}: the producer had a fatal error ({}); replacing it", client_id_, reason);
  // Its messages are not delivered any more; nothing polls it again, so
  // none of its reports reaches a batch.
  producer_->purge(RdKafka::Producer::PURGE_QUEUE | RdKafka::Producer::PURGE_INFLIGHT);
  producer_.reset();
  auto failed = std::move(batches_);
  batches_.clear();
  const bool made = create(err);
  if (made && stats_) stats_->count_producer_replacement(client_id_);
  for (auto& [id, b] : failed) b.done(client_id_ + ": producer replaced after " + reason);
  return made;
}

batch_producer::~batch_producer() {
  if (!producer_) return;
  // Orderly shutdown: everything accepted is delivered before we go.
  if (!flush(10000))
    spdlog::error("{}: {} messages not delivered at shutdown", producer_->name(),
                  producer_->outq_len());
}

bool batch_producer::flush(int timeout_ms) {
  return producer_->flush(timeout_ms) == RdKafka::ERR_NO_ERROR;
}

void batch_producer::settle(uint64_t id, const std::string& topic, const std::string& error) {
  auto it = batches_.find(id);
  if (it == batches_.end()) return;
  auto& b = it->second;
  if (!error.empty()) {
    if (b.error.empty()) b.error = error;
  } else if (stats_) {
    stats_->count_out(topic);
  }
  if (--b.remaining > 0) return;
  auto done = std::move(b.done);
  auto err = std::move(b.error);
  batches_.erase(it);
  done(err);
}

void batch_producer::send(const std::vector<outgoing_message>& batch, done_fn done) {
  if (batch.empty()) return done("");
  // Counted over the process's producers, so the fresh one goes on.
  static fault_point fault("TAILOR_FAULT_FATAL", "kafka producers", "batch sent", false);
  if (fault.fires())
    rd_kafka_test_fatal_error(producer_->c_ptr(), RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                              "fault injected by TAILOR_FAULT_FATAL");
  const auto id = next_batch_++;
  auto& pend = batches_[id];
  pend.remaining = batch.size();
  pend.done = std::move(done);
  for (const auto& m : batch) {
    const auto& topic = topic_of(topics_, m.to);
    for (;;) {
      // An empty state record is a tombstone (a null value): the compacted
      // topic then drops the key's records.
      const bool tombstone = m.to == channel::state && m.payload.empty();
      auto rc = producer_->produce(topic, RdKafka::Topic::PARTITION_UA,
                                   RdKafka::Producer::RK_MSG_COPY,
                                   tombstone ? nullptr : const_cast<char*>(m.payload.data()),
                                   m.payload.size(),
                                   m.key.data(), m.key.size(), 0,
                                   reinterpret_cast<void*>(static_cast<uintptr_t>(id)));
      if (rc == RdKafka::ERR_NO_ERROR) break;
      if (rc == RdKafka::ERR__QUEUE_FULL) {
        producer_->poll(50);  // the owner runs detached: waiting here blocks only it
        continue;
      }
      // Counts as a failed delivery of this message.
      settle(id, topic, topic + ": " + RdKafka::err2str(rc));
      break;
    }
  }
  producer_->poll(0);
}

egress_state::~egress_state() {
  wakeup.reset();
}

egress_actor::behavior_type egress(egress_actor::stateful_pointer<egress_state> self,
                                   kafka_config cfg, std::shared_ptr<metrics> stats) {
  self->set_exception_handler(exit_reason_of_exception);
  auto& st = self->state;
  std::string err;
  st.out = batch_producer::make(cfg, std::move(stats), "tailord-egress", err);
  if (!st.out) {
    spdlog::critical("egress: cannot create the producer: {}", err);
    self->quit(caf::make_error(caf::sec::runtime_error, err));
    return egress_actor::behavior_type::make_empty_behavior();
  }
  st.fault_publish = fault_point("TAILOR_FAULT_PUBLISH", "egress", "publish", false);
  // A delivery report is served as soon as it arrives, not at the next
  // round of a polling clock.
  st.wakeup =
      poll_on_wakeup<egress_actor>(self, st.out->producer().c_ptr(), queue_wakeup::queue::main);
  return {
      [self](publish_atom, std::vector<outgoing_message>& batch) -> caf::result<caf::ok_atom> {
        auto& st = self->state;
        st.fault_publish.throw_if_fires();
        auto promise = self->make_response_promise<caf::ok_atom>();
        st.out->send(batch, [promise](const std::string& error) mutable {
          if (error.empty())
            promise.deliver(caf::ok_atom_v);
          else
            promise.deliver(caf::make_error(caf::sec::runtime_error, error));
        });
        renew_if_fatal<egress_actor>(self, *st.out, st.wakeup);
        if (!st.ticking && st.out->waiting()) {
          st.ticking = true;
          self->delayed_send(self, std::chrono::milliseconds(100), tick_atom_v);
        }
        return promise;
      },
      [self](poll_atom) {
        auto& st = self->state;
        // Re-armed before serving: a report that arrives after this poll
        // emptied the queue wakes us again.
        st.wakeup->rearm();
        st.out->poll();
        renew_if_fatal<egress_actor>(self, *st.out, st.wakeup);
      },
      [self](tick_atom) {
        auto& st = self->state;
        st.wakeup->rearm();
        st.out->poll();
        renew_if_fatal<egress_actor>(self, *st.out, st.wakeup);
        st.ticking = st.out->waiting();
        if (st.ticking) self->delayed_send(self, std::chrono::milliseconds(100), tick_atom_v);
      },
  };
}

}  // namespace tailor::actors
