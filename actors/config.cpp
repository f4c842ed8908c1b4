#include "actors/config.hpp"

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "messages/ids.hpp"

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

std::string validate(const engine_config& cfg) {
  const auto& t = cfg.training;
  const auto& b = cfg.limits.hyperparameters;
  auto bad = [](const std::string& key, const std::string& why) { return key + ": " + why; };
  if (t.slots < 1) return bad("training.slots", "must be at least 1");
  if (t.admission_queue < 1) return bad("training.admission_queue", "must be at least 1");
  if (t.max_jobs_per_user < 1) return bad("training.max_jobs_per_user", "must be at least 1");
  if (t.max_attempts < 1) return bad("training.max_attempts", "must be at least 1");
  if (t.retry_backoff_ms < 0) return bad("training.retry_backoff_ms", "must not be negative");
  if (t.checkpoint_every < 0) return bad("training.checkpoint_every", "must not be negative");
  if (t.progress_interval_ms < 0)
    return bad("training.progress_interval_ms", "must not be negative");
  if (t.defaults.rank < b.min_rank || t.defaults.rank > b.max_rank)
    return bad("training.rank", "outside the hyperparameter bounds");
  if (t.defaults.alpha < b.min_alpha || t.defaults.alpha > b.max_alpha)
    return bad("training.alpha", "outside the hyperparameter bounds");
  if (t.defaults.steps != 0 && (t.defaults.steps < b.min_steps || t.defaults.steps > b.max_steps))
    return bad("training.steps", "outside the hyperparameter bounds (0: from the data)");
  if (t.defaults.learning_rate < b.min_learning_rate ||
      t.defaults.learning_rate > b.max_learning_rate)
    return bad("training.learning_rate", "outside the hyperparameter bounds");
  if (t.defaults.batch_size < b.min_batch_size || t.defaults.batch_size > b.max_batch_size)
    return bad("training.batch_size", "outside the hyperparameter bounds");
  if (t.prompt_max_tokens < 1) return bad("training.prompt_max_tokens", "must be at least 1");
  if (cfg.kafka.commit_interval_ms < 0)
    return bad("kafka.commit_interval_ms", "must be 0 (every poll) or more");
  if (cfg.admin_max_user_series < 1) return bad("admin.max_user_series", "must be at least 1");
  if (cfg.store_memory_mb < 0 || (cfg.store_memory_mb > 0 && cfg.store_memory_mb < 8))
    return bad("store_memory_mb", "must be 0 (RocksDB's defaults) or at least 8");
  if (cfg.history_retention_days < 0)
    return bad("history_retention_days", "must be 0 (kept forever) or more");
  if (cfg.memory_trim_idle_seconds < 0)
    return bad("memory_trim_idle_seconds", "must be 0 (never) or more");
  if (cfg.stop_timeout_seconds < 0)
    return bad("stop_timeout_seconds", "must be 0 (no limit) or more");
  const auto& in = cfg.instance;
  if (!in.id.empty() && !messages::is_valid_id(in.id))
    return bad("instance.id", "must be 1-128 characters of [A-Za-z0-9._:-]");
  if (in.heartbeat_ms < 1) return bad("instance.heartbeat_ms", "must be at least 1");
  if (in.takeover_after_ms != 0 && in.takeover_after_ms < 2 * in.heartbeat_ms)
    return bad("instance.takeover_after_ms",
               "must be 0 (never take over) or at least twice instance.heartbeat_ms");
  const auto& v = cfg.serving;
  if (v.devices < 1) return bad("serving.devices", "must be at least 1");
  if (v.max_batch < 1) return bad("serving.max_batch", "must be at least 1");
  if (v.max_tokens_in_flight < 1) return bad("serving.max_tokens_in_flight", "must be at least 1");
  if (v.device_adapters < 1) return bad("serving.device_adapters", "must be at least 1");
  if (v.host_adapters < 0) return bad("serving.host_adapters", "must not be negative");
  if (v.prefix_cache_entries < 0)
    return bad("serving.prefix_cache_entries", "must not be negative (0 turns it off)");
  if (v.prefix_cache_mb < 1)
    return bad("serving.prefix_cache_mb",
               "must be at least 1 (serving.prefix_cache_entries 0 turns the cache off)");
  if (v.max_requests_per_user < 1)
    return bad("serving.max_requests_per_user", "must be at least 1");
  if (v.prefill_chunk < 0)
    return bad("serving.prefill_chunk", "must not be negative (0: whole prompts)");
  if (v.default_max_tokens < 1 || v.default_max_tokens > cfg.limits.max_tokens)
    return bad("serving.default_max_tokens", "must lie in [1, limits.max_tokens]");
  if (v.default_min_tokens < 0 || v.default_min_tokens > cfg.limits.max_tokens)
    return bad("serving.default_min_tokens", "must lie in [0, limits.max_tokens]");
  if (v.default_temperature < 0) return bad("serving.default_temperature", "must not be negative");
  if (v.deadline_ms < 1) return bad("serving.deadline_ms", "must be at least 1");
  if (v.batch_thread != "shared" && v.batch_thread != "realtime")
    return bad("serving.batch_thread", "must be \"shared\" or \"realtime\"");
  if (v.kv_cache != "float16" && v.kv_cache != "float32")
    return bad("serving.kv_cache", "must be \"float16\" or \"float32\"");
  if (v.products != "auto" && v.products != "amx" && v.products != "bfloat16" &&
      v.products != "float32")
    return bad("serving.products", "must be \"auto\", \"amx\", \"bfloat16\" or \"float32\"");
  if (v.step_helper != "auto" && v.step_helper != "on" && v.step_helper != "off")
    return bad("serving.step_helper", "must be \"auto\", \"on\" or \"off\"");
  if (v.max_rank < b.max_rank)
    return bad("serving.max_rank", "must be at least the largest rank onboarding accepts (" +
                                       std::to_string(b.max_rank) + ")");
  if (cfg.compute.intra_op_threads < 0 || cfg.compute.blas_threads < 0 ||
      cfg.compute.actor_threads < 0)
    return bad("compute", "thread counts must not be negative");
  if (cfg.compute.scheduling != "batch" && cfg.compute.scheduling != "normal")
    return bad("compute.scheduling", "must be \"batch\" or \"normal\"");
  if (cfg.models.pretrain_minutes <= 0 && cfg.models.pretrain_steps <= 0)
    return bad("models.pretrain_minutes", "must be positive (or set pretrain_steps)");
  if (cfg.base_models.empty()) return bad("base_models", "must name at least one base model");
  if (std::find(cfg.base_models.begin(), cfg.base_models.end(), cfg.default_base_model) ==
      cfg.base_models.end())
    return bad("default_base_model", "'" + cfg.default_base_model + "' is not in base_models");
  return {};
}

