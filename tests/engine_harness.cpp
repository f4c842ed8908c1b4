#include "engine_harness.hpp"

#include <gtest/gtest.h>
#include <httplib.h>
#include <librdkafka/rdkafkacpp.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>

namespace tailor::test {

namespace fs = std::filesystem;

namespace {

std::string unique_suffix() {
  static std::atomic<int> n{0};
  std::random_device rd;
  return std::to_string(::getpid()) + "-" + std::to_string(rd() % 100000) + "-" +
         std::to_string(n++);
}

// The environment may override what the build configured.
std::string setting(const char* env, const char* built_in) {
  const char* v = std::getenv(env);
  return v && *v ? v : built_in;
}

std::unique_ptr<RdKafka::Conf> conf_for(const std::string& bootstrap) {
  std::string err;
  std::unique_ptr<RdKafka::Conf> conf(RdKafka::Conf::create(RdKafka::Conf::CONF_GLOBAL));
  if (conf->set("bootstrap.servers", bootstrap, err) != RdKafka::Conf::CONF_OK)
    throw std::runtime_error(err);
  return conf;
}

}  // namespace

std::string broker_bootstrap() {
  auto dir = setting("TAILOR_TEST_KAFKA_DIR", TAILOR_TEST_KAFKA_DIR);
  std::ifstream in(dir + "/bootstrap");
  std::string b;
  if (!(in >> b) || b.empty())
    throw std::runtime_error("no Kafka broker: " + dir +
                             "/bootstrap is missing (the kafka fixture failed to start)");
  return b;
}

namespace {

// Every record a collector receives bumps `count` and wakes the waiters, so
// a condition on Kafka output is re-checked the moment something arrives.
struct progress_signal {
  std::mutex mtx;
  std::condition_variable cv;
  uint64_t count = 0;
};

progress_signal& progress() {
  static progress_signal p;
  return p;
}

void signal_progress() {
  auto& p = progress();
  {
    std::lock_guard<std::mutex> g(p.mtx);
    ++p.count;
  }
  p.cv.notify_all();
}

}  // namespace

std::size_t occurrences(const std::string& text, const std::string& what) {
  std::size_t n = 0;
  for (auto at = text.find(what); at != std::string::npos; at = text.find(what, at + what.size()))
    ++n;
  return n;
}

bool wait_until(const std::function<bool()>& pred, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  auto& p = progress();
  for (;;) {
    uint64_t seen;
    {
      std::lock_guard<std::mutex> g(p.mtx);
      seen = p.count;
    }
    if (pred()) return true;
    auto now = std::chrono::steady_clock::now();
    if (now >= deadline) return false;
    // Conditions on other sources (the admin API, a child process) have no
    // signal: they are re-checked at least every 20 ms until the deadline.
    std::unique_lock<std::mutex> lock(p.mtx);
    p.cv.wait_until(lock, std::min(deadline, now + 20ms), [&] { return p.count != seen; });
  }
}

json test_base_config() {
  return {{"base_models", {"tailor-test"}},
          {"default_base_model", "tailor-test"},
          {"models",
           {{"dir", setting("TAILOR_TEST_MODELS_DIR", TAILOR_TEST_MODELS_DIR)},
            {"pretrain_steps", 300}}}};
}

engine_process::engine_process(const std::string& name, json extra_config,
                               const std::string& bootstrap)
    : extra_(std::move(extra_config)) {
  auto suffix = unique_suffix();
  dir_ = (fs::temp_directory_path() / ("tailor-engine-" + name + "-" + suffix)).string();
  fs::create_directories(dir_);
  bootstrap_ = bootstrap.empty() ? broker_bootstrap() : bootstrap;
  group_ = "tailor-test-" + suffix;
  auto p = "t" + suffix + ".";
  topics_ = {p + "onboarding", p + "inference", p + "control", p + "results",
             p + "events",     p + "dlq",       p + "state"};
}

engine_process::~engine_process() {
  if (pid_ > 0) kill();
  std::error_code ec;
  fs::remove_all(dir_, ec);
}

void engine_process::join_group_of(const engine_process& other) {
  bootstrap_ = other.bootstrap_;
  group_ = other.group_;
  topics_ = other.topics_;
}

void engine_process::start() {
  json cfg = {{"data_dir", dir_ + "/data"},
              {"admin", {{"host", "127.0.0.1"}, {"port", 0}}},
              {"kafka",
               {{"bootstrap_servers", bootstrap_},
                {"group_id", group_},
                {"topics",
                 {{"onboarding", topics_.onboarding},
                  {"inference", topics_.inference},
                  {"control", topics_.control},
                  {"results", topics_.results},
                  {"events", topics_.events},
                  {"dlq", topics_.dlq},
                  {"state", topics_.state}}}}}};
  // Short jobs; a test that needs other settings patches them.
  json defaults = {{"training",
                    {{"steps", 3},
                     {"max_jobs_per_user", 1000},
                     {"progress_interval_ms", 100},
                     {"retry_backoff_ms", 200}}}};
  cfg.merge_patch(test_base_config());
  cfg.merge_patch(defaults);
  cfg.merge_patch(extra_);
  // In the file, not a flag: tailorctl --config finds the admin port there.
  auto ready = dir_ + "/ready.json";
  cfg["ready_file"] = ready;
  auto cfg_path = dir_ + "/tailord.json";
  std::ofstream(cfg_path) << cfg.dump(2);
  fs::remove(ready);
  auto bin = setting("TAILORD", TAILORD_PATH);
  auto log = dir_ + "/tailord.log";
  pid_ = ::fork();
  if (pid_ == 0) {
    FILE* f = std::freopen(log.c_str(), "a", stdout);
    (void)f;
    ::dup2(::fileno(stdout), 2);
    ::execl(bin.c_str(), bin.c_str(), "--config", cfg_path.c_str(), nullptr);
    ::_exit(127);
  }
  ASSERT_GT(pid_, 0);
  bool ok = wait_until(
      [&] {
        int status = 0;
        if (::waitpid(pid_, &status, WNOHANG) == pid_) {
          pid_ = -1;
          return true;
        }
        return fs::exists(ready);
      },
      90s);
  std::ifstream logf(log);
  std::stringstream logs;
  logs << logf.rdbuf();
  ASSERT_TRUE(ok && pid_ > 0) << "tailord did not become ready; its log:\n" << logs.str();
  std::ifstream in(ready);
  json r = json::parse(in);
  admin_port_ = r.at("admin_port").get<int>();
}

int engine_process::stop() {
  if (pid_ <= 0) return -1;
  ::kill(pid_, SIGTERM);
  const int status = wait_exit(60s);
  if (status < 0) {
    // The end of its log says where it hung.
    std::cerr << "tailord did not stop within 60 s of SIGTERM; the end of its log:\n"
              << log_tail(40);
    kill();
  }
  return status;
}

int engine_process::wait_exit(std::chrono::milliseconds timeout) {
  if (pid_ <= 0) return -1;
  int status = 0;
  if (!wait_until([&] { return ::waitpid(pid_, &status, WNOHANG) == pid_; }, timeout)) return -1;
  pid_ = -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::string engine_process::log_tail(std::size_t lines) const {
  std::ifstream logf(dir_ + "/tailord.log");
  std::deque<std::string> tail;
  for (std::string line; std::getline(logf, line);) {
    tail.push_back(std::move(line));
    if (tail.size() > lines) tail.pop_front();
  }
  std::string out;
  for (const auto& line : tail) out += line + "\n";
  return out;
}

void engine_process::kill() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
}

std::pair<int, std::string> engine_process::get(const std::string& path,
                                                const std::string& token) const {
  httplib::Client cli("127.0.0.1", admin_port_);
  cli.set_connection_timeout(5);
  if (!token.empty()) cli.set_bearer_token_auth(token);
  auto res = cli.Get(path.c_str());
  if (!res) return {-1, httplib::to_string(res.error())};
  return {res->status, res->body};
}

int64_t committed_total(const std::string& bootstrap, const std::string& group,
                        const std::string& topic, int partitions) {
  auto conf = conf_for(bootstrap);
  std::string err;
  // Never subscribes: asks the group's coordinator without joining the group.
  if (conf->set("group.id", group, err) != RdKafka::Conf::CONF_OK)
    throw std::runtime_error("group.id: " + err);
  std::unique_ptr<RdKafka::KafkaConsumer> c(RdKafka::KafkaConsumer::create(conf.get(), err));
  if (!c) throw std::runtime_error("consumer: " + err);
  std::vector<RdKafka::TopicPartition*> parts;
  for (int p = 0; p < partitions; ++p) parts.push_back(RdKafka::TopicPartition::create(topic, p));
  int64_t total = c->committed(parts, 5000) == RdKafka::ERR_NO_ERROR ? 0 : -1;
  for (auto* tp : parts)
    if (total >= 0 && tp->err() == RdKafka::ERR_NO_ERROR && tp->offset() >= 0)
      total += tp->offset();
  RdKafka::TopicPartition::destroy(parts);
  c->close();
  return total;
}

collector::collector(const std::string& bootstrap, const std::vector<std::string>& topics,
                     bool uncommitted) {
  auto conf = conf_for(bootstrap);
  std::string err;
  conf->set("isolation.level", uncommitted ? "read_uncommitted" : "read_committed", err);
  conf->set("group.id", "collector-" + unique_suffix(), err);
  conf->set("auto.offset.reset", "earliest", err);
  conf->set("enable.auto.commit", "false", err);
  conf->set("topic.metadata.refresh.interval.ms", "500", err);
  c_.reset(RdKafka::KafkaConsumer::create(conf.get(), err));
  if (!c_) throw std::runtime_error("consumer: " + err);
  auto rc = c_->subscribe(topics);
  if (rc != RdKafka::ERR_NO_ERROR) throw std::runtime_error("subscribe: " + RdKafka::err2str(rc));
  thread_ = std::thread([this] { run(); });
}

collector::~collector() {
  {
    std::lock_guard<std::mutex> g(mtx_);
    stop_ = true;
  }
  thread_.join();
  c_->close();
}

void collector::run() {
  for (;;) {
    {
      std::lock_guard<std::mutex> g(mtx_);
      if (stop_) return;
    }
    std::unique_ptr<RdKafka::Message> m(c_->consume(100));
    if (m->err() != RdKafka::ERR_NO_ERROR) continue;
    record r;
    r.topic = m->topic_name();
    if (m->key()) r.key = *m->key();
    r.tombstone = m->payload() == nullptr;
    if (!r.tombstone) r.payload.assign(static_cast<const char*>(m->payload()), m->len());
    r.value = json::parse(r.payload, nullptr, false);
    {
      std::lock_guard<std::mutex> g(mtx_);
      records_.push_back(std::move(r));
    }
    signal_progress();
  }
}

std::vector<collector::record> collector::snapshot() const {
  std::lock_guard<std::mutex> g(mtx_);
  return records_;
}

std::size_t collector::size() const {
  std::lock_guard<std::mutex> g(mtx_);
  return records_.size();
}

std::vector<collector::record> collector::matching(
    const std::string& topic, const std::function<bool(const json&)>& pred) const {
  std::vector<record> out;
  std::lock_guard<std::mutex> g(mtx_);
  for (const auto& r : records_)
    if (r.topic == topic && pred(r.value)) out.push_back(r);
  return out;
}

json onboarding(const std::string& user, const std::string& request,
                std::vector<std::string> texts) {
  return {{"type", "onboarding.request"},
          {"schema_version", 1},
          {"user_id", user},
          {"request_id", request},
          {"texts", texts}};
}

json onboarding_with(const std::string& user, const std::string& request, json hyperparameters,
                     std::vector<std::string> prompts) {
  auto j = onboarding(user, request,
                      {"The quick brown fox jumps over the lazy dog.",
                       "A stitch in time saves nine.", "Fortune favours the bold."});
  j["hyperparameters"] = std::move(hyperparameters);
  if (!prompts.empty()) j["prompts"] = prompts;
  return j;
}

json job_cancel(const std::string& user, const std::string& job_id) {
  return {{"type", "job.cancel"}, {"schema_version", 1}, {"user_id", user}, {"job_id", job_id}};
}

void engine_test::start(json extra) { start_on("", std::move(extra), {}); }

void engine_test::start_on(const std::string& bootstrap, json extra,
                           const std::function<void(const topic_set&)>& make_topics) {
  engine_ = std::make_unique<engine_process>(
      ::testing::UnitTest::GetInstance()->current_test_info()->name(), std::move(extra),
      bootstrap);
  if (make_topics) make_topics(engine_->topics());
  if (HasFatalFailure()) return;
  engine_->start();
  if (HasFatalFailure()) return;
  const auto& t = engine_->topics();
  out_ = std::make_unique<collector>(engine_->bootstrap(),
                                     std::vector<std::string>{t.results, t.events, t.dlq});
  in_ = std::make_unique<producer>(engine_->bootstrap());
}

void engine_test::start_on_mock(json extra) {
  std::string err;
  mock_ = tailor::actors::mock_cluster::start(1, err);
  ASSERT_TRUE(mock_) << err;
  extra.merge_patch({{"kafka", {{"create_topics", false}}}});
  start_on(mock_->bootstrap(), std::move(extra), [&](const topic_set& t) {
    for (const auto* name :
         {&t.onboarding, &t.inference, &t.control, &t.results, &t.events, &t.dlq, &t.state})
      ASSERT_EQ(mock_->create_topic(*name, 4), "");
  });
}

void engine_test::start_with_fault(const char* name, const char* value, json extra) {
  // tailord reads it as it starts; the test process itself has no use for it.
  ::setenv(name, value, 1);
  start(std::move(extra));
  ::unsetenv(name);
}

void engine_test::send_onboarding(const json& j, int64_t timestamp_ms) {
  in_->send(engine_->topics().onboarding, j.value("user_id", "k"), j.dump(), timestamp_ms);
}

void engine_test::send_inference(const json& j, int64_t timestamp_ms) {
  in_->send(engine_->topics().inference, j.value("user_id", "k"), j.dump(), timestamp_ms);
}

void engine_test::send_control(const json& j) {
  in_->send(engine_->topics().control, j.value("user_id", "k"), j.dump());
}

std::vector<collector::record> engine_test::answers_to(const std::string& user,
                                                       const std::string& request) {
  std::vector<collector::record> out;
  for (const auto& r : out_->snapshot())
    if (r.topic != engine_->topics().dlq && r.value.is_object() &&
        r.value.value("user_id", "") == user && r.value.value("request_id", "") == request)
      out.push_back(r);
  return out;
}

collector::record engine_test::await_one(const std::string& user, const std::string& request) {
  bool got = wait_until([&] { return !answers_to(user, request).empty(); }, 30s);
  EXPECT_TRUE(got) << "no answer to " << user << "/" << request;
  return got ? answers_to(user, request).front() : collector::record{};
}

std::vector<collector::record> engine_test::events_of(const std::string& user,
                                                      const std::string& request,
                                                      const std::string& type) {
  std::vector<collector::record> out;
  for (auto& r : answers_to(user, request))
    if (r.value.value("type", "") == type) out.push_back(std::move(r));
  return out;
}

collector::record engine_test::await_event(const std::string& user, const std::string& request,
                                           const std::string& type,
                                           std::chrono::milliseconds timeout) {
  bool got = wait_until([&] { return !events_of(user, request, type).empty(); }, timeout);
  EXPECT_TRUE(got) << "no " << type << " for " << user << "/" << request;
  return got ? events_of(user, request, type).front() : collector::record{};
}

collector::record engine_test::await_match(const std::string& topic,
                                           const std::function<bool(const json&)>& pred,
                                           std::chrono::milliseconds timeout) {
  bool got = wait_until([&] { return !out_->matching(topic, pred).empty(); }, timeout);
  EXPECT_TRUE(got) << "no matching record on " << topic;
  return got ? out_->matching(topic, pred).front() : collector::record{};
}

bool engine_test::progressed_past(const std::string& user, const std::string& request, int step) {
  for (const auto& p : events_of(user, request, "job.progress"))
    if (p.value["progress"]["step"].get<int>() > step) return true;
  return false;
}

void engine_test::ask_users_without_a_model(const std::string& prefix, int users, int n) {
  auto user = [&](int i) { return prefix + std::to_string(i % users); };
  for (int i = 0; i < n; ++i) send_inference(inference(user(i), "q" + std::to_string(i)));
  in_->flush();
  for (int i = 0; i < n; ++i) {
    auto r = await_one(user(i), "q" + std::to_string(i));
    EXPECT_EQ(r.value["error"]["code"], "no_ready_model") << r.payload;
  }
}

double engine_test::metric(const std::string& name) {
  auto m = engine_->get("/metrics").second;
  auto pos = m.find("\n" + name + " ");
  if (pos == std::string::npos) return -1;
  return std::stod(m.substr(pos + name.size() + 2));
}

json inference(const std::string& user, const std::string& request, const std::string& prompt) {
  return {{"type", "inference.request"},
          {"schema_version", 1},
          {"user_id", user},
          {"request_id", request},
          {"prompt", prompt}};
}

}  // namespace tailor::test
