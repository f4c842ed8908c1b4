#pragma once

// Test harness for tests against a real Kafka broker: the broker started by
// the CTest fixture (scripts/kafka-broker), a tailord child process with its
// own topics, a collector that reads Tailor's output topics, and waits on
// conditions with deadlines.
#include <gtest/gtest.h>
#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "actors/kafka.hpp"
#include "engine_run.hpp"

namespace RdKafka {
class KafkaConsumer;
}  // namespace RdKafka

namespace tailor::test {

using json = nlohmann::json;
using namespace std::chrono_literals;

// Bootstrap servers of the fixture's broker; fails the test when absent.
std::string broker_bootstrap();

// Polls `pred` until it holds or `timeout` passes.
bool wait_until(const std::function<bool()>& pred, std::chrono::milliseconds timeout);

// How many times `what` occurs in `text` (a log, say).
std::size_t occurrences(const std::string& text, const std::string& what);

struct topic_set {
  std::string onboarding, inference, control, results, events, dlq, state;
};

// tailord's configuration of the tiny test base (pre-trained once per build
// tree, in seconds), so that no test waits for the default base to be
// pre-trained on a machine that has none yet.
json test_base_config();

// A tailord child process with a fresh data directory and topic names of its own.
class engine_process {
 public:
  // `bootstrap` empty: the test broker's.
  explicit engine_process(const std::string& name, json extra_config = json::object(),
                          const std::string& bootstrap = "");
  ~engine_process();
  void start();  // waits until ready (consumers joined)
  // Before start(): the broker, topics and consumer group of `other`, so
  // that the two share the topics' partitions.
  void join_group_of(const engine_process& other);
  // Before a (re)start: merges `patch` into its configuration.
  void reconfigure(const json& patch) { extra_.merge_patch(patch); }
  int stop();    // SIGTERM; returns the exit status
  void kill();   // SIGKILL, no cleanup
  // Waits up to `timeout` for it to end by itself: its exit status, or -1.
  int wait_exit(std::chrono::milliseconds timeout);
  // The last `lines` lines of its log.
  std::string log_tail(std::size_t lines) const;
  const topic_set& topics() const { return topics_; }
  int admin_port() const { return admin_port_; }
  const std::string& bootstrap() const { return bootstrap_; }
  const std::string& data_dir() const { return dir_; }
  const std::string& group() const { return group_; }
  pid_t pid() const { return pid_; }
  // GET on the admin API: status and body; with `token` as a bearer token.
  std::pair<int, std::string> get(const std::string& path, const std::string& token = "") const;

 private:
  std::string dir_, bootstrap_, group_;
  topic_set topics_;
  json extra_;
  pid_t pid_ = -1;
  int admin_port_ = -1;
};

// The offsets `group` has committed on partitions 0..partitions-1 of
// `topic`, summed (a partition with none counts 0); -1 when the broker does
// not answer.
int64_t committed_total(const std::string& bootstrap, const std::string& group,
                        const std::string& topic, int partitions);

// Produces raw records; flush() fails on any undelivered one.
using producer = tailor::bench::bench_producer;

// Reads topics from the beginning on a thread of its own.
class collector {
 public:
  struct record {
    std::string topic, key, payload;
    json value;              // parsed payload (discarded when not JSON)
    bool tombstone = false;  // a null value
  };
  // `uncommitted`: also the records of transactions not (yet) committed
  // or aborted (isolation.level read_uncommitted), as a consumer that
  // ignores transactions sees them.
  collector(const std::string& bootstrap, const std::vector<std::string>& topics,
            bool uncommitted = false);
  ~collector();
  std::vector<record> snapshot() const;
  std::size_t size() const;
  // Records of `topic` whose JSON satisfies `pred`.
  std::vector<record> matching(const std::string& topic,
                               const std::function<bool(const json&)>& pred) const;

 private:
  void run();
  std::unique_ptr<RdKafka::KafkaConsumer> c_;
  mutable std::mutex mtx_;
  std::vector<record> records_;
  bool stop_ = false;
  std::thread thread_;
};

json onboarding(const std::string& user, const std::string& request,
                std::vector<std::string> texts = {"hello"});
// An onboarding request with hyperparameters (and prompts).
json onboarding_with(const std::string& user, const std::string& request, json hyperparameters,
                     std::vector<std::string> prompts = {});
json job_cancel(const std::string& user, const std::string& job_id);

// A tailord under test, a producer into its input topics and a collector of
// its output topics.
class engine_test : public ::testing::Test {
 protected:
  void start(json extra = json::object());
  // start() on other Kafka servers than the test broker (librdkafka's mock
  // cluster, as a fault injector), after `make_topics` has made the topics
  // there.
  void start_on(const std::string& bootstrap, json extra,
                const std::function<void(const topic_set&)>& make_topics);
  // start_on() a mock cluster of its own (mock_), which has no
  // CreateTopics: the topics are made through its API, four partitions each.
  void start_on_mock(json extra);
  // start() with the fault injector `name` set to `value` in tailord's
  // environment (docs/operations.md, "Stopping and crashing").
  void start_with_fault(const char* name, const char* value, json extra = json::object());
  void send_onboarding(const json& j, int64_t timestamp_ms = 0);
  // `timestamp_ms`: the record's CreateTime (0: now).
  void send_inference(const json& j, int64_t timestamp_ms = 0);
  void send_control(const json& j);
  // Answers (results and events) naming (user, request), in arrival order.
  std::vector<collector::record> answers_to(const std::string& user, const std::string& request);
  // The first answer to (user, request), waiting up to 30 s for it.
  collector::record await_one(const std::string& user, const std::string& request);
  // Events of `type` about (user, request).
  std::vector<collector::record> events_of(const std::string& user, const std::string& request,
                                           const std::string& type);
  // Waits up to `timeout` for an event of `type` about (user, request).
  collector::record await_event(const std::string& user, const std::string& request,
                                const std::string& type, std::chrono::milliseconds timeout = 60s);
  // Waits up to `timeout` for a record of `topic` (one the collector reads)
  // whose JSON satisfies `pred`: the first such.
  collector::record await_match(const std::string& topic,
                                const std::function<bool(const json&)>& pred,
                                std::chrono::milliseconds timeout = 30s);
  // Whether (user, request)'s job has reported progress past `step`.
  bool progressed_past(const std::string& user, const std::string& request, int step);
  // Sends `n` inference requests q0, q1 ... from `users` users with no
  // model (`prefix`0, `prefix`1 ... in turn) and checks that each is
  // answered with no_ready_model.
  void ask_users_without_a_model(const std::string& prefix, int users, int n);
  // The value of an unlabelled metric, or -1.
  double metric(const std::string& name);

  // Declared first, so that it goes last: after the clients that use it.
  std::unique_ptr<tailor::actors::mock_cluster> mock_;
  std::unique_ptr<engine_process> engine_;
  std::unique_ptr<collector> out_;
  std::unique_ptr<producer> in_;
};
json inference(const std::string& user, const std::string& request,
               const std::string& prompt = "hi");

}  // namespace tailor::test
