// tailorctl: publish requests to Tailor, follow its topics, read the admin API.
#include <httplib.h>
#include <librdkafka/rdkafkacpp.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "actors/config.hpp"
#include "actors/kafka.hpp"
#include "messages/events.hpp"

using json = nlohmann::json;
using namespace tailor;

namespace {

struct common_options {
  std::string bootstrap = "127.0.0.1:9092";
  std::string admin = "http://127.0.0.1:8080";
  std::vector<std::string> props;
  actors::topic_names topics;
  std::map<std::string, std::string> config_props;  // kafka.properties of --config
  std::string admin_unknown;  // why --config cannot reach the admin API; set: admin commands fail
  std::string admin_token;    // the admin API's bearer token, if it has one
};

[[noreturn]] void fail(const std::string& msg, int code = 1) {
  std::fprintf(stderr, "tailorctl: %s\n", msg.c_str());
  std::exit(code);
}

actors::kafka_config kafka_of(const common_options& o) {
  actors::kafka_config k;
  k.bootstrap_servers = o.bootstrap;
  k.properties = o.config_props;
  for (const auto& p : o.props) {
    auto eq = p.find('=');
    if (eq == std::string::npos) fail("--kafka-property " + p + ": expected KEY=VALUE", 2);
    k.properties[p.substr(0, eq)] = p.substr(eq + 1);
  }
  return k;
}

std::string random_id(const char* prefix) {
  std::random_device rd;
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%s-%08x%08x", prefix, rd(), rd());
  return buf;
}

void produce(const common_options& o, const std::string& topic, const std::string& key,
             const std::string& payload) {
  std::string err;
  auto conf = actors::make_conf(kafka_of(o), {{"enable.idempotence", "true"}}, err);
  if (!conf) fail(err);
  std::unique_ptr<RdKafka::Producer> p(RdKafka::Producer::create(conf.get(), err));
  if (!p) fail("producer: " + err);
  // Else the message waits up to a second for librdkafka to look the topic
  // up; and a topic the cluster does not have is said at once.
  const auto known = actors::look_up_topic(*p, topic, 10000, err);
  if (!known) fail("produce to " + topic + ": " + err);
  auto rc = p->produce(topic, RdKafka::Topic::PARTITION_UA, RdKafka::Producer::RK_MSG_COPY,
                       const_cast<char*>(payload.data()), payload.size(), key.data(), key.size(), 0,
                       nullptr);
  if (rc != RdKafka::ERR_NO_ERROR) fail("produce to " + topic + ": " + RdKafka::err2str(rc));
  rc = p->flush(30000);
  if (rc != RdKafka::ERR_NO_ERROR)
    fail("produce to " + topic + ": not delivered: " + RdKafka::err2str(rc));
}

// Runs tailor-pretrain, installed beside this program, with `args` in
// this process's place.
[[noreturn]] void run_pretrain(const std::vector<std::string>& args) {
  std::error_code ec;
  const auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) fail("pretrain: where tailorctl is: " + ec.message());
  const auto program = (self.parent_path() / "tailor-pretrain").string();
  std::vector<char*> argv{const_cast<char*>(program.c_str())};
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  ::execv(program.c_str(), argv.data());
  fail("pretrain: cannot run " + program + ": " + std::strerror(errno));
}

// Reads `topic` from its current end (or beginning), so that nothing
// published after construction is missed.
class follower {
 public:
  follower(const common_options& o, const std::string& topic, bool from_beginning) {
    std::string err;
    // A broker answers a fetch as data arrives; the demo's embedded cluster
    // only after fetch.wait.max.ms (500 ms by default), so it is shorter.
    auto conf = actors::make_conf(kafka_of(o),
                                  {{"group.id", random_id("tailorctl")},
                                   {"enable.auto.commit", "false"},
                                   {"fetch.wait.max.ms", "100"}},
                                  err);
    if (!conf) fail(err);
    consumer_.reset(RdKafka::KafkaConsumer::create(conf.get(), err));
    if (!consumer_) fail("consumer: " + err);
    std::vector<int32_t> ids;
    if (!actors::look_up_topic(*consumer_, topic, 10000, err, &ids)) fail(err);
    std::vector<RdKafka::TopicPartition*> parts;
    for (const int32_t id : ids) {
      int64_t lo = 0, hi = 0;
      auto rc = consumer_->query_watermark_offsets(topic, id, &lo, &hi, 10000);
      if (rc != RdKafka::ERR_NO_ERROR) fail("offsets of " + topic + ": " + RdKafka::err2str(rc));
      parts.push_back(RdKafka::TopicPartition::create(topic, id, from_beginning ? lo : hi));
    }
    if (parts.empty()) fail("topic " + topic + " has no partitions");
    auto rc = consumer_->assign(parts);
    RdKafka::TopicPartition::destroy(parts);
    if (rc != RdKafka::ERR_NO_ERROR) fail("assign " + topic + ": " + RdKafka::err2str(rc));
  }
  ~follower() { consumer_->close(); }

