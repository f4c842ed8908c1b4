#pragma once

// What the end-to-end benchmarks share: a Kafka broker (the project's own
// script, unless servers are given) and a tailord child process configured
// for the run, with its admin API, memory and metrics at hand.
#include <sys/types.h>

#include <atomic>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace RdKafka {
class Producer;
class DeliveryReportCb;
class KafkaConsumer;
}  // namespace RdKafka

namespace tailor::bench {

// A Kafka broker of the project's script (scripts/kafka-broker) in `dir`,
// stopped when this object goes.
class kafka_broker {
 public:
  explicit kafka_broker(const std::string& dir);  // throws with the script's output
  ~kafka_broker();
  kafka_broker(const kafka_broker&) = delete;
  kafka_broker& operator=(const kafka_broker&) = delete;
  const std::string& bootstrap() const { return bootstrap_; }

 private:
  std::string dir_, bootstrap_;
};

struct engine_run_options {
  std::string bootstrap;  // empty: start a broker with scripts/kafka-broker
  std::string tailord = TAILORD_PATH;
  nlohmann::json config;  // merged over the run's own settings (topics, dirs, ports)
  // Called with tailord's data directory before tailord starts (to register models).
  std::function<void(const std::string& data_dir)> prepare;
  // On a broker given by `bootstrap`, the run's topics and consumer groups
  // are deleted when it ends, unless this is set (to read them afterwards).
  bool keep_topics = false;
};

class engine_run {
 public:
  // Starts what is needed and waits until tailord is ready; throws with the
  // reason (and tailord's log) when it cannot, having stopped and removed
  // what it started (tailord, its topics on a given broker, the directory).
  explicit engine_run(const engine_run_options& o);
  // Stops tailord (SIGTERM) and the broker it started; on a given broker,
  // deletes the run's topics and groups (engine_run_options::keep_topics).
  ~engine_run();

  const std::string& bootstrap() const { return bootstrap_; }
  // Topic names of this run, by role (onboarding, inference, control, results, events, dlq).
  std::string topic(const std::string& role) const { return prefix_ + role; }
  pid_t pid() const { return pid_; }
  // From /proc: resident set size now, and its peak so far (MB).
  double rss_mb() const;
  double peak_rss_mb() const;
  // GET on the admin API; throws on a transport failure.
  std::string get(const std::string& path) const;
  // An unlabelled metric, or one with a label {label="value"}; -1 when absent.
  double metric(const std::string& name, const std::string& label = {},
                const std::string& value = {}) const;
  // The sum of a metric's series whose labels contain `labels` (e.g.
  // state="running"); 0 when none.
  double metric_sum(const std::string& name, const std::string& labels) const;
  int stop();  // SIGTERM; the exit status

 private:
  void start(const engine_run_options& o);
  void release();  // stops tailord and the broker, deletes topics and groups, removes dir_

  std::string dir_, bootstrap_, prefix_, group_;
  bool keep_topics_ = false;
  std::optional<kafka_broker> broker_;  // when no bootstrap servers were given
  pid_t pid_ = -1;
  int admin_port_ = -1;
};

// Reads an operator's tailord configuration (a JSON object, as
// docs/configuration.md) for a run to start from; the bench's own options
// are merged over it. Keys that are the run's own (data_dir, admin,
// ready_file, kafka.bootstrap_servers, kafka.group_id, kafka.topics) are
// refused, as the run could not clean up after them. Returns an error
// message, empty on success.
std::string read_tailord_config(const std::string& path, nlohmann::json& out);

// Deletes `topics` and consumer `groups` through the Admin API; those that do
// not exist are fine. Returns an error message, empty on success.
std::string delete_topics_and_groups(const std::string& bootstrap,
                                     const std::vector<std::string>& topics,
                                     const std::vector<std::string>& groups,
                                     int timeout_ms = 30000);

// The consumer group of a topic_watch of `topic`.
std::string watch_group(const std::string& topic);

// Reads a topic from the beginning on a thread of its own and hands every
// JSON object to `on_record` (on that thread).
class topic_watch {
 public:
  topic_watch(const std::string& bootstrap, const std::string& topic,
              std::function<void(const nlohmann::json&)> on_record);
  ~topic_watch();

 private:
  std::unique_ptr<RdKafka::KafkaConsumer> consumer_;
  std::function<void(const nlohmann::json&)> on_record_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// A producer with delivery checks; `flush` throws when a message failed.
class bench_producer {
 public:
  // `linger_ms`: how long librdkafka waits to fill a produce request (its
  // own default is 5), as the clients being modelled would.
  explicit bench_producer(const std::string& bootstrap, int linger_ms = 5);
  ~bench_producer();
  // `timestamp_ms`: the record's CreateTime (0: now).
  void send(const std::string& topic, const std::string& key, const std::string& payload,
            int64_t timestamp_ms = 0);
  void flush();
  void poll();  // serves delivery reports without waiting

 private:
  std::unique_ptr<RdKafka::DeliveryReportCb> reports_;
  std::unique_ptr<RdKafka::Producer> p_;
};

}  // namespace tailor::bench
