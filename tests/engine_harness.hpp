#pragma once

// Test harness for tests against a real Kafka broker: the broker started by
// the CTest fixture (scripts/kafka-broker), a tailord child process with its
// own topics, a collector that reads Tailor's output topics, and waits on
// conditions with deadlines.
#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

namespace RdKafka {
class KafkaConsumer;
class Producer;
}  // namespace RdKafka

namespace tailor::test {

using json = nlohmann::json;
using namespace std::chrono_literals;

// Bootstrap servers of the fixture's broker; fails the test when absent.
std::string broker_bootstrap();

// Polls `pred` until it holds or `timeout` passes.
bool wait_until(const std::function<bool()>& pred, std::chrono::milliseconds timeout);

struct topic_set {
  std::string onboarding, inference, control, results, events, dlq;
};

// A tailord child process with a fresh data directory and topic names of its own.
class engine_process {
 public:
  explicit engine_process(const std::string& name, json extra_config = json::object());
  ~engine_process();
  void start();  // waits until ready (consumers joined)
  int stop();    // SIGTERM; returns the exit status
  void kill();   // SIGKILL, no cleanup
  const topic_set& topics() const { return topics_; }
  int admin_port() const { return admin_port_; }
  const std::string& bootstrap() const { return bootstrap_; }
  const std::string& data_dir() const { return dir_; }
  // GET on the admin API: status and body.
  std::pair<int, std::string> get(const std::string& path) const;

 private:
  std::string dir_, bootstrap_, group_;
  topic_set topics_;
  json extra_;
  pid_t pid_ = -1;
  int admin_port_ = -1;
};

// Produces raw records.
class producer {
 public:
  explicit producer(const std::string& bootstrap);
  ~producer();
  void send(const std::string& topic, const std::string& key, const std::string& payload);
  void flush();

 private:
  std::unique_ptr<RdKafka::Producer> p_;
};

// Reads topics from the beginning on a thread of its own.
class collector {
 public:
  struct record {
    std::string topic, key, payload;
    json value;  // parsed payload (discarded when not JSON)
  };
  collector(const std::string& bootstrap, const std::vector<std::string>& topics);
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
json inference(const std::string& user, const std::string& request,
               const std::string& prompt = "hi");

}  // namespace tailor::test
