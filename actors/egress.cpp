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
                                                     std::string& err,
                                                     const std::string& transactional_id) {
  std::unique_ptr<batch_producer> p(new batch_producer());
  p->cfg_ = cfg;
  p->client_id_ = client_id;
  p->transactional_id_ = transactional_id;
  p->topics_ = cfg.topics;
  p->stats_ = std::move(stats);
  p->on_delivery_ = std::make_unique<reports>(p.get());
  if (!p->create(err)) return nullptr;
  return p;
}

bool batch_producer::create(std::string& err) {
  std::vector<std::pair<std::string, std::string>> settings{
      {"enable.idempotence", "true"},
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
      // request. Measured (docs/measurements.md): broker RTT
      // p90 16-33 -> 3 ms in a closed loop, 100 adapters
      // 12.3k -> 15.5k tokens/s; open loop unchanged.
      {"max.in.flight", "1"},
      {"client.id", client_id_}};
  if (transactional())
    // A transaction begun just after the last one committed is refused
    // (CONCURRENT_TRANSACTIONS) until the broker has written the last one's
    // markers, and librdkafka tries again after this. Its default, 100 ms,
    // made each transaction last over 100 ms: a closed loop of 64 requests
    // was served at 470 requests/s; with 10 ms, 1,280.
    settings.emplace_back("retry.backoff.ms", "10");
  auto conf = make_conf(cfg_, settings, err);
  if (!conf) return false;
  if (conf->set("dr_cb", on_delivery_.get(), err) != RdKafka::Conf::CONF_OK) return false;
  if (transactional()) {
    // A transaction stays open for a commit's time or so; one a crashed
    // process left open holds read_committed consumers back until its next
    // start aborts it, or until this timeout (Kafka's default: 60 s). An
    // operator's kafka.properties win.
    if (conf->set("transactional.id", transactional_id_, err) != RdKafka::Conf::CONF_OK ||
        (!cfg_.properties.count("transaction.timeout.ms") &&
         conf->set("transaction.timeout.ms", "10000", err) != RdKafka::Conf::CONF_OK))
      return false;
  }
  producer_.reset(RdKafka::Producer::create(conf.get(), err));
  if (!producer_) return false;
  if (transactional()) {
    if (const auto r = take(producer_->init_transactions(30000)); !r.ok()) {
      err = "transactions of " + transactional_id_ + " cannot start: " + r.error;
      producer_.reset();
      return false;
    }
  }
  look_up_topics();
  return true;
}

// The first answers of a start go at once. The first lookup that fails
// (Kafka away, a topic it does not have) ends the rest: their first
// messages wait for librdkafka's own lookup, as they did before.
void batch_producer::look_up_topics() {
  for (const auto c : {channel::results, channel::events, channel::dlq, channel::state}) {
    std::string err;
    auto topic = look_up_topic(*producer_, topic_of(topics_, c), lookup_timeout_ms, err);
    if (!topic) {
      spdlog::warn("{}: {}", client_id_, err);
      return;
    }
    known_topics_.push_back(std::move(topic));
  }
}

batch_producer::txn_result batch_producer::take(RdKafka::Error* e) {
  txn_result r;
  if (!e) return r;
  r.error = e->name() + ": " + e->str();
  r.retriable = e->is_retriable();
  r.abortable = e->txn_requires_abort();
  delete e;
  return r;
}

batch_producer::txn_result batch_producer::begin() {
  return take(producer_->begin_transaction());
}

batch_producer::txn_result batch_producer::send_offsets(
    const std::map<std::pair<std::string, int32_t>, int64_t>& offsets,
    const RdKafka::ConsumerGroupMetadata& group, int timeout_ms) {
  std::vector<RdKafka::TopicPartition*> parts;
  for (const auto& [where, next] : offsets)
    parts.push_back(RdKafka::TopicPartition::create(where.first, where.second, next));
  auto r = take(producer_->send_offsets_to_transaction(parts, &group, timeout_ms));
  RdKafka::TopicPartition::destroy(parts);
  return r;
}

