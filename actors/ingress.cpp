#include "actors/ingress.hpp"

#include <librdkafka/rdkafka.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <caf/scoped_actor.hpp>
#include <memory>
#include <stdexcept>
#include <thread>

#include "actors/error_text.hpp"
#include "actors/fault.hpp"
#include "actors/kafka.hpp"

namespace tailor::actors {

namespace {

using self_ptr = ingress_actor::stateful_pointer<ingress_state>;

constexpr auto route_timeout = ingress_state::route_timeout;
constexpr auto retry_delay = std::chrono::seconds(1);

// Rebalance callbacks run inside consume(), on the ingress actor's thread.
class rebalance_handler : public RdKafka::RebalanceCb {
 public:
  explicit rebalance_handler(ingress_state* st) : st_(st) {}
  void rebalance_cb(RdKafka::KafkaConsumer* consumer, RdKafka::ErrorCode err,
                    std::vector<RdKafka::TopicPartition*>& parts) override;

 private:
  ingress_state* st_;
};

// Commits the answered offsets. Not under exactly-once output: the egress's
// transactions commit them there, with their answers.
void commit(ingress_state& st, bool sync) {
  if (!st.dirty || !st.consumer || st.cfg.kafka.exactly_once) return;
  std::vector<RdKafka::TopicPartition*> offsets;
  for (auto& [key, prog] : st.partitions)
    if (prog.committable >= 0)
      offsets.push_back(RdKafka::TopicPartition::create(key.first, key.second, prog.committable));
  if (!offsets.empty()) {
    // TAILOR_FAULT_COMMIT=N: killed before the process's Nth commit, with
    // answers delivered whose offsets are not committed.
    static fault_point fault("TAILOR_FAULT_COMMIT", "ingress", "offset commit", false);
    fault.kill_if_fires("before an offset commit");
    auto rc = sync ? st.consumer->commitSync(offsets) : st.consumer->commitAsync(offsets);
    if (rc != RdKafka::ERR_NO_ERROR && rc != RdKafka::ERR__NO_OFFSET)
      spdlog::warn("ingress: commit failed: {}", RdKafka::err2str(rc));
  }
  RdKafka::TopicPartition::destroy(offsets);
  st.dirty = false;
}

// Exactly-once output: the egress commits its open transaction now, with
// every answer sent to it so far and their offsets (the partitions are
// about to go, or the ingress to stop). Blocks this thread until it has.
void commit_transaction_now(ingress_state& st) {
  caf::scoped_actor blocking{*st.system};
  blocking->request(st.out, std::chrono::seconds(30), commit_atom_v)
      .receive([](caf::ok_atom) {},
               [](caf::error& err) {
                 spdlog::error("ingress: the answers sent were not committed (they are read "
                               "again): {}",
                               caf::to_string(err));
               });
}

// Exactly-once output: answers held for an earlier event's are dropped
// with their partitions (the partitions' next owner answers them again).
void drop_held(ingress_state& st) {
  for (auto& [key, prog] : st.partitions) {
    auto& in = st.inputs[key.first];
    in.in_flight -= static_cast<int64_t>(prog.held.size());
    st.stats->set_in_flight(key.first, in.in_flight);
  }
}

// The assigned partitions of `topic`.
std::vector<RdKafka::TopicPartition*> assigned(ingress_state& st, const std::string& topic) {
  std::vector<RdKafka::TopicPartition*> parts, out;
  if (st.consumer->assignment(parts) != RdKafka::ERR_NO_ERROR) return out;
  for (auto* tp : parts) {
    if (tp->topic() == topic)
      out.push_back(tp);
    else
      delete tp;
  }
  return out;
}

void set_paused(ingress_state& st, const std::string& topic, bool pause) {
  auto& in = st.inputs[topic];
  if (in.paused == pause) return;
  if (in.kind == input_topic::inference) {
    // Not a pause of the partitions: the ingress stops reading their queue
    // (ingress_state::inference_queue), and librdkafka stops fetching once
    // it is full.
    in.paused = pause;
    st.stats->set_paused(topic, pause);
    spdlog::debug("ingress {}: {}", topic, pause ? "not read (backpressure)" : "read again");
    return;
  }
  auto parts = assigned(st, topic);
  auto rc = pause ? st.consumer->pause(parts) : st.consumer->resume(parts);
  RdKafka::TopicPartition::destroy(parts);
  if (rc != RdKafka::ERR_NO_ERROR) {
    spdlog::warn("ingress {}: {} failed: {}", topic, pause ? "pause" : "resume",
                 RdKafka::err2str(rc));
    return;
  }
  in.paused = pause;
  st.stats->set_paused(topic, pause);
  spdlog::debug("ingress {}: {}", topic, pause ? "paused (backpressure)" : "resumed");
}

// Holds a topic with too many events in flight (set_paused), and onboarding
// also while the training pool's admission queue (counting the onboarding
// events still on their way to it) is full; lets it go at half of either, so
// the consumer does not flap. The backlog waits in Kafka. True when it let a
// topic go: what waits for it gets no new wake-up, so the caller drains.
bool apply_backpressure(ingress_state& st, const std::string& topic) {
  auto& in = st.inputs[topic];
  bool over = in.in_flight >= st.cfg.max_in_flight;
  bool under = in.in_flight <= st.cfg.max_in_flight / 2;
  if (in.kind == input_topic::onboarding) {
    const int64_t cap = st.cfg.training.admission_queue;
    const int64_t waiting = st.stats->training_queue() + in.in_flight;
    over = over || waiting >= cap;
    under = under && waiting <= cap / 2;
  }
  if (!in.paused && over) {
    set_paused(st, topic, true);
    if (in.paused) st.stats->count_pause(topic);
  } else if (in.paused && under) {
    set_paused(st, topic, false);
    return !in.paused;
  }
  return false;
}

void rebalance_handler::rebalance_cb(RdKafka::KafkaConsumer* consumer, RdKafka::ErrorCode err,
                                     std::vector<RdKafka::TopicPartition*>& parts) {
  if (err == RdKafka::ERR__ASSIGN_PARTITIONS) {
    // Before the assignment, so that no inference event reaches the
    // consumer's own queue.
    const auto& inference = st_->cfg.kafka.topics.inference;
    for (const auto* tp : parts) {
      if (tp->topic() != inference) continue;
      auto* q = rd_kafka_queue_get_partition(consumer->c_ptr(), inference.c_str(), tp->partition());
      if (!q) {
        spdlog::error("ingress: no queue for {}/{}", inference, tp->partition());
        continue;
      }
      rd_kafka_queue_forward(q, st_->inference_queue);
      rd_kafka_queue_destroy(q);
    }
    auto rc = consumer->assign(parts);
    if (rc != RdKafka::ERR_NO_ERROR)
      spdlog::error("ingress: assign failed: {}", RdKafka::err2str(rc));
    for (auto& [topic, in] : st_->inputs) {
      if (!in.paused || in.kind == input_topic::inference) continue;
      in.paused = false;  // re-applied to the new assignment
      set_paused(*st_, topic, true);
    }
    for (auto& [topic, in] : st_->inputs) st_->stats->set_ready(topic);
    if (st_->cfg.kafka.exactly_once) st_->membership->update(*consumer);
    spdlog::info("ingress: assigned {} partitions", parts.size());
  } else {
    // Commit what is answered; events still in flight are redelivered to the
    // partitions' next owner, who answers them from the stored result. A
    // lost assignment (the session ran out, e.g. while the brokers were
    // away) has no generation left to commit in: the group refuses it, and
    // waiting for that held the revocation for 30 s under transactions.
    const bool lost = consumer->assignment_lost();
    if (st_->cfg.kafka.exactly_once) {
      if (!lost) commit_transaction_now(*st_);
      drop_held(*st_);
    }
    if (!lost) commit(*st_, true);
    st_->partitions.clear();
    ++st_->generation;
    auto rc = consumer->unassign();
    if (rc != RdKafka::ERR_NO_ERROR)
      spdlog::error("ingress: unassign failed: {}", RdKafka::err2str(rc));
    spdlog::info(lost ? "ingress: partitions revoked (lost: the consumer's session ran out; "
                        "their answers not yet committed are read again)"
                      : "ingress: partitions revoked");
  }
}

void mark_answered(self_ptr self, const incoming_event& ev, uint64_t generation) {
  auto& st = self->state;
  auto& in = st.inputs[ev.topic];
  --in.in_flight;
  st.stats->set_in_flight(ev.topic, in.in_flight);
  if (apply_backpressure(st, ev.topic)) self->send(self, poll_atom_v);
  if (generation != st.generation) return;  // partition was revoked meanwhile
  auto it = st.partitions.find({ev.topic, ev.partition});
  if (it == st.partitions.end()) return;
  auto& prog = it->second;
  prog.outstanding[ev.offset] = true;
  while (!prog.outstanding.empty() && prog.outstanding.begin()->second) {
    prog.committable = prog.outstanding.begin()->first + 1;
    prog.outstanding.erase(prog.outstanding.begin());
    st.dirty = true;
  }
}

void count_errors(metrics& stats, const std::vector<outgoing_message>& out) {
  static const std::string marker = "\"error\":{\"code\":\"";
  for (const auto& m : out) {
    if (m.to == channel::dlq) continue;
    auto pos = m.payload.find(marker);
    if (pos == std::string::npos) continue;
    auto start = pos + marker.size();
    stats.count_error(m.payload.substr(start, m.payload.find('"', start) - start));
  }
}

// The engine's own share of an inference request's latency: from reading
// the event to the delivery report of its result, minus what the result
// reports as batch steps, adapter loading and waiting for a batch row
// (inside_ms); and the whole of it, by whether the request waited for its
// adapter. Answers not generated now (a stored one sent again, a refusal)
// have none and are left out.
void observe_overhead(ingress_state& st, const incoming_event& ev,
                      const std::vector<outgoing_message>& out) {
  if (ev.topic != st.cfg.kafka.topics.inference) return;
  const double engine_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - ev.consumed)
          .count();
  for (const auto& m : out)
    if (m.to == channel::results && m.inside_ms >= 0 && engine_ms >= m.inside_ms)
      st.stats->observe_inference(engine_ms, engine_ms - m.inside_ms, m.adapter_load_ms > 0);
}

void later(self_ptr self, std::function<void()> f) {
  self->state.retries.emplace_back(std::chrono::steady_clock::now() + retry_delay, std::move(f));
}

void publish(self_ptr self, std::shared_ptr<incoming_event> ev, std::vector<outgoing_message> out,
             uint64_t generation);

void published(self_ptr self, const std::shared_ptr<incoming_event>& ev,
               const std::vector<outgoing_message>& out, uint64_t generation,
               const std::string& error) {
  if (!error.empty()) {
    spdlog::error("ingress {}: answer of {}/{} not delivered, retrying: {}", ev->topic,
                  ev->partition, ev->offset, error);
    later(self, [self, ev, out, generation] { publish(self, ev, out, generation); });
    return;
  }
  count_errors(*self->state.stats, out);
  observe_overhead(self->state, *ev, out);
  mark_answered(self, *ev, generation);
}

// Exactly-once output: sends the held answers whose events' predecessors
// have all had theirs sent, in offset order, each with the offset after its
// event. A failure (a transaction aborted) fails the ingress: its successor
// reads again from the offsets committed.
void send_in_order(self_ptr self, const ingress_state::partition_key& key) {
  auto& st = self->state;
  auto& prog = st.partitions[key];
  for (auto it = prog.outstanding.upper_bound(prog.sent_through); it != prog.outstanding.end();
       ++it) {
    auto held = prog.held.find(it->first);
    if (held == prog.held.end()) break;
    auto [ev, out] = std::move(held->second);
    prog.held.erase(held);
    prog.sent_through = it->first;
    const auto generation = st.generation;
    self->request(st.out, route_timeout, publish_atom_v, out,
                  input_offset{ev->topic, ev->partition, ev->offset + 1, st.epoch})
        .then(
            [self, ev, out, generation](caf::ok_atom) {
              published(self, ev, out, generation, "");
            },
            [ev](caf::error& err) {
              throw std::runtime_error("the answer of " + ev->topic + "/" +
                                       std::to_string(ev->partition) + "/" +
                                       std::to_string(ev->offset) +
                                       " was not committed: " + caf::to_string(err));
            });
  }
}

void publish(self_ptr self, std::shared_ptr<incoming_event> ev, std::vector<outgoing_message> out,
             uint64_t generation) {
  auto& st = self->state;
  if (st.cfg.kafka.exactly_once) {
    if (generation != st.generation) {
      // Its partition was revoked: the next owner answers it.
      mark_answered(self, *ev, generation);
      return;
    }
    const ingress_state::partition_key key{ev->topic, ev->partition};
    st.partitions[key].held[ev->offset] = {ev, std::move(out)};
    send_in_order(self, key);
    return;
  }
  const bool has_events = std::any_of(out.begin(), out.end(), [](const outgoing_message& m) {
    return m.to == channel::events;
  });
  if (!has_events) {
    st.answers->send(out, [self, ev, out, generation](const std::string& error) {
      published(self, ev, out, generation, error);
    });
    renew_if_fatal<ingress_actor>(self, *st.answers, st.answers_wakeup);
    return;
  }
  self->request(st.out, route_timeout, publish_atom_v, out)
      .then(
          [self, ev, out, generation](caf::ok_atom) { published(self, ev, out, generation, ""); },
          [self, ev, out, generation](caf::error& err) {
            published(self, ev, out, generation, caf::to_string(err));
          });
}

// Hands one event to its user actor (or straight to the DLQ) and publishes the
// answer. A failure anywhere retries the event after a delay: effects are
// idempotent by (user_id, request_id), so a retry never duplicates them.
// The reply is watched by the ingress's own timeout (reply_watch), not
// CAF's, which stays on CAF's clock for its full 120 s even once answered.
// An event unanswered by then (its user actor quit holding it: CAF 0.17 sends
// no error for a dropped promise) is dispatched again, and a late reply to
// the first try is ignored.
void dispatch(self_ptr self, std::shared_ptr<incoming_event> ev, uint64_t generation) {
  auto& st = self->state;
  auto* rej = std::get_if<rejection>(&ev->parsed);
  if (rej && !rej->answerable()) {
    dlq_record rec{
        {rej->code, rej->message}, ev->topic, ev->partition, ev->offset, ev->key, ev->payload};
    st.stats->count_dlq();
    st.stats->count_error(to_string(rej->code));
    publish(self, ev, {{channel::dlq, messages::dlq_key_of(ev->key), to_json(rec)}}, generation);
    return;
  }
  auto call = st.route_replies.watch(std::chrono::steady_clock::now(), [self, ev, generation] {
    spdlog::error("ingress {}: event {}/{} unanswered for {} s, dispatching it again", ev->topic,
                  ev->partition, ev->offset, route_timeout.count());
    dispatch(self, ev, generation);
  });
  self->request(st.registry, caf::infinite, route_atom_v, *ev)
      .then(
          [self, ev, generation, call](std::vector<outgoing_message>& out) {
            if (!reply_watch::settle(*call)) return;  // dispatched again meanwhile
            publish(self, ev, std::move(out), generation);
          },
          [self, ev, generation, call](caf::error& err) {
            if (!reply_watch::settle(*call)) return;
            if (uint64_t held = 0; self->state.retry_log.allow(held))
              spdlog::error("ingress {}: event {}/{} not handled, retrying: {}{}", ev->topic,
                            ev->partition, ev->offset, caf::to_string(err),
                            held > 0 ? fmt::format(" ({} more retries since the last line)", held)
                                     : "");
            later(self, [self, ev, generation] { dispatch(self, ev, generation); });
          });
}

// Parses one event read from Kafka, tracks it for its partition's commit
// and hands it to its user actor.
void take(self_ptr self, const char* topic, int32_t partition, int64_t offset, const void* key,
          std::size_t key_len, const void* payload, std::size_t len, int64_t timestamp_ms) {
  auto& st = self->state;
  auto it = st.inputs.find(topic);
  if (it == st.inputs.end()) return;
  auto& in = it->second;
  // Before the event is tracked: its offset stays uncommitted, so the next
  // ingress reads it again. Counted over the process, so that one goes on.
  static fault_point fault("TAILOR_FAULT_TAKE", "ingress", "event read", false);
  fault.throw_if_fires();
  st.stats->count_in(it->first);
  auto ev = std::make_shared<incoming_event>();
  ev->topic = it->first;
  ev->partition = partition;
  ev->offset = offset;
  if (key) ev->key.assign(static_cast<const char*>(key), key_len);
  ev->payload.assign(static_cast<const char*>(payload), len);
  ev->consumed = std::chrono::steady_clock::now();
  ev->timestamp_ms = timestamp_ms;
  ev->parsed = parse_event(in.kind, ev->payload, st.cfg.limits);
  st.partitions[{ev->topic, ev->partition}].outstanding[ev->offset] = false;
  ++in.in_flight;
  st.stats->set_in_flight(ev->topic, in.in_flight);
  dispatch(self, ev, st.generation);
  apply_backpressure(st, ev->topic);
}

// Reads the events the queues hold now, at most 64 from each (the mailbox
// gets its turn in between): the consumer's (onboarding, control), and the
// inference queue unless backpressure holds it. True when there may be
// more. Never waits.
bool drain(self_ptr self) {
  auto& st = self->state;
  int n = 0;
  for (; n < 64; ++n) {
    std::unique_ptr<RdKafka::Message> msg(st.consumer->consume(0));
    if (msg->err() == RdKafka::ERR__TIMED_OUT) break;
    if (msg->err() != RdKafka::ERR_NO_ERROR) {
      // Keep reading: what follows an error gets no new wake-up.
      spdlog::warn("ingress: {}", msg->errstr());
      continue;
    }
    const auto ts = msg->timestamp();
    take(self, msg->topic_name().c_str(), msg->partition(), msg->offset(), msg->key_pointer(),
         msg->key_len(), msg->payload(), msg->len(),
         ts.type == RdKafka::MessageTimestamp::MSG_TIMESTAMP_NOT_AVAILABLE ? -1 : ts.timestamp);
  }
  bool more = n == 64;
  const auto& inference = st.inputs[st.cfg.kafka.topics.inference];
  for (n = 0; n < 64 && !inference.paused; ++n) {
    // Destroyed even when take throws: librdkafka's handle is not destroyed
    // while a message of it lives, and the ingress's end would hang.
    std::unique_ptr<rd_kafka_message_t, void (*)(rd_kafka_message_t*)> m(
        rd_kafka_consume_queue(st.inference_queue, 0), rd_kafka_message_destroy);
    if (!m) break;
    if (m->err)
      spdlog::warn("ingress: {}", rd_kafka_message_errstr(m.get()));
    else
      take(self, rd_kafka_topic_name(m->rkt), m->partition, m->offset, m->key, m->key_len,
           m->payload, m->len, rd_kafka_message_timestamp(m.get(), nullptr));
  }
  return more || (n == 64 && !inference.paused);
}

// Serves the delivery reports of the ingress's own producer (none under
// exactly-once output).
void poll_answers(self_ptr self) {
  auto& st = self->state;
  if (!st.answers) return;
  st.answers_wakeup->rearm();
  st.answers->poll();
  renew_if_fatal<ingress_actor>(self, *st.answers, st.answers_wakeup);
}

// First at shutdown: their callbacks reach into the state.
void stop_wakeups(ingress_state& st) {
  st.wakeup.reset();
  st.inference_wakeup.reset();
  st.answers_wakeup.reset();
}

// Commits what is answered and leaves the group. The inference queue goes
// after the close, which forwards nothing to it any more, and before the
// consumer, as librdkafka requires of every queue.
void leave_group(ingress_state& st) {
  commit(st, true);
  // TAILOR_FAULT_CLOSE=N: the process's Nth close never returns, as a
  // consumer whose group was deleted under it was seen to hang.
  static fault_point fault("TAILOR_FAULT_CLOSE", "ingress", "consumer close", false);
  if (fault.fires()) {
    spdlog::warn("ingress: fault injected by TAILOR_FAULT_CLOSE: the consumer close hangs");
    for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
  }
  st.consumer->close();
  if (st.inference_queue) rd_kafka_queue_destroy(st.inference_queue);
  st.inference_queue = nullptr;
  st.consumer.reset();
}

}  // namespace

