#pragma once

#include <atomic>
#include <caf/actor_cast.hpp>
#include <caf/actor_control_block.hpp>
#include <caf/send.hpp>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "actors/config.hpp"
#include "messages/type_ids.hpp"

namespace RdKafka {
class Conf;
class ConsumerGroupMetadata;
class EventCb;
class Handle;
class KafkaConsumer;
class Topic;
}
struct rd_kafka_s;
struct rd_kafka_mock_cluster_s;
struct rd_kafka_queue_s;

namespace tailor::actors {

class metrics;

// librdkafka's embedded mock cluster: the demo default when no
// bootstrap.servers is configured. Lives as long as this object.
class mock_cluster {
 public:
  static std::unique_ptr<mock_cluster> start(int brokers, std::string& err);
  ~mock_cluster();
  const std::string& bootstrap() const { return bootstrap_; }
  std::string create_topic(const std::string& name, int partitions);
  // A fault injector for tests: the next errors.size() requests of the
  // Kafka protocol's `api_key` (24: AddPartitionsToTxn ...) fail with these
  // error codes, in turn.
  void fail_requests(int16_t api_key, const std::vector<int>& errors);
  // Drops the errors fail_requests left for `api_key`.
  void clear_failures(int16_t api_key);
  // Another: Metadata responses give `topic` this error code (0: none
  // again), so that a client that looks the topic up from now on fails.
  void fail_lookups(const std::string& topic, int error);
  // Another: its brokers drop every connection and refuse new ones (down),
  // or take them again (up), keeping their topics and groups.
  void set_down(bool down);

 private:
  mock_cluster() = default;
  rd_kafka_s* rk_ = nullptr;
  rd_kafka_mock_cluster_s* cluster_ = nullptr;
  std::string bootstrap_;
};

// Calls `wake` (on a librdkafka thread) when a client's queue turns
// non-empty, at most once until rearm(). An actor then drains the queue when
// there is something in it, instead of blocking in consume()/poll() for a
// timeout while the answers in its mailbox wait. Destroy it before the
// client: it holds a reference to the client's queue.
class queue_wakeup {
 public:
  enum class queue { consumer, main };
  queue_wakeup(rd_kafka_s* client, queue which, std::function<void()> wake);
  // For a queue of the caller's (rd_kafka_queue_new), which it keeps and
  // destroys after this.
  queue_wakeup(rd_kafka_queue_s* borrowed, std::function<void()> wake);
  ~queue_wakeup();
  queue_wakeup(const queue_wakeup&) = delete;
  queue_wakeup& operator=(const queue_wakeup&) = delete;
  // Call before draining: a message enqueued after the drain emptied the
  // queue wakes the actor again.
  void rearm() { pending_.store(false); }

 private:
  static void on_event(rd_kafka_s* client, void* opaque);
  rd_kafka_queue_s* queue_ = nullptr;
  bool owned_ = true;
  std::function<void()> wake_;
  std::atomic<bool> pending_{false};
};

// A wake-up that sends `poll` to `self` (an actor of handle type `Handle`),
// holding only a weak reference to it: it must not keep the actor alive.
template <class Handle, class Self, class... Queue>
std::unique_ptr<queue_wakeup> poll_on_wakeup(Self* self, Queue... queue) {
  auto weak = caf::actor_cast<caf::weak_actor_ptr>(self);
  return std::make_unique<queue_wakeup>(queue..., [weak] {
    if (auto strong = weak.lock())
      caf::anon_send(caf::actor_cast<Handle>(strong), messages::poll_atom_v);
  });
}

// The ingress consumer's current place in its group (member id and
// generation), which the egress's transactional producer sends with the
// offsets it commits (kafka.exactly_once), so that the broker refuses the
// commit of a member that has lost its partitions. Set by the ingress at
// each assignment; read by the egress at each commit, on another thread.
class group_membership {
 public:
  void update(RdKafka::KafkaConsumer& consumer);
  // The last one set; null before the first assignment.
  std::shared_ptr<RdKafka::ConsumerGroupMetadata> current() const;
  // A number of its own for each ingress started, so that the egress can
  // tell the answers of a failed ingress from its successor's.
  uint64_t next_epoch() { return ++epochs_; }

 private:
  mutable std::mutex mtx_;
  std::shared_ptr<RdKafka::ConsumerGroupMetadata> meta_;
  std::atomic<uint64_t> epochs_{0};
};

// From now on, librdkafka's log lines of every client made by make_conf or
// create_topics go to spdlog (its level and format, prefixed "kafka:"),
// not to stderr in librdkafka's own format. tailord turns it on; tools
// whose stdout is data (tailorctl) keep librdkafka's default.
void log_kafka_through_spdlog();

// From a consumer's statistics (librdkafka's JSON), the messages of
// `topic` after those it has handed over, over the partitions it is
// assigned. Before it has handed one over since the assignment (a partition
// idle since a restart), it counts from the offset committed, where it
// started; from the partition's start where none was. Partitions whose end
// is not known yet count none.
int64_t consumer_lag(const nlohmann::json& statistics, const std::string& topic);

// What a consumer of tailord tells beside its messages: its log lines and
// errors go to spdlog, and librdkafka's statistics (each second) give how
// many of the cluster's brokers it is connected to, `client`'s
// tailor_kafka_brokers_up, and the lag of each of `lag_topics`
// (tailor_consumer_lag). For consumers only: they keep a connection to
// their group's coordinator and their partitions' leaders, where an idle
// producer may rightly hold none. Give it to make_conf; it must outlive the
// client.
std::unique_ptr<RdKafka::EventCb> watch_brokers(const std::string& client,
                                                std::shared_ptr<metrics> stats,
                                                std::vector<std::string> lag_topics = {});

// A client configuration: bootstrap.servers plus `extra`, then every
// pass-through property (so an operator's setting wins over ours), and
// `events` when given (watch_brokers). Returns null and sets `err` on an
// unknown or invalid property.
std::unique_ptr<RdKafka::Conf> make_conf(
    const kafka_config& cfg, const std::vector<std::pair<std::string, std::string>>& extra,
    std::string& err, RdKafka::EventCb* events = nullptr);

// Looks `topic` up through `client` now: its handle, which keeps the topic
// known, and its partitions' ids in `partitions` when given; null, with
// `err`, when the lookup failed or the cluster does not have the topic. A
// producer otherwise learns a topic's partitions at librdkafka's next scan
// of unknown topics (each second), and its first message there waits for
// it: a tailord's first answers took up to a second more than the next
// (docs/measurements.md).
std::unique_ptr<RdKafka::Topic> look_up_topic(RdKafka::Handle& client, const std::string& topic,
                                              int timeout_ms, std::string& err,
                                              std::vector<int32_t>* partitions = nullptr);

// The settings every consumer of tailord adds to its own: fetch.wait.max.ms
// where `cfg` sets fetch_wait_ms.
std::vector<std::pair<std::string, std::string>> consumer_settings(const kafka_config& cfg);

// Creates `topics` through the Admin API, those also in `compacted` with
// cleanup.policy=compact; existing ones are fine (and left as they are).
// Returns an error message, empty on success.
std::string create_topics(const kafka_config& cfg, const std::vector<std::string>& topics,
                          const std::vector<std::string>& compacted = {},
                          int timeout_ms = 30000);

}  // namespace tailor::actors
