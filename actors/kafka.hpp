#pragma once

#include <memory>
#include <string>
#include <vector>

#include "actors/config.hpp"

namespace RdKafka {
class Conf;
}
struct rd_kafka_s;
struct rd_kafka_mock_cluster_s;

namespace tailor::actors {

// librdkafka's embedded mock cluster: the demo default when no
// bootstrap.servers is configured. Lives as long as this object.
class mock_cluster {
 public:
  static std::unique_ptr<mock_cluster> start(int brokers, std::string& err);
  ~mock_cluster();
  const std::string& bootstrap() const { return bootstrap_; }
  std::string create_topic(const std::string& name, int partitions);

 private:
  mock_cluster() = default;
  rd_kafka_s* rk_ = nullptr;
  rd_kafka_mock_cluster_s* cluster_ = nullptr;
  std::string bootstrap_;
};

// A client configuration: bootstrap.servers plus every pass-through property,
// then `extra`. Returns null and sets `err` on an unknown or invalid property.
std::unique_ptr<RdKafka::Conf> make_conf(
    const kafka_config& cfg, const std::vector<std::pair<std::string, std::string>>& extra,
    std::string& err);

// Creates `topics` through the Admin API; existing ones are fine. Returns an
// error message, empty on success.
std::string create_topics(const kafka_config& cfg, const std::vector<std::string>& topics,
                          int timeout_ms = 30000);

}  // namespace tailor::actors
