#include "actors/config.hpp"

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace tailor::actors {

namespace {

using json = nlohmann::json;

// Copies j[key] into out when present; a wrong type is an error naming the key.
template <class T>
bool take(const json& j, const char* key, T& out, const std::string& where, std::string& err) {
  auto it = j.find(key);
  if (it == j.end()) return true;
  try {
    out = it->get<T>();
    return true;
  } catch (const json::exception&) {
    err = where + key + ": has the wrong type";
    return false;
  }
}

}  // namespace

std::string load_config_file(const std::string& path, engine_config& cfg) {
  std::ifstream in(path);
  if (!in) return "cannot read configuration file " + path;
  std::stringstream ss;
  ss << in.rdbuf();
  json j = json::parse(ss.str(), nullptr, false, true);
  if (j.is_discarded() || !j.is_object()) return path + ": is not a JSON object";
  static const std::vector<std::string> known = {
      "kafka",         "data_dir",           "sync_writes", "admin",
      "base_models",   "default_base_model", "limits",      "user_idle_seconds",
      "max_in_flight", "log_level",          "ready_file"};
  for (auto it = j.begin(); it != j.end(); ++it)
    if (std::find(known.begin(), known.end(), it.key()) == known.end())
      return path + ": unknown key '" + it.key() + "'";
  std::string err;
  bool ok = take(j, "data_dir", cfg.data_dir, "", err) &&
            take(j, "sync_writes", cfg.sync_writes, "", err) &&
            take(j, "base_models", cfg.base_models, "", err) &&
            take(j, "default_base_model", cfg.default_base_model, "", err) &&
            take(j, "user_idle_seconds", cfg.user_idle_seconds, "", err) &&
            take(j, "max_in_flight", cfg.max_in_flight, "", err) &&
            take(j, "log_level", cfg.log_level, "", err) &&
            take(j, "ready_file", cfg.ready_file, "", err);
  if (ok && j.contains("admin")) {
    const auto& a = j["admin"];
    ok = take(a, "host", cfg.admin_host, "admin.", err) &&
         take(a, "port", cfg.admin_port, "admin.", err);
  }
  if (ok && j.contains("kafka")) {
    const auto& k = j["kafka"];
    auto& kc = cfg.kafka;
    ok = take(k, "bootstrap_servers", kc.bootstrap_servers, "kafka.", err) &&
         take(k, "group_id", kc.group_id, "kafka.", err) &&
         take(k, "properties", kc.properties, "kafka.", err) &&
         take(k, "create_topics", kc.create_topics, "kafka.", err) &&
         take(k, "topic_partitions", kc.topic_partitions, "kafka.", err) &&
         take(k, "replication_factor", kc.replication_factor, "kafka.", err);
    if (ok && k.contains("topics")) {
      const auto& t = k["topics"];
      auto& tn = kc.topics;
      ok = take(t, "onboarding", tn.onboarding, "kafka.topics.", err) &&
           take(t, "inference", tn.inference, "kafka.topics.", err) &&
           take(t, "control", tn.control, "kafka.topics.", err) &&
           take(t, "results", tn.results, "kafka.topics.", err) &&
           take(t, "events", tn.events, "kafka.topics.", err) &&
           take(t, "dlq", tn.dlq, "kafka.topics.", err);
    }
  }
  if (ok && j.contains("limits")) {
    const auto& l = j["limits"];
    auto& lim = cfg.limits;
    ok = take(l, "max_event_bytes", lim.max_event_bytes, "limits.", err) &&
         take(l, "max_texts", lim.max_texts, "limits.", err) &&
         take(l, "max_texts_bytes", lim.max_texts_bytes, "limits.", err) &&
         take(l, "max_prompts", lim.max_prompts, "limits.", err) &&
         take(l, "max_prompt_bytes", lim.max_prompt_bytes, "limits.", err) &&
         take(l, "max_tokens", lim.max_tokens, "limits.", err);
  }
  if (!ok) return path + ": " + err;
  return {};
}

}  // namespace tailor::actors