  // Next message payload, or nothing within `timeout_ms`.
  std::optional<std::string> next(int timeout_ms) {
    std::unique_ptr<RdKafka::Message> m(consumer_->consume(timeout_ms));
    if (m->err() == RdKafka::ERR__TIMED_OUT) return std::nullopt;
    if (m->err() != RdKafka::ERR_NO_ERROR) {
      std::fprintf(stderr, "tailorctl: %s\n", m->errstr().c_str());
      return std::nullopt;
    }
    return std::string(static_cast<const char*>(m->payload()), m->len());
  }

 private:
  std::unique_ptr<RdKafka::KafkaConsumer> consumer_;
};

// Waits for the answers on a topic that `mine` picks until `done` says so.
template <class Mine, class Done>
int wait_for(follower& f, double timeout_s, Mine mine, Done done) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  while (std::chrono::steady_clock::now() < deadline) {
    auto msg = f.next(200);
    if (!msg) continue;
    auto j = json::parse(*msg, nullptr, false);
    if (!j.is_object() || !mine(j)) continue;
    std::cout << j.dump() << std::endl;
    if (auto code = done(j)) return *code;
  }
  std::fprintf(stderr, "tailorctl: no answer within %.0f s\n", timeout_s);
  return 3;
}

// Publishes a request; with `wait`, prints its answers from `answers_topic`
// until `done` gives an exit code. The follower starts before the request is
// published, so no answer can be missed.
template <class Done>
int publish(const common_options& o, const std::string& topic, const std::string& answers_topic,
            const char* kind, const std::string& user, const std::string& request,
            const std::string& payload, bool wait, double timeout_s, Done done) {
  std::optional<follower> f;
  if (wait) f.emplace(o, answers_topic, false);
  produce(o, topic, user, payload);
  std::fprintf(stderr, "published %s request %s for user %s\n", kind, request.c_str(),
               user.c_str());
  if (!wait) return 0;
  auto mine = [&](const json& j) {
    return j.value("user_id", "") == user && j.value("request_id", "") == request;
  };
  return wait_for(*f, timeout_s, mine, done);
}