batch_producer::txn_result batch_producer::commit(int timeout_ms) {
  return take(producer_->commit_transaction(timeout_ms));
}

batch_producer::txn_result batch_producer::abort(int timeout_ms) {
  return take(producer_->abort_transaction(timeout_ms));
}

std::string batch_producer::fatal_error() const {
  char reason[512];
  const auto code = rd_kafka_fatal_error(producer_->c_ptr(), reason, sizeof reason);
  if (code == RD_KAFKA_RESP_ERR_NO_ERROR) return "";
  return std::string(rd_kafka_err2name(code)) + ": " + reason;
}

bool batch_producer::replace(const std::string& reason, std::string& err) {
  if (transactional()) {
    // Its open transaction is lost with it, and with it the offsets the
    // answers in it were to commit: its owner fails instead, and the engine's
    // next run reads again what was not committed.
    err = "a transactional producer is not replaced";
    return false;
  }
  spdlog::critical("{}: the producer had a fatal error ({}); replacing it", client_id_, reason);
  // Its messages are not delivered any more; nothing polls it again, so
  // none of its reports reaches a batch.
  producer_->purge(RdKafka::Producer::PURGE_QUEUE | RdKafka::Producer::PURGE_INFLIGHT);
  known_topics_.clear();
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

namespace {

using egress_ptr = egress_actor::stateful_pointer<egress_state>;

constexpr int txn_timeout_ms = 30000;

// Tries a transaction's step again while librdkafka says it may (up to
// three more times).
template <class Step>
batch_producer::txn_result with_retries(Step step) {
  auto r = step();
  for (int i = 0; i < 3 && !r.ok() && r.retriable; ++i) r = step();
  return r;
}

// Commits the open transaction, with the offsets its answers answer. When
// that fails it is aborted: its publishers get the error, and the ingresses
// whose offsets were in it are refused from now on (their successor reads
// the events again). Throws when the producer can do neither.
void end_transaction(egress_ptr self) {
  auto& st = self->state;
  if (st.txn.number == 0) return;
  auto txn = std::move(st.txn);
  st.txn = {};
  // TAILOR_FAULT_COMMIT=N: killed before the process's Nth commit of input
  // offsets, with their answers on the broker and not committed.
  static fault_point fault("TAILOR_FAULT_COMMIT", "egress", "commit of input offsets", false);
  if (!txn.offsets.empty() && fault.fires()) {
    st.out->flush(10000);
    fault.kill("before a transaction's commit");
  }
  std::string error = txn.failed;
  if (error.empty() && !txn.offsets.empty()) {
    auto group = st.group ? st.group->current() : nullptr;
    if (!group) {
      error = "no consumer group membership to commit the offsets with";
    } else {
      auto r = with_retries(
          [&] { return st.out->send_offsets(txn.offsets, *group, txn_timeout_ms); });
      if (!r.ok() && !r.abortable && !r.retriable)
        throw std::runtime_error("a transaction's offsets cannot be sent: " + r.error);
      error = r.error;
    }
  }
  if (error.empty()) {
    auto r = with_retries([&] { return st.out->commit(txn_timeout_ms); });
    if (!r.ok() && !r.abortable)
      throw std::runtime_error("a transaction can neither commit nor abort: " + r.error);
    error = r.error;
  }
  if (!error.empty()) {
    if (auto r = with_retries([&] { return st.out->abort(txn_timeout_ms); }); !r.ok())
      throw std::runtime_error("a transaction cannot be aborted: " + r.error);
    st.refused_epoch = std::max(st.refused_epoch, txn.epoch);
    spdlog::error("egress: transaction aborted ({}); its {} publishers are told", error,
                  txn.waiting.size());
  }
  if (st.stats) st.stats->count_transaction(error.empty() ? "committed" : "aborted");
  for (auto& promise : txn.waiting) {
    if (error.empty())
      promise.deliver(caf::ok_atom_v);
    else
      promise.deliver(caf::make_error(caf::sec::runtime_error, "transaction aborted: " + error));
  }
}

// Produces `batch`; answers once every message of it is delivered, or,
// under transactions, once the transaction holding it is committed.
// `from`: the input offset the batch answers (exactly-once output only).
caf::result<caf::ok_atom> publish(egress_ptr self, const std::vector<outgoing_message>& batch,
                                  const input_offset* from) {
  auto& st = self->state;
  st.fault_publish.throw_if_fires();
  if (st.out->transactional() && from && from->epoch <= st.refused_epoch)
    return caf::make_error(caf::sec::runtime_error,
                           "refused: a transaction with this ingress's answers was aborted");
  auto promise = self->make_response_promise<caf::ok_atom>();
  if (!st.out->transactional()) {
    st.out->send(batch, [promise](const std::string& error) mutable {
      if (error.empty())
        promise.deliver(caf::ok_atom_v);
      else
        promise.deliver(caf::make_error(caf::sec::runtime_error, error));
    });
  } else {
    if (st.txn.number == 0) {
      if (auto r = st.out->begin(); !r.ok())
        throw std::runtime_error("a transaction cannot begin: " + r.error);
      st.txn.number = ++st.transactions;
      // A group commit: the transaction takes what is queued here now (what
      // arrived while the last one committed) and commits after it. A
      // commit on a clock instead made each answer wait for it: with 100 ms,
      // a closed loop of 64 requests served 500 requests/s, not 2,400.
      self->send(self, commit_atom_v, st.txn.number);
    }
    if (from) {
      auto& next = st.txn.offsets[{from->topic, from->partition}];
      next = std::max(next, from->next);
      st.txn.epoch = std::max(st.txn.epoch, from->epoch);
    }
    st.txn.waiting.push_back(promise);
    st.out->send(batch, [self, number = st.txn.number](const std::string& error) {
      auto& txn = self->state.txn;
      if (!error.empty() && txn.number == number && txn.failed.empty()) txn.failed = error;
    });
  }
  renew_if_fatal<egress_actor>(self, *st.out, st.wakeup);
  if (!st.ticking && st.out->waiting()) {
    st.ticking = true;
    self->delayed_send(self, std::chrono::milliseconds(100), tick_atom_v);
  }
  return promise;
}

}  // namespace

egress_state::~egress_state() {
  wakeup.reset();
  if (!out || !out->transactional() || txn.number == 0) return;
  // Stopping: what the open transaction holds is delivered. Its publishers
  // are gone or going; what they published is read again next time if this
  // fails.
  if (auto r = out->commit(10000); !r.ok()) {
    spdlog::error("egress: the last transaction did not commit: {}", r.error);
    out->abort(10000);
  }
}

egress_actor::behavior_type egress(egress_actor::stateful_pointer<egress_state> self,
                                   kafka_config cfg, std::shared_ptr<metrics> stats,
                                   std::string transactional_id,
                                   std::shared_ptr<group_membership> group) {
  self->set_exception_handler(exit_reason_of_exception);
  auto& st = self->state;
  std::string err;
  st.group = std::move(group);
  st.stats = stats;
  st.out = batch_producer::make(cfg, std::move(stats), "tailord-egress", err, transactional_id);
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
      [self](publish_atom, std::vector<outgoing_message>& batch) {
        return publish(self, batch, nullptr);
      },
      [self](publish_atom, std::vector<outgoing_message>& batch, input_offset& from) {
        return publish(self, batch, &from);
      },
      [self](commit_atom) -> caf::ok_atom {
        end_transaction(self);
        return caf::ok_atom_v;
      },
      [self](commit_atom, uint64_t number) {
        if (self->state.txn.number == number) end_transaction(self);
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
