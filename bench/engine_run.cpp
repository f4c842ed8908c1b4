#include "engine_run.hpp"

#include <httplib.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafkacpp.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "interrupt.hpp"

namespace tailor::bench {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

double proc_status_mb(pid_t pid, const char* field) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(field, 0) == 0) return std::stod(line.substr(std::strlen(field))) / 1024.0;
  return -1;
}

// Remembers the first failed delivery, so that flush() can report it.
class delivery_check : public RdKafka::DeliveryReportCb {
 public:
  void dr_cb(RdKafka::Message& m) override {
    if (m.err() == RdKafka::ERR_NO_ERROR) return;
    std::lock_guard<std::mutex> g(mtx_);
    if (first_error_.empty()) first_error_ = m.errstr();
  }
  std::string first_error() {
    std::lock_guard<std::mutex> g(mtx_);
    return first_error_;
  }

 private:
  std::mutex mtx_;
  std::string first_error_;
};

}  // namespace

std::string read_tailord_config(const std::string& path, json& out) {
  std::ifstream in(path);
  if (!in) return "--tailord-config " + path + ": cannot read it";
  std::stringstream ss;
  ss << in.rdbuf();
  auto j = json::parse(ss.str(), nullptr, false, true);
  if (j.is_discarded() || !j.is_object())
    return "--tailord-config " + path + ": is not a JSON object";
  for (const char* key : {"data_dir", "admin", "ready_file"})
    if (j.contains(key))
      return "--tailord-config " + path + ": " + key + " is the run's own; leave it out";
  if (j.contains("kafka") && j["kafka"].is_object())
    for (const char* key : {"bootstrap_servers", "group_id", "topics"})
      if (j["kafka"].contains(key))
        return "--tailord-config " + path + ": kafka." + key +
               " is the run's own (--bootstrap for the servers); leave it out";
  out = std::move(j);
  return {};
}

engine_run::engine_run(const engine_run_options& o) {
  auto tag = std::to_string(::getpid()) + "-" +
             std::to_string(std::chrono::steady_clock::now().time_since_epoch().count() % 100000);
  dir_ = (fs::temp_directory_path() / ("tailor-bench-" + tag)).string();
  fs::create_directories(dir_);
  bootstrap_ = o.bootstrap;
  prefix_ = "bench" + tag + ".";
  group_ = "bench-" + tag;
  keep_topics_ = o.keep_topics;
  // A failed start leaves nothing either: no tailord, topics or directory.
  try {
    start(o);
  } catch (...) {
    release();
    throw;
  }
}

void engine_run::start(const engine_run_options& o) {
  if (bootstrap_.empty()) bootstrap_ = broker_.emplace(dir_ + "/kafka").bootstrap();
  json cfg = {{"data_dir", dir_ + "/data"},
              {"admin", {{"host", "127.0.0.1"}, {"port", 0}}},
              {"kafka",
               {{"bootstrap_servers", bootstrap_},
                {"group_id", group_},
                {"topics",
                 {{"onboarding", topic("onboarding")},
                  {"inference", topic("inference")},
                  {"control", topic("control")},
                  {"results", topic("results")},
                  {"events", topic("events")},
                  {"dlq", topic("dlq")},
                  {"state", topic("state")}}}}}};
  cfg.merge_patch(o.config);
  if (o.prepare) o.prepare(dir_ + "/data");
  auto cfg_path = dir_ + "/tailord.json";
  std::ofstream(cfg_path) << cfg.dump(2);
  auto ready = dir_ + "/ready.json";
  auto log = dir_ + "/tailord.log";
  const pid_t bench = ::getpid();
  pid_ = ::fork();
  if (pid_ == 0) {
    // A process group of its own: a Ctrl-C at the terminal reaches only the
    // bench, which stops tailord itself (to tailord, a second signal would
    // end its stop at once). And tailord stops if the bench dies, even by
    // SIGKILL (the signal is sent when the forking thread, the bench's
    // main one, ends).
    ::setpgid(0, 0);
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != bench) ::_exit(127);  // it died before prctl
    FILE* f = std::freopen(log.c_str(), "a", stdout);
    (void)f;
    ::dup2(::fileno(stdout), 2);
    ::execl(o.tailord.c_str(), o.tailord.c_str(), "--config", cfg_path.c_str(), "--ready-file",
            ready.c_str(), nullptr);
    ::_exit(127);
  }
  if (pid_ < 0) throw std::runtime_error("cannot fork tailord");
  auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(15);
  while (!fs::exists(ready)) {
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      throw std::runtime_error("tailord exited during start-up:\n" + slurp(log));
    }
    if (std::chrono::steady_clock::now() > deadline)
      throw std::runtime_error("tailord was not ready within 15 min:\n" + slurp(log));
    throw_if_interrupted();
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  admin_port_ = json::parse(slurp(ready)).at("admin_port").get<int>();
}