// Takes what tailord's configuration file says of its topics, Kafka and admin
// API, where neither a flag nor the environment said otherwise: so that one
// file serves both, whatever the topics are called.
void apply_tailord_config(const std::string& path, bool bootstrap_given, bool admin_given,
                          bool token_given, common_options& o) {
  actors::engine_config cfg;
  if (auto err = actors::load_config_file(path, cfg); !err.empty()) fail("--config: " + err, 2);
  o.topics = cfg.kafka.topics;
  o.config_props = cfg.kafka.properties;
  // Only the admin commands need it: publishing and following topics go on
  // without a secret this user may not read.
  if (!token_given && !cfg.admin_token_file.empty())
    if (auto err = actors::read_admin_token(cfg.admin_token_file, o.admin_token); !err.empty())
      o.admin_unknown =
          "admin.token_file: " + err + " (give --admin-token-file or TAILOR_ADMIN_TOKEN)";
  // What a running tailord wrote once ready: its admin port when the file
  // says 0 (any free one), and the embedded cluster's address.
  json ready;
  if (!cfg.ready_file.empty()) {
    std::ifstream in(cfg.ready_file);
    if (in) ready = json::parse(in, nullptr, false);
    if (ready.is_object() && ready.contains("pid") &&
        ::kill(ready.value("pid", 0), 0) != 0 && errno == ESRCH)
      ready = json();  // left by a tailord that has ended
  }
  const bool live = ready.is_object();
  if (!bootstrap_given) {
    if (!cfg.kafka.bootstrap_servers.empty())
      o.bootstrap = cfg.kafka.bootstrap_servers;
    else if (live)
      o.bootstrap = ready.value("bootstrap_servers", o.bootstrap);
    else
      fail("--config: " + path +
               " names no kafka.bootstrap_servers (tailord starts an embedded cluster) and no "
               "running tailord's ready_file: give --bootstrap-servers",
           2);
  }
  if (admin_given || !o.admin_unknown.empty()) return;
  int port = cfg.admin_port;
  if (port == 0 && live) port = ready.value("admin_port", 0);
  if (port == 0) {
    o.admin_unknown = path + " sets admin.port 0 (any free port), and no running tailord's "
                             "ready_file says which: give --admin";
    return;
  }
  // An address to listen on everywhere is reached here on loopback.
  const auto& host = cfg.admin_host;
  const bool any = host.empty() || host == "0.0.0.0" || host == "::";
  const bool v6 = !any && host.find(':') != std::string::npos;
  o.admin = "http://" + (any ? std::string("127.0.0.1") : v6 ? "[" + host + "]" : host) + ":" +
            std::to_string(port);
}

// GET on the admin API; exits with the server's message unless it is a 200.
std::string admin_fetch(const common_options& o, const std::string& path) {
  if (!o.admin_unknown.empty()) fail("--config: " + o.admin_unknown, 2);
  httplib::Client cli(o.admin);
  cli.set_connection_timeout(5);
  if (!o.admin_token.empty()) cli.set_bearer_token_auth(o.admin_token);
  auto res = cli.Get(path.c_str());
  if (!res) fail("admin API at " + o.admin + ": " + httplib::to_string(res.error()));
  if (res->status != 200) {
    std::cerr << res->body << (res->body.ends_with('\n') ? "" : "\n");
    std::exit(1);
  }
  return res->body;
}

void admin_get(const common_options& o, const std::string& path) {
  auto body = admin_fetch(o, path);
  std::cout << body;
  if (body.empty() || body.back() != '\n') std::cout << '\n';
}

