#pragma once

#include <map>
#include <string>
#include <vector>

#include "messages/limits.hpp"

namespace tailor::actors {

struct topic_names {
  std::string onboarding = "tailor.onboarding";
  std::string inference = "tailor.inference";
  std::string control = "tailor.control";
  std::string results = "tailor.results";
  std::string events = "tailor.events";
  std::string dlq = "tailor.dlq";
};

struct kafka_config {
  // Empty: start librdkafka's embedded mock cluster (the demo default).
  std::string bootstrap_servers;
  std::string group_id = "tailor";
  topic_names topics;
  // Passed to every librdkafka client as is (SASL, TLS, tuning).
  std::map<std::string, std::string> properties;
  bool create_topics = true;
  int topic_partitions = 4;
  int replication_factor = 1;
};

struct engine_config {
  kafka_config kafka;
  std::string data_dir;  // RocksDB and artifacts; default $TAILOR_HOME/engine
  bool sync_writes = false;
  std::string admin_host = "127.0.0.1";
  int admin_port = 8080;   // 0: any free port (printed and written to ready_file)
  std::string ready_file;  // JSON {admin_port, bootstrap_servers} once ready
  std::vector<std::string> base_models = {"tailor-base"};
  std::string default_base_model = "tailor-base";
  messages::limits limits;
  int user_idle_seconds = 60;
  int max_in_flight = 256;  // per input topic; above it the ingress pauses
  std::string log_level = "info";
};

// Reads a JSON configuration file over `cfg`; returns an error message naming
// the offending key, empty on success.
std::string load_config_file(const std::string& path, engine_config& cfg);

}  // namespace tailor::actors