engine_run::~engine_run() {
  release();
}

void engine_run::release() {
  stop();
  // A broker we did not start may be shared: leave nothing on it.
  if (!broker_ && !keep_topics_ && !bootstrap_.empty()) {
    std::vector<std::string> topics, groups = {group_};
    for (const auto* role : {"onboarding", "inference", "control", "results", "events", "dlq"}) {
      topics.push_back(topic(role));
      groups.push_back(watch_group(topic(role)));
    }
    topics.push_back(topic("state"));
    if (auto err = delete_topics_and_groups(bootstrap_, topics, groups); !err.empty())
      std::fprintf(stderr, "tailor-bench: the run's topics (%s*) and groups are left on %s: %s\n",
                   prefix_.c_str(), bootstrap_.c_str(), err.c_str());
  }
  broker_.reset();
  std::error_code ec;
  fs::remove_all(dir_, ec);
}

std::string watch_group(const std::string& topic) {
  return "bench-watch-" + topic;
}

namespace {

// Waits for an admin call's result on `q`: the event, or null with `err` set.
rd_kafka_event_t* admin_result(rd_kafka_queue_t* q, int timeout_ms, const char* what,
                               std::string& err) {
  rd_kafka_event_t* ev = rd_kafka_queue_poll(q, timeout_ms + 5000);
  if (!ev) {
    err = std::string(what) + ": no answer within " + std::to_string(timeout_ms) + " ms";
  } else if (rd_kafka_event_error(ev)) {
    err = std::string(what) + ": " + rd_kafka_event_error_string(ev);
    rd_kafka_event_destroy(ev);
    ev = nullptr;
  }
  return ev;
}

}  // namespace

std::string delete_topics_and_groups(const std::string& bootstrap,
                                     const std::vector<std::string>& topics,
                                     const std::vector<std::string>& groups, int timeout_ms) {
  char errstr[512];
  rd_kafka_conf_t* conf = rd_kafka_conf_new();
  if (rd_kafka_conf_set(conf, "bootstrap.servers", bootstrap.c_str(), errstr, sizeof(errstr)) !=
      RD_KAFKA_CONF_OK) {
    rd_kafka_conf_destroy(conf);
    return std::string("admin client: ") + errstr;
  }
  rd_kafka_t* rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
  if (!rk) return std::string("admin client: ") + errstr;
  rd_kafka_queue_t* q = rd_kafka_queue_new(rk);
  std::string err;
  auto options = [&](rd_kafka_admin_op_t op) {
    rd_kafka_AdminOptions_t* opts = rd_kafka_AdminOptions_new(rk, op);
    if (rd_kafka_AdminOptions_set_request_timeout(opts, timeout_ms, errstr, sizeof(errstr)))
      err = std::string("admin options: ") + errstr;
    return opts;
  };
  if (!topics.empty()) {
    std::vector<rd_kafka_DeleteTopic_t*> del;
    for (const auto& t : topics) del.push_back(rd_kafka_DeleteTopic_new(t.c_str()));
    rd_kafka_AdminOptions_t* opts = options(RD_KAFKA_ADMIN_OP_DELETETOPICS);
    if (err.empty() &&
        rd_kafka_AdminOptions_set_operation_timeout(opts, timeout_ms, errstr, sizeof(errstr)))
      err = std::string("admin options: ") + errstr;
    if (err.empty()) {
      rd_kafka_DeleteTopics(rk, del.data(), del.size(), opts, q);
      if (auto* ev = admin_result(q, timeout_ms, "delete topics", err)) {
        std::size_t n = 0;
        const auto** res =
            rd_kafka_DeleteTopics_result_topics(rd_kafka_event_DeleteTopics_result(ev), &n);
        for (std::size_t i = 0; i < n && err.empty(); ++i) {
          const auto e = rd_kafka_topic_result_error(res[i]);
          if (e != RD_KAFKA_RESP_ERR_NO_ERROR && e != RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART)
            err = std::string("topic ") + rd_kafka_topic_result_name(res[i]) + ": " +
                  rd_kafka_err2str(e);
        }
        rd_kafka_event_destroy(ev);
      }
    }
    rd_kafka_AdminOptions_destroy(opts);
    for (auto* d : del) rd_kafka_DeleteTopic_destroy(d);
  }
  if (err.empty() && !groups.empty()) {
    std::vector<rd_kafka_DeleteGroup_t*> del;
    for (const auto& g : groups) del.push_back(rd_kafka_DeleteGroup_new(g.c_str()));
    rd_kafka_AdminOptions_t* opts = options(RD_KAFKA_ADMIN_OP_DELETEGROUPS);
    if (err.empty()) {
      rd_kafka_DeleteGroups(rk, del.data(), del.size(), opts, q);
      if (auto* ev = admin_result(q, timeout_ms, "delete groups", err)) {
        std::size_t n = 0;
        const auto** res =
            rd_kafka_DeleteGroups_result_groups(rd_kafka_event_DeleteGroups_result(ev), &n);
        for (std::size_t i = 0; i < n && err.empty(); ++i) {
          const rd_kafka_error_t* e = rd_kafka_group_result_error(res[i]);
          if (e && rd_kafka_error_code(e) != RD_KAFKA_RESP_ERR_GROUP_ID_NOT_FOUND)
            err = std::string("group ") + rd_kafka_group_result_name(res[i]) + ": " +
                  rd_kafka_error_string(e);
        }
        rd_kafka_event_destroy(ev);
      }
    }
    rd_kafka_AdminOptions_destroy(opts);
    for (auto* d : del) rd_kafka_DeleteGroup_destroy(d);
  }
  rd_kafka_queue_destroy(q);
  rd_kafka_destroy(rk);
  return err;
}