// Prints a user's history, oldest first, one JSON entry per line, paging
// through the admin API; `max_entries` 0 prints all.
void print_history(const common_options& o, const std::string& user, std::size_t max_entries) {
  std::string after;
  std::size_t printed = 0;
  do {
    auto page = json::parse(admin_fetch(o, "/v1/users/" + user + "/history?limit=100" +
                                               (after.empty() ? "" : "&after=" + after)),
                            nullptr, false);
    if (!page.is_object()) fail("admin API: the history page is not JSON");
    for (const auto& e : page["entries"]) {
      std::cout << e.dump() << '\n';
      if (++printed == max_entries) return;
    }
    after = page.value("next", "");
  } while (!after.empty());
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail("cannot read " + path, 2);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A request given as a JSON file is sent as is; its ids are read for --wait.
std::string read_request_file(const std::string& path, std::string& user_id,
                              std::string& request_id) {
  auto payload = read_file(path);
  auto j = json::parse(payload, nullptr, false);
  if (!j.is_object()) fail(path + ": is not a JSON object", 2);
  user_id = j.value("user_id", "");
  request_id = j.value("request_id", "");
  return payload;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"tailorctl - talk to a Tailor engine through Kafka and its admin API"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("tailorctl ") + TAILOR_VERSION);
  common_options o;
  if (const char* b = std::getenv("TAILOR_BOOTSTRAP")) o.bootstrap = b;
  if (const char* a = std::getenv("TAILOR_ADMIN")) o.admin = a;
  app.add_option("-b,--bootstrap-servers", o.bootstrap,
                 "Kafka bootstrap servers (env TAILOR_BOOTSTRAP)");
  app.add_option("-a,--admin", o.admin, "admin API base URL (env TAILOR_ADMIN)");
  app.add_option("-X,--kafka-property", o.props,
                 "librdkafka property KEY=VALUE, repeatable (over --config's kafka.properties)");
  std::string token_file;
  app.add_option("--admin-token-file", token_file,
                 "file whose first line is the admin API's bearer token (env TAILOR_ADMIN_TOKEN: "
                 "the token itself)");
  if (const char* t = std::getenv("TAILOR_ADMIN_TOKEN")) o.admin_token = t;
  std::string config_file;
  if (const char* c = std::getenv("TAILOR_CONFIG")) config_file = c;
  app.add_option("-c,--config", config_file,
                 "tailord's configuration file: its topic names, kafka.bootstrap_servers, "
                 "kafka.properties, admin address (or, for port 0, its running ready_file's) and "
                 "admin.token_file, "
                 "where no flag or environment variable says otherwise (env TAILOR_CONFIG)");

  // onboard
  auto* onboard =
      app.add_subcommand("onboard", "publish an onboarding request (fine-tune a user's model)");
  messages::onboarding_request ob;
  std::string ob_file, texts_file, until = "terminal";
  bool ob_wait = false;
  double timeout = 120;
  onboard->add_option("-u,--user", ob.user_id, "user id");
  onboard->add_option("-r,--request", ob.request_id, "request id (default: random)");
  onboard->add_option("-t,--text", ob.texts, "a training text, repeatable");
  onboard->add_option("--texts-file", texts_file, "training texts, one per line")
      ->check(CLI::ExistingFile);
  onboard->add_option("--data-ref", ob.data_ref,
                      "training data file, relative to tailord's data directory");
  onboard->add_option("--base-model", ob.base_model, "base model id");
  onboard->add_option("--rank", ob.hparams.rank, "LoRA rank");
  onboard->add_option("--alpha", ob.hparams.alpha, "LoRA alpha");
  onboard->add_option(
      "--steps", ob.hparams.steps,
      "training steps (default: tailord's, which by default sizes them to the data)");
  onboard->add_option("--learning-rate", ob.hparams.learning_rate, "learning rate");
  onboard->add_option("--batch-size", ob.hparams.batch_size, "batch size");
  onboard->add_option("--seed", ob.hparams.seed, "training seed");
  onboard->add_option("--prompt", ob.prompts, "a prompt to answer once trained, repeatable");
  onboard->add_option("-f,--file", ob_file, "send this JSON file as the request instead")
      ->check(CLI::ExistingFile);
  onboard->add_flag("-w,--wait", ob_wait, "print the request's events until it ends (or --until)");
  onboard->add_option("--until", until,
                      "with --wait: stop at this event type (default: terminal, i.e. "
                      "model.ready, job.failed or job.cancelled)");
  onboard->add_option("--timeout", timeout, "with --wait: seconds to wait (default: 120)");

  // infer
  auto* infer = app.add_subcommand("infer", "publish an inference request");
  messages::inference_request in;
  std::string in_file;
  bool in_wait = false;
  infer->add_option("-u,--user", in.user_id, "user id");
  infer->add_option("-r,--request", in.request_id, "request id (default: random)");
  infer->add_option("-p,--prompt", in.prompt,
                    "the prompt (read whole; refused if over the base model's context: 127 bytes "
                    "for tailor-base)");
  infer->add_option("-m,--model", in.model_id, "model id (default: the user's newest ready model)");
  infer->add_option("--max-tokens", in.max_tokens,
                    "tokens to generate at most (generation also ends where the context is full)");
  infer->add_option("--min-tokens", in.min_tokens,
                    "tokens to generate before end-of-text or a stop sequence may end the "
                    "text");
  infer->add_option("--temperature", in.temperature, "sampling temperature (0: greedy)");
  infer->add_option("--top-k", in.top_k, "top-k sampling");
  infer->add_option("--top-p", in.top_p, "nucleus sampling");
  infer->add_option("--seed", in.seed, "sampling seed");
  infer->add_option("--stop", in.stop, "stop sequence, repeatable");
  infer->add_option("-f,--file", in_file, "send this JSON file as the request instead")
      ->check(CLI::ExistingFile);
  infer->add_flag("-w,--wait", in_wait, "print the result when it arrives");
  infer->add_option("--timeout", timeout, "with --wait: seconds to wait (default: 120)");

  // tail
  auto* tail =
      app.add_subcommand("tail", "print a topic's events as they arrive: results|events|dlq|state");
  std::string tail_what;
  bool from_beginning = false;
  double tail_seconds = 0;
  tail->add_option("topic", tail_what,
                   "results, events, dlq or state (the ready models the instances share)")
      ->required()
      ->check(CLI::IsMember({"results", "events", "dlq", "state"}));
  tail->add_flag("--from-beginning", from_beginning, "start at the oldest retained event");
  tail->add_option("--seconds", tail_seconds,
                   "stop after this long (default: follow until interrupted)");

  auto* jobs = app.add_subcommand("jobs", "list jobs (admin API)");
  std::string job_status;
  jobs->add_option("--status", job_status, "only jobs in this state");
  auto* job = app.add_subcommand("job", "show one job (admin API)");
  std::string job_id;
  job->add_option("job_id", job_id, "job id")->required();
  auto* status = app.add_subcommand(
      "status",
      "health, lag, training, latency by adapter and errors at a glance (admin API); exits 1 "
      "unless tailord is healthy and ready");
  auto* group = app.add_subcommand(
      "group", "the group's instances and open jobs, as this instance sees them (admin API)");
  std::size_t group_limit = 100;
  group->add_option("--limit", group_limit, "open jobs to show at most")
      ->check(CLI::PositiveNumber);
  auto* models = app.add_subcommand("models", "list a user's models, newest first (admin API)");
  std::string models_user;
  models->add_option("user_id", models_user, "user id")->required();
  auto* history = app.add_subcommand(
      "history", "a user's requests and answers, oldest first, one JSON line each (admin API)");
  std::string history_user;
  std::size_t history_limit = 0;
  history->add_option("user_id", history_user, "user id")->required();
  history->add_option("-n,--limit", history_limit, "print at most this many (default: all)");
  auto* cancel =
      app.add_subcommand("cancel", "cancel a job (publishes job.cancel on the control topic)");
  messages::job_cancel jc;
  cancel->add_option("job_id", jc.job_id, "job id")->required();
  cancel->add_option("-u,--user", jc.user_id, "the job's user")->required();
  bool cancel_wait = false;
  cancel->add_flag("-w,--wait", cancel_wait,
                   "print the answer (job.cancelled, or job.cancel_rejected with the reason); "
                   "exit 1 if refused");
  cancel->add_option("--timeout", timeout, "with --wait: seconds to wait (default: 120)");

  auto* del = app.add_subcommand(
      "delete-user",
      "delete everything Tailor keeps of a user: models, adapters, jobs, answers, history "
      "(publishes user.delete on the control topic)");
  messages::user_delete ud;
  del->add_option("user_id", ud.user_id, "the user")->required();
  del->add_option("-r,--request", ud.request_id, "request id (default: random)");
  bool del_wait = false;
  del->add_flag("-w,--wait", del_wait,
                "print the answer (user.deleted with what went, or user.delete_rejected with "
                "the reason); exit 1 if refused");
  del->add_option("--timeout", timeout, "with --wait: seconds to wait (default: 120)");

  // Pre-training loads LibTorch, which every other subcommand would pay for
  // at start: it is a program of its own, run from here as before.
  auto* pre = app.add_subcommand(
      "pretrain",
      "pre-train a base model on the English fortunes and cache it: runs tailor-pretrain with "
      "the arguments that follow (tailorctl pretrain --help lists them)");
  pre->prefix_command();
  pre->set_help_flag();

  CLI11_PARSE(app, argc, argv);
  if (!token_file.empty())
    if (auto err = actors::read_admin_token(token_file, o.admin_token); !err.empty())
      fail("--admin-token-file: " + err, 2);
  if (!config_file.empty() && !pre->parsed())
    apply_tailord_config(
        config_file,
        app.get_option("--bootstrap-servers")->count() > 0 || std::getenv("TAILOR_BOOTSTRAP"),
        app.get_option("--admin")->count() > 0 || std::getenv("TAILOR_ADMIN"),
        !o.admin_token.empty(), o);

  if (pre->parsed()) run_pretrain(pre->remaining());

  if (onboard->parsed()) {
    std::string payload;
    if (!ob_file.empty()) {
      payload = read_request_file(ob_file, ob.user_id, ob.request_id);
    } else {
      if (ob.user_id.empty()) fail("onboard: --user is required", 2);
      if (ob.request_id.empty()) ob.request_id = random_id("onb");
      if (!texts_file.empty()) {
        std::ifstream in(texts_file);
        for (std::string line; std::getline(in, line);)
          if (!line.empty()) ob.texts.push_back(line);
      }
      payload = messages::to_json(ob);
    }
    return publish(o, o.topics.onboarding, o.topics.events, "onboarding", ob.user_id, ob.request_id,
                   payload, ob_wait, timeout, [&](const json& j) -> std::optional<int> {
                     auto type = j.value("type", "");
                     if (type == "job.failed") return 1;
                     if (type == until || (until == "terminal" &&
                                           (type == "model.ready" || type == "job.cancelled")))
                       return 0;
                     return std::nullopt;
                   });
  }
  if (infer->parsed()) {
    std::string payload;
    if (!in_file.empty()) {
      payload = read_request_file(in_file, in.user_id, in.request_id);
    } else {
      if (in.user_id.empty()) fail("infer: --user is required", 2);
      if (in.request_id.empty()) in.request_id = random_id("inf");
      payload = messages::to_json(in);
    }
    return publish(o, o.topics.inference, o.topics.results, "inference", in.user_id, in.request_id,
                   payload, in_wait, timeout,
                   [](const json& j) -> std::optional<int> { return j.contains("error") ? 1 : 0; });
  }
  if (del->parsed()) {
    if (ud.request_id.empty()) ud.request_id = random_id("del");
    return publish(o, o.topics.control, o.topics.events, "user.delete", ud.user_id, ud.request_id,
                   messages::to_json(ud), del_wait, timeout,
                   [](const json& j) -> std::optional<int> {
                     const auto type = j.value("type", "");
                     if (type == "user.deleted") return 0;
                     if (type == "user.delete_rejected") return 1;
                     return std::nullopt;
                   });
  }
  if (tail->parsed()) {
    const auto& topic = tail_what == "results"  ? o.topics.results
                        : tail_what == "events" ? o.topics.events
                        : tail_what == "state"  ? o.topics.state
                                                : o.topics.dlq;
    follower f(o, topic, from_beginning);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(tail_seconds);
    while (tail_seconds <= 0 || std::chrono::steady_clock::now() < deadline)
      if (auto m = f.next(200)) std::cout << *m << std::endl;
    return 0;
  }
  if (jobs->parsed())
    admin_get(o, "/v1/jobs" + (job_status.empty() ? "" : "?status=" + job_status));
  if (job->parsed()) admin_get(o, "/v1/jobs/" + job_id);
  if (models->parsed()) admin_get(o, "/v1/users/" + models_user + "/models");
  if (group->parsed()) admin_get(o, "/v1/group?limit=" + std::to_string(group_limit));
  if (status->parsed()) {
    const auto body = admin_fetch(o, "/v1/status");
    std::cout << body << (body.ends_with('\n') ? "" : "\n");
    // For scripts and probes: 0 only when healthy and ready.
    const auto j = json::parse(body, nullptr, false);
    return j.is_object() && j.value("health", "") == "ok" && j.value("ready", false) ? 0 : 1;
  }
  if (history->parsed()) print_history(o, history_user, history_limit);
  if (cancel->parsed()) {
    std::optional<follower> f;
    if (cancel_wait) f.emplace(o, o.topics.events, false);  // before: no answer is missed
    produce(o, o.topics.control, jc.user_id, messages::to_json(jc));
    std::fprintf(stderr, "published job.cancel for %s\n", jc.job_id.c_str());
    if (!cancel_wait) return 0;
    // Whichever instance runs the job answers (design section 3).
    auto answer = [&](const json& j) {
      const auto type = j.value("type", "");
      return j.value("user_id", "") == jc.user_id && j.value("job_id", "") == jc.job_id &&
             (type == "job.cancelled" || type == "job.cancel_rejected");
    };
    return wait_for(*f, timeout, answer, [](const json& j) -> std::optional<int> {
      return j.value("type", "") == "job.cancelled" ? 0 : 1;
    });
  }
  return 0;
}
