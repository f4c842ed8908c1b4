#include "actors/kafka.hpp"

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
#include <librdkafka/rdkafkacpp.h>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <set>
#include <string_view>

#include "actors/metrics.hpp"

namespace tailor::actors {

namespace {

std::atomic<bool> kafka_logs_to_spdlog{false};

// librdkafka's levels are syslog's: 0-3 errors, 4 warnings, 5-6 notices
// and information, 7 debugging.
void log_line(std::string_view client, int level, std::string_view facility,
              std::string_view line) {
  const auto to = level <= 3   ? spdlog::level::err
                  : level == 4 ? spdlog::level::warn
                  : level <= 6 ? spdlog::level::info
                               : spdlog::level::debug;
  spdlog::log(to, "kafka: {} {}: {}", client, facility, line);
}

// Called on librdkafka's threads. The client's id without librdkafka's
// "#consumer-1": the name a watched client's lines carry too.
void kafka_log(const rd_kafka_t* rk, int level, const char* facility, const char* line) {
  std::string_view name = rk ? rd_kafka_name(rk) : "-";
  log_line(name.substr(0, name.find('#')), level, facility, line);
}

class broker_watch : public RdKafka::EventCb {
 public:
  broker_watch(std::string client, std::shared_ptr<metrics> stats,
               std::vector<std::string> lag_topics)
      : client_(std::move(client)), stats_(std::move(stats)), lag_topics_(std::move(lag_topics)) {}

  // Called where the client is polled (its owner's thread).
  void event_cb(RdKafka::Event& e) override {
    switch (e.type()) {
      case RdKafka::Event::EVENT_STATS: {
        const auto j = nlohmann::json::parse(e.str(), nullptr, false);
        if (!j.is_object()) break;
        if (auto up = brokers_up(j)) stats_->set_kafka_brokers_up(client_, *up);
        for (const auto& topic : lag_topics_) stats_->set_lag(topic, consumer_lag(j, topic));
        break;
      }
      case RdKafka::Event::EVENT_LOG:
        // An event callback takes over librdkafka's log callback too. Only
        // the engine's consumers are watched, and tailord logs through spdlog.
        log_line(client_, e.severity(), e.fac(), e.str());
        break;
      case RdKafka::Event::EVENT_ERROR:
        // And its errors, which would otherwise be logged by librdkafka.
        spdlog::log(e.fatal() ? spdlog::level::err : spdlog::level::warn, "kafka: {} {}: {}",
                    client_, RdKafka::err2str(e.err()), e.str());
        break;
      default:
        break;
    }
  }

 private:
  // The brokers of the cluster (node id known) with a connection up, each
  // once: a bootstrap entry and the logical GroupCoordinator are the same
  // brokers by other names.
  static std::optional<int64_t> brokers_up(const nlohmann::json& j) {
    const auto brokers = j.find("brokers");
    if (brokers == j.end() || !brokers->is_object()) return std::nullopt;
    std::set<int> up;
    for (const auto& [name, b] : brokers->items())
      if (b.is_object() && b.value("nodeid", -1) >= 0 && b.value("state", "") == "UP")
        up.insert(b.value("nodeid", -1));
    return static_cast<int64_t>(up.size());
  }