namespace {

// scripts/kafka-broker stop for the broker in `dir`; whether it stopped.
bool stop_broker(const std::string& dir) {
  auto cmd = std::string(TAILOR_SOURCE_DIR) + "/scripts/kafka-broker stop --dir " + dir +
             " >/dev/null 2>&1";
  return std::system(cmd.c_str()) == 0;
}

}  // namespace

kafka_broker::kafka_broker(const std::string& dir) : dir_(dir) {
  fs::create_directories(dir_);
  std::fprintf(stderr, "starting a Kafka broker (scripts/kafka-broker)...\n");
  // A broker's JVM as Kafka's own scripts run it, not the tests' quick-start one.
  const auto out = dir_ + "/broker.out";
  auto cmd = std::string(TAILOR_SOURCE_DIR) + "/scripts/kafka-broker start --jvm server --dir " +
             dir_ + " >" + out + " 2>&1";
  if (std::system(cmd.c_str()) != 0) {
    auto why = slurp(out);
    stop_broker(dir_);  // whatever part of it did start
    throw std::runtime_error("the Kafka broker did not start:\n" + why);
  }
  std::ifstream(dir_ + "/bootstrap") >> bootstrap_;
}

kafka_broker::~kafka_broker() {
  if (!stop_broker(dir_))
    std::fprintf(stderr, "tailor-bench: the broker in %s did not stop cleanly\n", dir_.c_str());
  std::error_code ec;
  fs::remove_all(dir_, ec);
}