ingress_state::~ingress_state() {
  stop_wakeups(*this);
  // Their callbacks would reach into this state while it goes; what was
  // produced is still delivered (the producer flushes as it goes).
  if (answers) answers->forget();
  if (consumer) leave_group(*this);
}

ingress_actor::behavior_type ingress(ingress_actor::stateful_pointer<ingress_state> self,
                                     engine_config cfg, registry_actor registry, egress_actor out,
                                     std::shared_ptr<metrics> stats,
                                     std::shared_ptr<group_membership> membership) {
  self->set_exception_handler(exit_reason_of_exception);
  auto& st = self->state;
  st.cfg = std::move(cfg);
  st.system = &self->system();
  st.membership = std::move(membership);
  st.epoch = st.membership->next_epoch();
  const auto& t = st.cfg.kafka.topics;
  st.inputs[t.onboarding].kind = input_topic::onboarding;
  st.inputs[t.inference].kind = input_topic::inference;
  st.inputs[t.control].kind = input_topic::control;
  st.registry = std::move(registry);
  st.out = std::move(out);
  st.stats = std::move(stats);
  st.on_rebalance = std::make_unique<rebalance_handler>(&st);
  st.events = watch_brokers("tailord-ingress", st.stats, {t.onboarding, t.inference, t.control});
  std::string err;
  auto settings = consumer_settings(st.cfg.kafka);
  settings.insert(settings.begin(),
                  {{"group.id", st.cfg.kafka.group_id},
                   {"partition.assignment.strategy", "range"},
                   {"enable.auto.commit", "false"},
                   {"enable.auto.offset.store", "false"},
                   {"auto.offset.reset", "earliest"},
                   {"enable.partition.eof", "false"},
                   // A crashed instance's partitions move on after 10 s, not 45.
                   {"session.timeout.ms", "10000"},
                   {"heartbeat.interval.ms", "1000"},
                   // Prefetch at most 8 MB a queue (inference's, the other
                   // topics'): a held backlog stays in Kafka, not here.
                   // librdkafka's long poll (fetch.wait.max.ms, 500 ms) is
                   // kept on a real broker: inference is held by not reading
                   // its queue, so its resume waits for no fetch (a 20 ms
                   // poll did that for paused partitions, at 50 fetches a
                   // second idle). A resumed onboarding waits for the fetch
                   // in flight, at most that, beside training jobs of seconds.
                   {"queued.max.messages.kbytes", "8192"},
                   {"client.id", "tailord-ingress"}});
  auto conf = make_conf(st.cfg.kafka, settings, err, st.events.get());
  if (conf && conf->set("rebalance_cb", st.on_rebalance.get(), err) == RdKafka::Conf::CONF_OK)
    st.consumer.reset(RdKafka::KafkaConsumer::create(conf.get(), err));
  RdKafka::ErrorCode rc = RdKafka::ERR_NO_ERROR;
  // Before any assignment can forward partitions to it (in consume()).
  if (st.consumer) st.inference_queue = rd_kafka_queue_new(st.consumer->c_ptr());
  if (st.consumer) rc = st.consumer->subscribe({t.onboarding, t.inference, t.control});
  if (!st.consumer || rc != RdKafka::ERR_NO_ERROR) {
    if (rc != RdKafka::ERR_NO_ERROR) err = RdKafka::err2str(rc);
    spdlog::critical("ingress: cannot consume: {}", err);
    self->quit(caf::make_error(caf::sec::runtime_error, err));
    return ingress_actor::behavior_type::make_empty_behavior();
  }
  if (!st.cfg.kafka.exactly_once) {
    st.answers = batch_producer::make(st.cfg.kafka, st.stats, "tailord-ingress", err);
    if (!st.answers) {
      spdlog::critical("ingress: cannot create the producer: {}", err);
      self->quit(caf::make_error(caf::sec::runtime_error, err));
      return ingress_actor::behavior_type::make_empty_behavior();
    }
    st.answers_wakeup = poll_on_wakeup<ingress_actor>(self, st.answers->producer().c_ptr(),
                                                      queue_wakeup::queue::main);
  }
  st.wakeup =
      poll_on_wakeup<ingress_actor>(self, st.consumer->c_ptr(), queue_wakeup::queue::consumer);
  st.inference_wakeup = poll_on_wakeup<ingress_actor>(self, st.inference_queue);
  self->send(self, tick_atom_v);
  return {
      [self](poll_atom) {
        auto& st = self->state;
        if (st.stopping) return;
        // Re-armed before serving: what arrives after this poll wakes us again.
        st.wakeup->rearm();
        st.inference_wakeup->rearm();
        poll_answers(self);
        if (drain(self)) self->send(self, poll_atom_v);
      },
      [self](tick_atom) {
        auto& st = self->state;
        if (st.stopping) return;
        // A safety net only: events and delivery reports arrive through the wake-ups.
        poll_answers(self);
        if (drain(self)) self->send(self, poll_atom_v);
        // The admission queue drains as slots free up, without any event here.
        apply_backpressure(st, st.cfg.kafka.topics.onboarding);
        auto now = std::chrono::steady_clock::now();
        for (auto& again : st.route_replies.expire(now))
          if (!st.stopping) again();
        while (!st.retries.empty() && st.retries.front().first <= now) {
          auto retry = std::move(st.retries.front().second);
          st.retries.pop_front();
          if (!st.stopping) retry();
        }
        // Batched: one commit per answer would be hundreds of broker writes
        // a second under load, competing with the answers for the broker.
        if (now >= st.next_commit) {
          commit(st, false);
          st.next_commit = now + std::chrono::milliseconds(st.cfg.kafka.commit_interval_ms);
        }
        bool busy = !st.retries.empty();
        for (auto& [topic, in] : st.inputs) busy = busy || in.in_flight > 0;
        self->delayed_send(self, std::chrono::milliseconds(busy ? 10 : 100), tick_atom_v);
      },
      [self](stop_atom) -> caf::ok_atom {
        auto& st = self->state;
        st.stopping = true;
        stop_wakeups(st);
        // Answers on their way out are delivered (and so committed) first;
        // those that do not make it are answered again after a restart.
        if (st.answers && !st.answers->flush(10000))
          spdlog::error("ingress: answers not delivered at shutdown are answered again next time");
        if (st.cfg.kafka.exactly_once) commit_transaction_now(st);
        leave_group(st);
        spdlog::info("ingress: offsets committed, left the group");
        self->quit();
        return caf::ok_atom_v;
      },
  };
}

}  // namespace tailor::actors