  std::string client_;
  std::shared_ptr<metrics> stats_;
  std::vector<std::string> lag_topics_;
};

void route_logs(rd_kafka_conf_t* conf) {
  if (kafka_logs_to_spdlog.load()) rd_kafka_conf_set_log_cb(conf, kafka_log);
}

}  // namespace

int64_t consumer_lag(const nlohmann::json& statistics, const std::string& topic) {
  const auto t = statistics.find("topics");
  if (t == statistics.end() || !t->is_object() || !t->contains(topic)) return 0;
  const auto& parts = (*t)[topic].value("partitions", nlohmann::json::object());
  int64_t sum = 0;
  for (const auto& [id, p] : parts.items()) {
    if (id == "-1" || !p.is_object() || !p.value("desired", false)) continue;
    const int64_t end = p.value("hi_offset", int64_t{-1});
    int64_t from = p.value("app_offset", int64_t{-1});
    if (from < 0) from = p.value("committed_offset", int64_t{-1});
    if (from < 0) from = p.value("lo_offset", int64_t{-1});
    if (end >= 0 && from >= 0 && end > from) sum += end - from;
  }
  return sum;
}

void log_kafka_through_spdlog() { kafka_logs_to_spdlog.store(true); }

std::unique_ptr<RdKafka::EventCb> watch_brokers(const std::string& client,
                                                std::shared_ptr<metrics> stats,
                                                std::vector<std::string> lag_topics) {
  return std::make_unique<broker_watch>(client, std::move(stats), std::move(lag_topics));
}

std::unique_ptr<RdKafka::Topic> look_up_topic(RdKafka::Handle& client, const std::string& topic,
                                              int timeout_ms, std::string& err,
                                              std::vector<int32_t>* partitions) {
  std::unique_ptr<RdKafka::Topic> handle(RdKafka::Topic::create(&client, topic, nullptr, err));
  if (!handle) return nullptr;
  RdKafka::Metadata* md = nullptr;
  auto rc = client.metadata(false, handle.get(), &md, timeout_ms);
  std::unique_ptr<RdKafka::Metadata> owned(md);
  // The request can succeed and the topic still be unknown to the cluster.
  if (rc == RdKafka::ERR_NO_ERROR && md && !md->topics()->empty())
    rc = md->topics()->front()->err();
  if (rc != RdKafka::ERR_NO_ERROR) {
    err = "lookup of " + topic + ": " + RdKafka::err2str(rc);
    return nullptr;
  }
  if (partitions && !md->topics()->empty())
    for (const auto* p : *md->topics()->front()->partitions()) partitions->push_back(p->id());
  return handle;
}

std::unique_ptr<mock_cluster> mock_cluster::start(int brokers, std::string& err) {
  std::unique_ptr<mock_cluster> mc(new mock_cluster);
  char errstr[512];
  rd_kafka_conf_t* conf = rd_kafka_conf_new();
  if (rd_kafka_conf_set(conf, "log_level", "3", errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK) {
    rd_kafka_conf_destroy(conf);
    err = errstr;
    return nullptr;
  }
  route_logs(conf);
  mc->rk_ = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
  if (!mc->rk_) {
    err = std::string("mock cluster host: ") + errstr;
    return nullptr;
  }
  mc->cluster_ = rd_kafka_mock_cluster_new(mc->rk_, brokers);
  if (!mc->cluster_) {
    err = "could not create the mock cluster";
    return nullptr;
  }
  mc->bootstrap_ = rd_kafka_mock_cluster_bootstraps(mc->cluster_);
  return mc;
}

mock_cluster::~mock_cluster() {
  if (cluster_) rd_kafka_mock_cluster_destroy(cluster_);
  if (rk_) rd_kafka_destroy(rk_);
}

void mock_cluster::fail_requests(int16_t api_key, const std::vector<int>& errors) {
  std::vector<rd_kafka_resp_err_t> codes;
  for (int e : errors) codes.push_back(static_cast<rd_kafka_resp_err_t>(e));
  rd_kafka_mock_push_request_errors_array(cluster_, api_key, codes.size(), codes.data());
}

void mock_cluster::clear_failures(int16_t api_key) {
  rd_kafka_mock_clear_request_errors(cluster_, api_key);
}

void mock_cluster::fail_lookups(const std::string& topic, int error) {
  rd_kafka_mock_topic_set_error(cluster_, topic.c_str(), static_cast<rd_kafka_resp_err_t>(error));
}

std::vector<std::pair<std::string, std::string>> consumer_settings(const kafka_config& cfg) {
  if (cfg.fetch_wait_ms <= 0) return {};
  return {{"fetch.wait.max.ms", std::to_string(cfg.fetch_wait_ms)}};
}

void mock_cluster::set_down(bool down) {
  if (down)
    rd_kafka_mock_broker_set_down(cluster_, -1);
  else
    rd_kafka_mock_broker_set_up(cluster_, -1);
}

std::string mock_cluster::create_topic(const std::string& name, int partitions) {
  auto e = rd_kafka_mock_topic_create(cluster_, name.c_str(), partitions, 1);
  if (e != RD_KAFKA_RESP_ERR_NO_ERROR) return "mock topic " + name + ": " + rd_kafka_err2str(e);
  return {};
}

void group_membership::update(RdKafka::KafkaConsumer& consumer) {
  std::shared_ptr<RdKafka::ConsumerGroupMetadata> meta(consumer.groupMetadata());
  std::lock_guard<std::mutex> lock(mtx_);
  meta_ = std::move(meta);
}

std::shared_ptr<RdKafka::ConsumerGroupMetadata> group_membership::current() const {
  std::lock_guard<std::mutex> lock(mtx_);
  return meta_;
}

std::unique_ptr<RdKafka::Conf> make_conf(
    const kafka_config& cfg, const std::vector<std::pair<std::string, std::string>>& extra,
    std::string& err, RdKafka::EventCb* events) {
  std::unique_ptr<RdKafka::Conf> conf(RdKafka::Conf::create(RdKafka::Conf::CONF_GLOBAL));
  auto set = [&](const std::string& k, const std::string& v) {
    if (conf->set(k, v, err) != RdKafka::Conf::CONF_OK) {
      err = "kafka property " + k + ": " + err;
      return false;
    }
    return true;
  };
  if (!set("bootstrap.servers", cfg.bootstrap_servers)) return nullptr;
  // Each second: a broker lost shows on /metrics and /readyz within about
  // that. Measured: a consumer of three topics sends ~15 KB, parsed in
  // ~0.2 ms, so ~0.02 % of a core each.
  if (events && !set("statistics.interval.ms", "1000")) return nullptr;
  for (const auto& [k, v] : extra)
    if (!set(k, v)) return nullptr;
  for (const auto& [k, v] : cfg.properties)
    if (!set(k, v)) return nullptr;
  route_logs(conf->c_ptr_global());
  if (events && conf->set("event_cb", events, err) != RdKafka::Conf::CONF_OK) return nullptr;
  return conf;
}

std::string create_topics(const kafka_config& cfg, const std::vector<std::string>& topics,
                          const std::vector<std::string>& compacted, int timeout_ms) {
  char errstr[512];
  rd_kafka_conf_t* conf = rd_kafka_conf_new();
  auto set = [&](const std::string& k, const std::string& v) {
    return rd_kafka_conf_set(conf, k.c_str(), v.c_str(), errstr, sizeof(errstr)) ==
           RD_KAFKA_CONF_OK;
  };
  bool ok = set("bootstrap.servers", cfg.bootstrap_servers) && set("client.id", "tailord-admin");
  for (const auto& [k, v] : cfg.properties) ok = ok && set(k, v);
  if (!ok) {
    rd_kafka_conf_destroy(conf);
    return std::string("admin client: ") + errstr;
  }
  route_logs(conf);
  rd_kafka_t* rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
  if (!rk) return std::string("admin client: ") + errstr;
  std::vector<rd_kafka_NewTopic_t*> specs;
  std::string result;
  for (const auto& t : topics) {
    auto* nt = rd_kafka_NewTopic_new(t.c_str(), cfg.topic_partitions, cfg.replication_factor,
                                     errstr, sizeof(errstr));
    if (!nt) {
      result = "topic " + t + ": " + errstr;
      break;
    }
    specs.push_back(nt);
    if (std::find(compacted.begin(), compacted.end(), t) != compacted.end()) {
      if (auto e = rd_kafka_NewTopic_set_config(nt, "cleanup.policy", "compact")) {
        result = "topic " + t + ": " + rd_kafka_err2str(e);
        break;
      }
    }
  }
  rd_kafka_queue_t* q = rd_kafka_queue_new(rk);
  if (result.empty()) {
    rd_kafka_AdminOptions_t* opts = rd_kafka_AdminOptions_new(rk, RD_KAFKA_ADMIN_OP_CREATETOPICS);
    if (rd_kafka_AdminOptions_set_operation_timeout(opts, timeout_ms, errstr, sizeof(errstr)) ||
        rd_kafka_AdminOptions_set_request_timeout(opts, timeout_ms, errstr, sizeof(errstr))) {
      result = std::string("admin options: ") + errstr;
    } else {
      rd_kafka_CreateTopics(rk, specs.data(), specs.size(), opts, q);
      rd_kafka_event_t* ev = rd_kafka_queue_poll(q, timeout_ms + 5000);
      if (!ev) {
        result = "create topics: no answer from the cluster within " + std::to_string(timeout_ms) +
                 " ms";
      } else if (rd_kafka_event_error(ev)) {
        result = std::string("create topics: ") + rd_kafka_event_error_string(ev);
      } else {
        const rd_kafka_CreateTopics_result_t* res = rd_kafka_event_CreateTopics_result(ev);
        size_t n = 0;
        const rd_kafka_topic_result_t** tr = rd_kafka_CreateTopics_result_topics(res, &n);
        for (size_t i = 0; i < n; ++i) {
          auto e = rd_kafka_topic_result_error(tr[i]);
          if (e != RD_KAFKA_RESP_ERR_NO_ERROR && e != RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS) {
            result = std::string("topic ") + rd_kafka_topic_result_name(tr[i]) + ": " +
                     rd_kafka_err2str(e);
            break;
          }
        }
      }
      if (ev) rd_kafka_event_destroy(ev);
    }
    rd_kafka_AdminOptions_destroy(opts);
  }
  for (auto* s : specs) rd_kafka_NewTopic_destroy(s);
  rd_kafka_queue_destroy(q);
  rd_kafka_destroy(rk);
  return result;
}

queue_wakeup::queue_wakeup(rd_kafka_s* client, queue which, std::function<void()> wake)
    : queue_(which == queue::consumer ? rd_kafka_queue_get_consumer(client)
                                      : rd_kafka_queue_get_main(client)),
      wake_(std::move(wake)) {
  if (queue_) rd_kafka_queue_cb_event_enable(queue_, &queue_wakeup::on_event, this);
}

queue_wakeup::queue_wakeup(rd_kafka_queue_s* borrowed, std::function<void()> wake)
    : queue_(borrowed), owned_(false), wake_(std::move(wake)) {
  if (queue_) rd_kafka_queue_cb_event_enable(queue_, &queue_wakeup::on_event, this);
}

queue_wakeup::~queue_wakeup() {
  if (!queue_) return;
  rd_kafka_queue_cb_event_enable(queue_, nullptr, nullptr);
  if (owned_) rd_kafka_queue_destroy(queue_);
}

void queue_wakeup::on_event(rd_kafka_s*, void* opaque) {
  auto* self = static_cast<queue_wakeup*>(opaque);
  if (!self->pending_.exchange(true)) self->wake_();
}

}  // namespace tailor::actors