std::string read_admin_token(const std::string& path, std::string& token) {
  std::ifstream in(path);
  if (!in) return "cannot read " + path;
  std::string line;
  std::getline(in, line);
  const auto first = line.find_first_not_of(" \t\r");
  const auto last = line.find_last_not_of(" \t\r");
  if (first == std::string::npos) return path + " holds no token on its first line";
  token = line.substr(first, last - first + 1);
  return {};
}

std::string load_config_file(const std::string& path, engine_config& cfg) {
  std::ifstream in(path);
  if (!in) return "cannot read configuration file " + path;
  std::stringstream ss;
  ss << in.rdbuf();
  json j = json::parse(ss.str(), nullptr, false, true);
  if (j.is_discarded() || !j.is_object()) return path + ": is not a JSON object";
  static const std::vector<std::string> known = {
      "kafka",     "data_dir",          "sync_writes",
      "admin",     "base_models",       "default_base_model",
      "limits",    "user_idle_seconds", "max_in_flight", "memory_trim_idle_seconds",
      "log_level", "ready_file",        "artifact_dir",
      "training",  "compute",           "models",
      "serving",   "instance",          "store_memory_mb",
      "stop_timeout_seconds", "history_retention_days"};
  for (auto it = j.begin(); it != j.end(); ++it)
    if (std::find(known.begin(), known.end(), it.key()) == known.end())
      return path + ": unknown key '" + it.key() + "'";
  std::string err;
  bool ok = take(j, "data_dir", cfg.data_dir, "", err) &&
            take(j, "sync_writes", cfg.sync_writes, "", err) &&
            take(j, "store_memory_mb", cfg.store_memory_mb, "", err) &&
            take(j, "history_retention_days", cfg.history_retention_days, "", err) &&
            take(j, "base_models", cfg.base_models, "", err) &&
            take(j, "default_base_model", cfg.default_base_model, "", err) &&
            take(j, "user_idle_seconds", cfg.user_idle_seconds, "", err) &&
            take(j, "memory_trim_idle_seconds", cfg.memory_trim_idle_seconds, "", err) &&
            take(j, "stop_timeout_seconds", cfg.stop_timeout_seconds, "", err) &&
            take(j, "max_in_flight", cfg.max_in_flight, "", err) &&
            take(j, "log_level", cfg.log_level, "", err) &&
            take(j, "ready_file", cfg.ready_file, "", err) &&
            take(j, "artifact_dir", cfg.artifact_dir, "", err);
  if (ok && j.contains("kafka")) {
    const auto& k = j["kafka"];
    auto& kc = cfg.kafka;
    ok = take(k, "bootstrap_servers", kc.bootstrap_servers, "kafka.", err) &&
         take(k, "group_id", kc.group_id, "kafka.", err) &&
         take(k, "properties", kc.properties, "kafka.", err) &&
         take(k, "create_topics", kc.create_topics, "kafka.", err) &&
         take(k, "topic_partitions", kc.topic_partitions, "kafka.", err) &&
         take(k, "replication_factor", kc.replication_factor, "kafka.", err) &&
         take(k, "commit_interval_ms", kc.commit_interval_ms, "kafka.", err) &&
         take(k, "exactly_once", kc.exactly_once, "kafka.", err);
    if (ok && k.contains("topics")) {
      const auto& t = k["topics"];
      auto& tn = kc.topics;
      ok = take(t, "onboarding", tn.onboarding, "kafka.topics.", err) &&
           take(t, "inference", tn.inference, "kafka.topics.", err) &&
           take(t, "control", tn.control, "kafka.topics.", err) &&
           take(t, "results", tn.results, "kafka.topics.", err) &&
           take(t, "events", tn.events, "kafka.topics.", err) &&
           take(t, "dlq", tn.dlq, "kafka.topics.", err) &&
           take(t, "state", tn.state, "kafka.topics.", err);
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
  auto section = [&](const char* name, const std::vector<std::string>& keys) {
    if (!ok || !j.contains(name)) return false;
    const auto& sj = j[name];
    if (!sj.is_object()) {
      err = std::string(name) + ": must be an object";
      ok = false;
      return false;
    }
    for (auto it = sj.begin(); it != sj.end(); ++it)
      if (std::find(keys.begin(), keys.end(), it.key()) == keys.end()) {
        err = std::string(name) + ": unknown key '" + it.key() + "'";
        ok = false;
        return false;
      }
    return true;
  };
  // Checked for its keys only (read above): a misspelt key, such as
  // `exactly_one`, would otherwise leave its default silently.
  section("kafka", {"bootstrap_servers", "group_id", "properties", "create_topics",
                    "topic_partitions", "replication_factor", "commit_interval_ms", "exactly_once",
                    "topics"});
  if (section("training",
              {"slots", "admission_queue", "max_jobs_per_user", "max_attempts", "retry_backoff_ms",
               "checkpoint_every", "progress_interval_ms", "data_dir", "max_data_bytes", "rank",
               "alpha", "steps", "learning_rate", "batch_size", "seed", "prompt_max_tokens"})) {
    const auto& t = j["training"];
    auto& tc = cfg.training;
    const std::string w = "training.";
    ok = take(t, "slots", tc.slots, w, err) &&
         take(t, "admission_queue", tc.admission_queue, w, err) &&
         take(t, "max_jobs_per_user", tc.max_jobs_per_user, w, err) &&
         take(t, "max_attempts", tc.max_attempts, w, err) &&
         take(t, "retry_backoff_ms", tc.retry_backoff_ms, w, err) &&
         take(t, "checkpoint_every", tc.checkpoint_every, w, err) &&
         take(t, "progress_interval_ms", tc.progress_interval_ms, w, err) &&
         take(t, "data_dir", tc.data_dir, w, err) &&
         take(t, "max_data_bytes", tc.max_data_bytes, w, err) &&
         take(t, "rank", tc.defaults.rank, w, err) && take(t, "alpha", tc.defaults.alpha, w, err) &&
         take(t, "steps", tc.defaults.steps, w, err) &&
         take(t, "learning_rate", tc.defaults.learning_rate, w, err) &&
         take(t, "batch_size", tc.defaults.batch_size, w, err) &&
         take(t, "seed", tc.defaults.seed, w, err) &&
         take(t, "prompt_max_tokens", tc.prompt_max_tokens, w, err);
  }
  if (section("serving",
              {"devices", "max_batch", "max_tokens_in_flight", "device_adapters", "host_adapters",
               "max_rank", "prefix_cache_entries", "prefix_cache_mb", "max_requests_per_user",
               "default_max_tokens", "default_min_tokens", "default_temperature", "deadline_ms",
               "pinned_models", "batch_thread", "kv_cache", "products", "prefill_chunk",
               "step_helper"})) {
    const auto& v = j["serving"];
    auto& sc = cfg.serving;
    const std::string w = "serving.";
    // true and false: the spellings before "auto" (every big step, none).
    const auto helper = v.find("step_helper");
    const bool helper_bool = helper != v.end() && helper->is_boolean();
    if (helper_bool) sc.step_helper = helper->get<bool>() ? "on" : "off";
    ok = take(v, "devices", sc.devices, w, err) && take(v, "max_batch", sc.max_batch, w, err) &&
         take(v, "max_tokens_in_flight", sc.max_tokens_in_flight, w, err) &&
         take(v, "device_adapters", sc.device_adapters, w, err) &&
         take(v, "host_adapters", sc.host_adapters, w, err) &&
         take(v, "max_rank", sc.max_rank, w, err) &&
         take(v, "prefix_cache_entries", sc.prefix_cache_entries, w, err) &&
         take(v, "prefix_cache_mb", sc.prefix_cache_mb, w, err) &&
         take(v, "max_requests_per_user", sc.max_requests_per_user, w, err) &&
         take(v, "default_max_tokens", sc.default_max_tokens, w, err) &&
         take(v, "default_min_tokens", sc.default_min_tokens, w, err) &&
         take(v, "default_temperature", sc.default_temperature, w, err) &&
         take(v, "deadline_ms", sc.deadline_ms, w, err) &&
         take(v, "pinned_models", sc.pinned_models, w, err) &&
         take(v, "batch_thread", sc.batch_thread, w, err) &&
         take(v, "kv_cache", sc.kv_cache, w, err) &&
         take(v, "products", sc.products, w, err) &&
         take(v, "prefill_chunk", sc.prefill_chunk, w, err) &&
         (helper_bool || take(v, "step_helper", sc.step_helper, w, err));
  }
  if (section("instance", {"id", "heartbeat_ms", "takeover_after_ms"})) {
    const auto& i = j["instance"];
    auto& ic = cfg.instance;
    ok = take(i, "id", ic.id, "instance.", err) &&
         take(i, "heartbeat_ms", ic.heartbeat_ms, "instance.", err) &&
         take(i, "takeover_after_ms", ic.takeover_after_ms, "instance.", err);
  }
  if (section("admin", {"host", "port", "max_user_series", "token_file"})) {
    const auto& a = j["admin"];
    ok = take(a, "host", cfg.admin_host, "admin.", err) &&
         take(a, "port", cfg.admin_port, "admin.", err) &&
         take(a, "max_user_series", cfg.admin_max_user_series, "admin.", err) &&
         take(a, "token_file", cfg.admin_token_file, "admin.", err);
  }
  if (section("compute", {"intra_op_threads", "blas_threads", "actor_threads", "scheduling"})) {
    const auto& c = j["compute"];
    ok = take(c, "intra_op_threads", cfg.compute.intra_op_threads, "compute.", err) &&
         take(c, "blas_threads", cfg.compute.blas_threads, "compute.", err) &&
         take(c, "actor_threads", cfg.compute.actor_threads, "compute.", err) &&
         take(c, "scheduling", cfg.compute.scheduling, "compute.", err);
  }
  if (section("models", {"dir", "pretrain_minutes", "pretrain_steps"})) {
    const auto& m = j["models"];
    ok = take(m, "dir", cfg.models.dir, "models.", err) &&
         take(m, "pretrain_minutes", cfg.models.pretrain_minutes, "models.", err) &&
         take(m, "pretrain_steps", cfg.models.pretrain_steps, "models.", err);
  }
  if (ok) err = validate(cfg);
  if (!err.empty()) return path + ": " + err;
  return {};
}

}  // namespace tailor::actors