int engine_run::stop() {
  if (pid_ <= 0) return -1;
  ::kill(pid_, SIGTERM);
  int status = 0;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(90);
  while (::waitpid(pid_, &status, WNOHANG) != pid_) {
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  pid_ = -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

double engine_run::rss_mb() const {
  return proc_status_mb(pid_, "VmRSS:");
}

double engine_run::peak_rss_mb() const {
  return proc_status_mb(pid_, "VmHWM:");
}

std::string engine_run::get(const std::string& path) const {
  httplib::Client cli("127.0.0.1", admin_port_);
  cli.set_connection_timeout(5);
  cli.set_read_timeout(30);
  auto res = cli.Get(path.c_str());
  if (!res) throw std::runtime_error("admin API " + path + ": " + httplib::to_string(res.error()));
  return res->body;
}

double engine_run::metric(const std::string& name, const std::string& label,
                          const std::string& value) const {
  auto text = get("/metrics");
  auto key = "\n" + name + (label.empty() ? "" : "{" + label + "=\"" + value + "\"}") + " ";
  auto pos = text.find(key);
  if (pos == std::string::npos) return -1;
  return std::stod(text.substr(pos + key.size()));
}

double engine_run::metric_sum(const std::string& name, const std::string& labels) const {
  std::istringstream text(get("/metrics"));
  double sum = 0;
  for (std::string line; std::getline(text, line);) {
    if (line.rfind(name + "{", 0) != 0) continue;
    auto close = line.find('}');
    if (close == std::string::npos || line.substr(0, close).find(labels) == std::string::npos)
      continue;
    sum += std::stod(line.substr(close + 1));
  }
  return sum;
}

topic_watch::topic_watch(const std::string& bootstrap, const std::string& topic,
                         std::function<void(const json&)> on_record)
    : on_record_(std::move(on_record)) {
  std::string err;
  std::unique_ptr<RdKafka::Conf> conf(RdKafka::Conf::create(RdKafka::Conf::CONF_GLOBAL));
  if (conf->set("bootstrap.servers", bootstrap, err) != RdKafka::Conf::CONF_OK ||
      conf->set("group.id", watch_group(topic), err) != RdKafka::Conf::CONF_OK ||
      conf->set("auto.offset.reset", "earliest", err) != RdKafka::Conf::CONF_OK ||
      conf->set("enable.auto.commit", "false", err) != RdKafka::Conf::CONF_OK ||
      conf->set("topic.metadata.refresh.interval.ms", "500", err) != RdKafka::Conf::CONF_OK)
    throw std::runtime_error("consumer of " + topic + ": " + err);
  consumer_.reset(RdKafka::KafkaConsumer::create(conf.get(), err));
  if (!consumer_) throw std::runtime_error("consumer of " + topic + ": " + err);
  if (auto rc = consumer_->subscribe({topic}); rc != RdKafka::ERR_NO_ERROR)
    throw std::runtime_error("consumer of " + topic + ": " + RdKafka::err2str(rc));
  thread_ = std::thread([this] {
    while (!stop_) {
      std::unique_ptr<RdKafka::Message> m(consumer_->consume(100));
      if (m->err() != RdKafka::ERR_NO_ERROR) continue;
      auto j = json::parse(static_cast<const char*>(m->payload()),
                           static_cast<const char*>(m->payload()) + m->len(), nullptr, false);
      if (j.is_object()) on_record_(j);
    }
  });
}

topic_watch::~topic_watch() {
  stop_ = true;
  thread_.join();
  consumer_->close();
}

bench_producer::bench_producer(const std::string& bootstrap, int linger_ms)
    : reports_(std::make_unique<delivery_check>()) {
  std::string err;
  std::unique_ptr<RdKafka::Conf> conf(RdKafka::Conf::create(RdKafka::Conf::CONF_GLOBAL));
  if (conf->set("bootstrap.servers", bootstrap, err) != RdKafka::Conf::CONF_OK ||
      conf->set("linger.ms", std::to_string(linger_ms), err) != RdKafka::Conf::CONF_OK ||
      conf->set("enable.idempotence", "true", err) != RdKafka::Conf::CONF_OK ||
      conf->set("dr_cb", reports_.get(), err) != RdKafka::Conf::CONF_OK)
    throw std::runtime_error("producer: " + err);
  p_.reset(RdKafka::Producer::create(conf.get(), err));
  if (!p_) throw std::runtime_error("producer: " + err);
}

bench_producer::~bench_producer() {
  p_->flush(10000);
}

void bench_producer::send(const std::string& topic, const std::string& key,
                          const std::string& payload, int64_t timestamp_ms) {
  for (;;) {
    auto rc = p_->produce(topic, RdKafka::Topic::PARTITION_UA, RdKafka::Producer::RK_MSG_COPY,
                          const_cast<char*>(payload.data()), payload.size(), key.data(), key.size(),
                          timestamp_ms, nullptr);
    if (rc == RdKafka::ERR_NO_ERROR) return;
    if (rc != RdKafka::ERR__QUEUE_FULL)
      throw std::runtime_error("produce: " + RdKafka::err2str(rc));
    p_->poll(50);
  }
}

void bench_producer::poll() {
  p_->poll(0);
}

void bench_producer::flush() {
  auto rc = p_->flush(60000);
  if (rc != RdKafka::ERR_NO_ERROR) throw std::runtime_error("flush: " + RdKafka::err2str(rc));
  auto err = static_cast<delivery_check*>(reports_.get())->first_error();
  if (!err.empty()) throw std::runtime_error("a request was not delivered: " + err);
}

}  // namespace tailor::bench
