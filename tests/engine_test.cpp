// tailord against a real Kafka broker (CTest label `kafka`): every event gets
// exactly one answer of the right kind, effects happen once, and nothing is
// lost across a crash.
#include <gtest/gtest.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <librdkafka/rdkafkacpp.h>
#include <netinet/in.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "actors/egress.hpp"
#include "actors/kafka.hpp"
#include "actors/metrics.hpp"
#include "engine_harness.hpp"
#include "engine_run.hpp"
#include "temp_dir.hpp"

using namespace tailor::test;
namespace fs = std::filesystem;

class EngineTest : public engine_test {
 protected:
  std::map<std::string, int> answers_while_partitions_move(json extra);
  void broker_away_longer_than_the_session(const json& config);
  // Starts tailord on `data_dir` (with `extra`), makes user early's model,
  // starts a long job for user late and, once it trains, runs `fill`.
  void fill_the_disk_while_a_job_trains(const std::string& data_dir, json extra,
                                        const std::function<bool()>& fill);
};

namespace {

// The ingress's events in flight of `topic` now (tailor_ingress_in_flight).
double in_flight(const tailor::test::engine_process& e, const std::string& topic) {
  const auto m = e.get("/metrics").second;
  const auto key = "tailor_ingress_in_flight{topic=\"" + topic + "\"} ";
  const auto pos = m.find(key);
  return pos == std::string::npos ? -1 : std::stod(m.substr(pos + key.size()));
}

// Output is at least once, with identical content: an answer seen twice
// (the same user, request and type) is the same bytes. Progress reports of
// a job that ran again are not answers.
void expect_answers_seen_twice_identical(const std::vector<collector::record>& records) {
  std::map<std::string, std::string> first;
  for (const auto& r : records) {
    if (!r.value.is_object() || r.value.value("type", "") == "job.progress") continue;
    auto key = r.value.value("user_id", "") + "/" + r.value.value("request_id", "") + "/" +
               r.value.value("type", "");
    auto [it, fresh] = first.emplace(key, r.payload);
    if (!fresh) {
      EXPECT_EQ(it->second, r.payload) << "an answer seen twice differs: " << key;
    }
  }
}

// After a producer's fatal error: an answer seen twice is the same, the
// producer of client id `client` was replaced once, and the engine works.
void expect_replaced_once_and_healthy(const engine_process& e, const collector& out,
                                      const std::string& client) {
  expect_answers_seen_twice_identical(out.snapshot());
  const auto m = e.get("/metrics").second;
  const auto key = "\ntailor_kafka_producer_replacements_total{producer=\"" + client + "\"} ";
  const auto pos = m.find(key);
  ASSERT_NE(pos, std::string::npos) << "no replacement of " << client << " counted";
  EXPECT_EQ(std::stod(m.substr(pos + key.size())), 1);
  EXPECT_EQ(e.get("/healthz"), std::make_pair(200, std::string("ok\n")));
}

// Runs tailorctl with `args`; its exit status and what it printed (kept in
// `dir`).
std::pair<int, std::string> tailorctl(const std::string& dir, const std::string& args) {
  const auto out = dir + "/tailorctl.out";
  const int st =
      std::system((std::string(TAILORCTL_PATH) + " " + args + " >" + out + " 2>&1").c_str());
  std::ifstream in(out);
  std::stringstream ss;
  ss << in.rdbuf();
  return {WIFEXITED(st) ? WEXITSTATUS(st) : -1, ss.str()};
}

std::pair<int, std::string> tailorctl(const engine_process& e, const std::string& args) {
  return tailorctl(e.data_dir(), args);
}

}  // namespace

TEST_F(EngineTest, OnboardingRequestIsQueuedAndVisibleToOperators) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  send_onboarding(onboarding("alice", "r1"));
  in_->flush();
  auto ans = await_one("alice", "r1");
  EXPECT_EQ(ans.topic, engine_->topics().events);
  EXPECT_EQ(ans.key, "alice");
  EXPECT_EQ(ans.value["type"], "job.queued") << "the first answer is job.queued";
  EXPECT_EQ(ans.value["schema_version"], 1);
  std::string job_id = ans.value["job_id"];
  auto [status, body] = engine_->get("/v1/jobs/" + job_id);
  ASSERT_EQ(status, 200) << body;
  auto job = json::parse(body);
  EXPECT_EQ(job["user_id"], "alice");
  EXPECT_EQ(job["request_id"], "r1");
  await_event("alice", "r1", "model.ready");
  auto [s2, list] = engine_->get("/v1/jobs?status=ready");
  ASSERT_EQ(s2, 200);
  EXPECT_EQ(json::parse(list).size(), 1u) << list;
}

TEST_F(EngineTest, InferenceForAUserWithNoModelIsAnsweredWithAnError) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  send_inference(inference("u1", "q1"));
  in_->flush();
  auto ans = await_one("u1", "q1");
  EXPECT_EQ(ans.topic, engine_->topics().results);
  EXPECT_EQ(ans.value["type"], "inference.result");
  EXPECT_EQ(ans.value["error"]["code"], "no_ready_model");
  EXPECT_EQ(ans.value["error"]["message"], "user u1 has no ready model");
}

// Backpressure holds a topic and lets it go at once: a backlog drains at the
// engine's pace, not one pause per long poll. With at most two events in
// flight, 400 requests hold and release the inference topic about 200 times.
// When each release resumed paused partitions, it waited for the fetch in
// flight (500 ms, librdkafka's long poll, which the consumer now keeps): the
// 400 took over a minute and a half, and an open loop above ~500 requests/s
// that was once held never caught up. Now the ingress stops reading the
// inference queue instead, and a release reads what waits there.
TEST_F(EngineTest, ABacklogDrainsThroughPausesWithoutWaitingALongPollEach) {
  start({{"max_in_flight", 2}});
  ASSERT_FALSE(HasFatalFailure());
  const int n = 400;
  // Users without a model: each answer is an error at once, no step runs.
  for (int i = 0; i < n; ++i)
    send_inference(inference("nobody-" + std::to_string(i % 8), "q" + std::to_string(i)));
  in_->flush();
  const auto& t = engine_->topics();
  auto answered = [&] {
    return out_->matching(t.results, [](const json& v) { return v.contains("error"); }).size();
  };
  // Held means held: never more than two read and unanswered.
  double most = 0;
  EXPECT_TRUE(wait_until(
      [&] {
        most = std::max(most, in_flight(*engine_, t.inference));
        return answered() >= static_cast<std::size_t>(n);
      },
      60s))
      << answered() << " of " << n << " answered in 60 s";
  EXPECT_LE(most, 2) << "events read past max_in_flight";
  auto m = engine_->get("/metrics").second;
  const auto key = "tailor_ingress_pauses_total{topic=\"" + t.inference + "\"} ";
  const auto pos = m.find(key);
  ASSERT_NE(pos, std::string::npos) << m;
  EXPECT_GE(std::stod(m.substr(pos + key.size())), 50) << "the backlog did not hold the topic";
  // What an operator watches memory by: the process's, and the store's part.
  auto gauge = [&](const std::string& name) {
    const auto at = m.find("\n" + name + " ");
    return at == std::string::npos ? -1.0 : std::stod(m.substr(at + name.size() + 2));
  };
  EXPECT_GT(gauge("process_resident_memory_bytes"), 20e6) << m;
  EXPECT_GT(gauge("tailor_store_memory_bytes{part=\"memtables\"}"), 0)
      << "400 refusals were stored";
  EXPECT_GE(gauge("tailor_store_memory_bytes{part=\"block_cache\"}"), 0) << m;
  // Each refusal's record: its key, and an answer of well over 100 bytes.
  EXPECT_GT(gauge("tailor_store_written_bytes_total{table=\"requests\"}"), 400 * 100) << m;
  EXPECT_EQ(gauge("tailor_store_written_bytes_total{table=\"jobs\"}"), 0) << "no job was made";
}

TEST_F(EngineTest, UnreadableInputGoesToTheDlqAndTheEngineGoesOn) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  const auto& t = engine_->topics();
  in_->send(t.inference, "k1", "{not json");
  in_->send(t.inference, "k2", R"({"type":"inference.request","schema_version":1,"user_id":"u"})");
  in_->send(
      t.onboarding, "k3",
      R"({"type":"onboarding.request","schema_version":1,"user_id":"bad id","request_id":"r","texts":["a"]})");
  in_->send(t.control, "k4", R"([1,2,3])");
  // Within max_event_bytes, and whole in base64 over the largest record
  // Kafka takes (1 MB): the DLQ keeps its first 256 KiB.
  const std::string big(900 * 1024, 'x');
  in_->send(t.inference, "k5", big);
  // A key as large: the DLQ record keeps its first 16 KiB, as Kafka key and
  // in the record, else the record could not be published either.
  const std::string long_key(600 * 1024, 'k');
  in_->send(t.inference, long_key, "{not json");
  send_inference(inference("u2", "after"));
  in_->flush();
  ASSERT_TRUE(wait_until(
      [&] { return out_->matching(t.dlq, [](const json&) { return true; }).size() >= 6; }, 30s))
      << engine_->log_tail(10);
  std::map<std::string, json> by_key;
  for (const auto& r : out_->matching(t.dlq, [](const json&) { return true; }))
    by_key[r.key] = r.value;
  EXPECT_EQ(by_key["k1"]["error"]["code"], "invalid_json");
  EXPECT_EQ(by_key["k1"]["payload_base64"], "e25vdCBqc29u");
  EXPECT_EQ(by_key["k1"]["source"]["topic"], t.inference);
  EXPECT_GE(by_key["k1"]["source"]["offset"].get<int64_t>(), 0);
  EXPECT_EQ(by_key["k2"]["error"]["code"], "missing_field");
  EXPECT_EQ(by_key["k2"]["error"]["message"], "request_id: is required");
  EXPECT_EQ(by_key["k3"]["error"]["code"], "invalid_id");
  EXPECT_EQ(by_key["k4"]["error"]["code"], "not_an_object");
  EXPECT_EQ(by_key["k5"]["error"]["code"], "invalid_json");
  EXPECT_EQ(by_key["k5"]["payload_bytes"], big.size());
  EXPECT_EQ(by_key["k5"]["payload_truncated"], true);
  EXPECT_EQ(by_key["k5"]["payload_base64"].get<std::string>().size(), 4u * (256 * 1024 + 2) / 3);
  EXPECT_EQ(by_key["k1"]["payload_truncated"], false);
  EXPECT_EQ(by_key["k1"]["key_truncated"], false);
  EXPECT_EQ(by_key["k1"]["key_bytes"], 2);
  const auto& cut = by_key[long_key.substr(0, 16 * 1024)];
  EXPECT_EQ(cut.value("key", ""), long_key.substr(0, 16 * 1024));
  EXPECT_EQ(cut["key_bytes"], long_key.size());
  EXPECT_EQ(cut["key_truncated"], true);
  EXPECT_EQ(cut["payload_base64"], "e25vdCBqc29u");
  EXPECT_EQ(await_one("u2", "after").value["error"]["code"], "no_ready_model");
}

// After a restart, partitions with nothing new to read count no lag: each
// once counted its whole history until a message came there, so that a
// restart looked like a backlog (40 here) to an operator's alert.
TEST_F(EngineTest, ARestartShowsNoLagWhereNothingWaits) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  ask_users_without_a_model("u", 8, 40);
  ASSERT_EQ(engine_->stop(), 0);  // commits what was answered
  engine_->start();
  const auto lag = "tailor_consumer_lag{topic=\"" + engine_->topics().inference + "\"}";
  // Set from each second's statistics of the consumer, assigned by now.
  ASSERT_TRUE(wait_until([&] { return metric(lag) >= 0; }, 10s));
  // A false backlog's absence cannot be awaited: three seconds' statistics.
  EXPECT_FALSE(wait_until([&] { return metric(lag) > 0; }, 3s)) << metric(lag);
  send_inference(inference("u0", "after"));
  in_->flush();
  EXPECT_EQ(await_one("u0", "after").value["error"]["code"], "no_ready_model");
  EXPECT_TRUE(wait_until([&] { return metric(lag) == 0; }, 10s)) << metric(lag);
  EXPECT_EQ(engine_->stop(), 0) << engine_->log_tail(20);
}

// A crash replays only what was answered in the last commit interval, not
// everything since the engine started: answered offsets are committed while
// it runs, not only when it stops.
TEST_F(EngineTest, AnsweredEventsAreCommittedWhileTheEngineRuns) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  const int n = 12;
  ask_users_without_a_model("u", n, n);
  const auto& e = *engine_;
  int64_t committed = 0;
  EXPECT_TRUE(wait_until(
      [&] {
        committed = committed_total(e.bootstrap(), e.group(), e.topics().inference, 4);
        return committed == n;
      },
      20s))
      << "committed " << committed << " of " << n;
}

TEST_F(EngineTest, UngrantableRequestsAreAnsweredToTheirRequester) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  auto hp = onboarding("u", "hp");
  hp["hyperparameters"] = {{"rank", 100000}};
  send_onboarding(hp);
  auto esc = onboarding("u", "esc");
  esc.erase("texts");
  esc["data_ref"] = "../../etc/passwd";
  send_onboarding(esc);
  auto base = onboarding("u", "base");
  base["base_model"] = "no-such-model";
  send_onboarding(base);
  auto mt = inference("u", "mt");
  mt["max_tokens"] = 0;
  send_inference(mt);
  in_->flush();
  auto a = await_one("u", "hp").value;
  EXPECT_EQ(a["type"], "job.failed");
  EXPECT_EQ(a["error"]["code"], "out_of_bounds");
  EXPECT_NE(a["error"]["message"].get<std::string>().find("hyperparameters.rank"),
            std::string::npos);
  a = await_one("u", "esc").value;
  EXPECT_EQ(a["type"], "job.failed");
  EXPECT_EQ(a["error"]["code"], "path_escape");
  a = await_one("u", "base").value;
  EXPECT_EQ(a["error"]["code"], "unknown_base_model");
  a = await_one("u", "mt").value;
  EXPECT_EQ(a["type"], "inference.result");
  EXPECT_EQ(a["error"]["message"], "max_tokens: must be an integer in [1, 4096]");
  // Nothing went to the DLQ, and no job exists for refused requests.
  EXPECT_TRUE(out_->matching(engine_->topics().dlq, [](const json&) { return true; }).empty());
  EXPECT_EQ(json::parse(engine_->get("/v1/jobs").second).size(), 0u);
}

TEST_F(EngineTest, ARepeatedRequestCreatesNothingNewAndGetsTheStoredAnswer) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  send_onboarding(onboarding("u", "same"));
  in_->flush();
  auto first = await_one("u", "same");
  send_onboarding(onboarding("u", "same"));
  // Another user may use the same request id: it is theirs.
  send_onboarding(onboarding("v", "same"));
  auto changed = onboarding("u", "same", {"different text"});
  in_->flush();
  ASSERT_TRUE(wait_until([&] { return events_of("u", "same", "job.queued").size() >= 2; }, 30s));
  await_one("v", "same");
  send_onboarding(changed);
  in_->flush();
  auto refused = await_event("u", "same", "job.failed", 30s);
  auto queued = events_of("u", "same", "job.queued");
  EXPECT_EQ(queued[1].payload, first.payload) << "a repeat is answered with identical bytes";
  EXPECT_EQ(refused.value["error"]["code"], "duplicate_request_id");
  auto jobs = json::parse(engine_->get("/v1/jobs").second);
  EXPECT_EQ(jobs.size(), 2u) << jobs.dump();
}

TEST_F(EngineTest, CancellingAQueuedJob) {
  // One slot holds a running job and the next in line; c1 comes third.
  start({{"training", {{"slots", 1}}}});
  ASSERT_FALSE(HasFatalFailure());
  send_onboarding(onboarding_with("long", "l1", {{"steps", 10000}}));
  send_onboarding(onboarding_with("long", "l2", {{"steps", 10000}}));
  in_->flush();
  // Partitions are consumed in no set order: c1 goes once l1 and l2 hold the slot.
  await_event("long", "l2", "job.admitted", 30s);
  send_onboarding(onboarding("u", "c1"));
  in_->flush();
  std::string job_id = await_one("u", "c1").value["job_id"];
  send_control(job_cancel("u", job_id));
  send_control(job_cancel("mallory", job_id));
  in_->flush();
  ASSERT_TRUE(wait_until([&] { return answers_to("u", "c1").size() >= 2; }, 30s));
  EXPECT_EQ(answers_to("u", "c1")[1].value["type"], "job.cancelled");
  ASSERT_TRUE(wait_until(
      [&] {
        return !out_->matching(engine_->topics().events,
                               [](const json& j) { return j.value("user_id", "") == "mallory"; })
                    .empty();
      },
      30s));
  auto rej = out_->matching(engine_->topics().events,
                            [](const json& j) { return j.value("user_id", "") == "mallory"; });
  EXPECT_EQ(rej[0].value["type"], "job.cancel_rejected");
  EXPECT_EQ(rej[0].value["error"]["code"], "job_not_found");
  EXPECT_EQ(json::parse(engine_->get("/v1/jobs/" + job_id).second)["status"], "cancelled");
  EXPECT_TRUE(events_of("u", "c1", "job.admitted").empty()) << "a cancelled job never runs";
}

TEST_F(EngineTest, AdminApi) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  EXPECT_EQ(engine_->get("/healthz").first, 200);
  EXPECT_EQ(engine_->get("/readyz").first, 200);
  send_onboarding(onboarding("w", "m1"));
  in_->send(engine_->topics().inference, "w", "garbage");
  in_->flush();
  await_one("w", "m1");
  ASSERT_TRUE(wait_until([&] { return out_->size() >= 2; }, 30s));
  std::string metrics;
  ASSERT_TRUE(wait_until(
      [&] {
        metrics = engine_->get("/metrics").second;
        // Delivery reports reach the counters a moment after consumers see
        // the records; the lag comes with the consumer's statistics, each
        // second.
        return metrics.find("tailor_dlq_total 1") != std::string::npos &&
               metrics.find("tailor_events_out_total{topic=\"" + engine_->topics().events +
                            "\"}") != std::string::npos &&
               metrics.find("tailor_consumer_lag{topic=") != std::string::npos;
      },
      10s))
      << metrics;
  EXPECT_NE(
      metrics.find("tailor_events_in_total{topic=\"" + engine_->topics().onboarding + "\"} 1"),
      std::string::npos)
      << metrics;
  EXPECT_NE(metrics.find("tailor_events_out_total{topic=\"" + engine_->topics().events + "\"}"),
            std::string::npos);
  EXPECT_NE(metrics.find("tailor_errors_total{code=\"invalid_json\"} 1"), std::string::npos);
  EXPECT_NE(metrics.find("tailor_user_actors 1"), std::string::npos);
  EXPECT_NE(metrics.find("tailor_training_queue "), std::string::npos);
  auto [s, models] = engine_->get("/v1/users/nobody/models");
  EXPECT_EQ(s, 200);
  EXPECT_EQ(json::parse(models), json::array());
  EXPECT_EQ(engine_->get("/v1/jobs/job-unknown").first, 404);
  // The same at a glance, as JSON and through tailorctl, whose status says
  // whether tailord is healthy and ready.
  auto [code, body] = engine_->get("/v1/status");
  ASSERT_EQ(code, 200) << body;
  const auto status = json::parse(body, nullptr, false);
  ASSERT_TRUE(status.is_object()) << body;
  EXPECT_EQ(status["health"], "ok");
  EXPECT_EQ(status["version"], TAILOR_VERSION);
  EXPECT_EQ(status["ready"], true);
  EXPECT_EQ(status["dlq"], 1);
  EXPECT_EQ(status["errors"]["invalid_json"], 1);
  EXPECT_TRUE(status["consumer_lag"].contains(engine_->topics().onboarding)) << body;
  EXPECT_TRUE(status["paused"].empty());
  EXPECT_GT(status["resident_memory_bytes"].get<double>(), 20e6);
  EXPECT_TRUE(status["training"].contains("queue")) << body;
  const auto status_args =
      "--admin http://127.0.0.1:" + std::to_string(engine_->admin_port()) + " status";
  auto [ctl_code, ctl_out] = tailorctl(*engine_, status_args);
  EXPECT_EQ(ctl_code, 0) << ctl_out;
  EXPECT_NE(ctl_out.find("\"health\": \"ok\""), std::string::npos) << ctl_out;
  EXPECT_EQ(engine_->stop(), 0) << "SIGTERM stops tailord cleanly";
  std::tie(ctl_code, ctl_out) = tailorctl(*engine_, status_args);
  EXPECT_EQ(ctl_code, 1) << "no tailord there: " << ctl_out;
}

// Pre-training is a program of its own, so that tailorctl does not load
// LibTorch; `tailorctl pretrain` runs it with the arguments that follow.
TEST(Tailorctl, PretrainRunsTailorPretrainWithItsArguments) {
  tailor::test::temp_dir dir("ctl-pretrain");
  const auto model = (dir.path() / "tiny.safetensors").string();
  auto [code, out] = tailorctl(dir.path().string(),
                               "pretrain --config tailor-test --steps 2 --minutes 1 -o " + model);
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("pre-trained tailor-test: 2 steps"), std::string::npos) << out;
  EXPECT_TRUE(std::filesystem::exists(model)) << out;
  std::tie(code, out) = tailorctl(dir.path().string(), "pretrain --config tailor-test -o " + model);
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("is cached at " + model), std::string::npos) << out;
  std::tie(code, out) = tailorctl(dir.path().string(), "pretrain --config nope");
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("unknown model configuration 'nope'"), std::string::npos) << out;
}

// An operator points tailorctl at tailord's own configuration file: it then
// publishes on and reads the topics tailord was configured with (here each
// test's own names, not tailor.*), and finds the admin API that tailord,
// told to take any free port, wrote in its ready file.
TEST_F(EngineTest, TailorctlTakesTopicsAndAddressesFromTailordsConfigurationFile) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  const auto config = " --config " + engine_->data_dir() + "/tailord.json ";
  auto [code, out] = tailorctl(*engine_, config + "infer --user u9 --request q9 --prompt hello "
                                                  "--wait --timeout 60");
  EXPECT_EQ(code, 1) << "an error result exits 1: " << out;
  EXPECT_NE(out.find("\"no_ready_model\""), std::string::npos) << out;
  const auto answer = await_one("u9", "q9");
  EXPECT_EQ(answer.topic, engine_->topics().results) << "published on the configured topic";
  // A topic the cluster does not have is said at once, not after a wait.
  const auto elsewhere = engine_->data_dir() + "/elsewhere.json";
  std::ofstream(elsewhere) << json{{"kafka",
                                    {{"bootstrap_servers", engine_->bootstrap()},
                                     {"topics", {{"inference", "no-such-topic"}}}}}}
                                  .dump();
  std::tie(code, out) = tailorctl(*engine_, "--config " + elsewhere + " infer -u u9 -p hello");
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("produce to no-such-topic: lookup of no-such-topic: Broker: Unknown topic"),
            std::string::npos)
      << out;
  std::tie(code, out) = tailorctl(*engine_, config + "status");
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("\"health\": \"ok\""), std::string::npos) << out;
  // A flag still wins over the file.
  std::tie(code, out) = tailorctl(*engine_, config + "--admin http://127.0.0.1:1 status");
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("127.0.0.1:1"), std::string::npos) << out;
  // Once tailord has ended, its ready file no longer says where it is.
  ASSERT_EQ(engine_->stop(), 0);
  std::tie(code, out) = tailorctl(*engine_, config + "status");
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("admin.port 0"), std::string::npos) << out;
  std::tie(code, out) =
      tailorctl(*engine_, "--config " + engine_->data_dir() + "/none.json status");
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("cannot read configuration file"), std::string::npos) << out;
}

// With admin.token_file, the admin API answers only those who show its
// token (the history holds users' prompts and answers); the probes stay
// open for process managers. tailorctl finds the token where it finds the
// rest: in tailord's configuration file, or a flag.
TEST_F(EngineTest, AnAdminApiWithATokenAnswersOnlyThoseWhoShowIt) {
  const auto token_file =
      fs::temp_directory_path() / ("tailor-admin-token-" + std::to_string(::getpid()));
  std::ofstream(token_file) << "  s3cret-token \nnot this line\n";
  start({{"admin", {{"token_file", token_file.string()}}}});
  ASSERT_FALSE(HasFatalFailure());
  for (const auto* path : {"/v1/status", "/metrics", "/v1/users/u1/history", "/v1/jobs"}) {
    const auto [code, body] = engine_->get(path);
    EXPECT_EQ(code, 401) << path;
    EXPECT_NE(body.find("\"unauthenticated\""), std::string::npos) << body;
    EXPECT_EQ(engine_->get(path, "s3cret-tokem").first, 401) << path;
    EXPECT_EQ(engine_->get(path, "s3cret-token").first, 200) << path;
  }
  EXPECT_EQ(engine_->get("/healthz").first, 200);
  EXPECT_EQ(engine_->get("/readyz").first, 200);
  const auto admin = " --admin http://127.0.0.1:" + std::to_string(engine_->admin_port());
  auto [code, out] =
      tailorctl(*engine_, "--config " + engine_->data_dir() + "/tailord.json status");
  EXPECT_EQ(code, 0) << out;
  std::tie(code, out) = tailorctl(*engine_, admin + " status");
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("\"unauthenticated\""), std::string::npos) << out;
  std::tie(code, out) =
      tailorctl(*engine_, admin + " --admin-token-file " + token_file.string() + " status");
  EXPECT_EQ(code, 0) << out;
  EXPECT_EQ(engine_->stop(), 0);
  fs::remove(token_file);
}

// An idle tailord hands the heap malloc holds but no longer uses back to
// the system, and a busy one never stops to: no trim while requests keep
// coming less than memory_trim_idle_seconds apart, one once they stop.
TEST_F(EngineTest, AnIdleTailordGivesItsFreedHeapBackAndABusyOneDoesNot) {
  start({{"memory_trim_idle_seconds", 3}});
  ASSERT_FALSE(HasFatalFailure());
  const auto ask = [&](int i) {
    const auto id = "q" + std::to_string(i);
    send_inference(inference("u" + std::to_string(i % 3), id));
    in_->flush();
    await_one("u" + std::to_string(i % 3), id);
  };
  ask(0);
  ask(1);
  const double trims_before = metric("tailor_memory_trims_total");
  ASSERT_GE(trims_before, 0) << "the counter is on /metrics";
  // Busy for longer than the idle time, one request after another.
  const auto busy_until = std::chrono::steady_clock::now() + 6s;
  int sent = 2;
  while (std::chrono::steady_clock::now() < busy_until) ask(sent++);
  EXPECT_EQ(metric("tailor_memory_trims_total"), trims_before)
      << "trimmed while busy (" << sent << " requests)";
  EXPECT_TRUE(
      wait_until([&] { return metric("tailor_memory_trims_total") > trims_before; }, 30s))
      << "no trim once idle";
  EXPECT_GE(metric("tailor_memory_trimmed_bytes_total"), 0);
}

// Whether a mapping of process `pid`'s heap is advised for transparent huge
// pages: VmFlags "hg" in /proc/PID/smaps (whether the kernel then backs it
// with 2 MiB pages is the machine's THP setting).
bool heap_advised_for_huge_pages(pid_t pid) {
  std::ifstream smaps("/proc/" + std::to_string(pid) + "/smaps");
  bool in_heap = false;
  for (std::string line; std::getline(smaps, line);) {
    if (line.find("[heap]") != std::string::npos) in_heap = true;
    if (in_heap && line.rfind("VmFlags:", 0) == 0) {
      if ((line + " ").find(" hg ") != std::string::npos) return true;
      in_heap = false;
    }
  }
  return false;
}

TEST_F(EngineTest, TheHeapIsOnHugePagesUnlessTheOperatorSaysNot) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  EXPECT_TRUE(heap_advised_for_huge_pages(engine_->pid()))
      << "tailord restarts itself with glibc.malloc.hugetlb=1";
  EXPECT_EQ(engine_->get("/healthz").first, 200) << "the process started is the one serving";
  ::setenv("TAILOR_MALLOC_HUGE_PAGES", "0", 1);
  engine_process plain("PlainHeap");
  plain.start();
  ::unsetenv("TAILOR_MALLOC_HUGE_PAGES");
  ASSERT_FALSE(HasFatalFailure());
  EXPECT_FALSE(heap_advised_for_huge_pages(plain.pid())) << "TAILOR_MALLOC_HUGE_PAGES=0";
  EXPECT_EQ(plain.stop(), 0);
}

TEST_F(EngineTest, TwoHundredMixedEventsEachGetExactlyOneAnswerOfTheRightKind) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  const auto& t = engine_->topics();
  std::map<std::string, std::string> expect;  // request id -> expected answer type/code
  int unreadable = 0;
  for (int i = 0; i < 200; ++i) {
    auto user = "user" + std::to_string(i % 17);
    auto req = "req" + std::to_string(i);
    switch (i % 5) {
      case 0:
        // Users who onboard get a model; the inference users below have none.
        user = "new" + user;
        send_onboarding(onboarding(user, req));
        expect[user + "/" + req] = "job.queued";
        break;
      case 1:
        send_inference(inference(user, req));
        expect[user + "/" + req] = "no_ready_model";
        break;
      case 2:
        in_->send(t.inference, user, "{\"broken\":" + std::to_string(i));
        ++unreadable;
        break;
      case 3: {
        auto j = onboarding(user, req);
        j["hyperparameters"] = {{"steps", -5}};
        send_onboarding(j);
        expect[user + "/" + req] = "out_of_bounds";
        break;
      }
      case 4: {
        auto j = inference(user, req);
        j["temperature"] = 99;
        send_inference(j);
        expect[user + "/" + req] = "invalid_argument";
        break;
      }
    }
  }
  in_->flush();
  // A granted onboarding request goes on to train; its answer is job.queued.
  auto is_answer = [](const json& j) {
    auto type = j.value("type", "");
    return type == "job.queued" || type == "job.failed" || type == "inference.result";
  };
  auto answered = [&] {
    std::size_t n = 0;
    for (const auto& r : out_->snapshot())
      if (r.topic != t.dlq && is_answer(r.value)) ++n;
    return n;
  };
  ASSERT_TRUE(wait_until(
      [&] {
        return answered() >= expect.size() && out_->matching(t.dlq, [](const json&) {
                                                    return true;
                                                  }).size() >= static_cast<std::size_t>(unreadable);
      },
      60s))
      << answered() << " answers of " << expect.size();
  // The absence of a duplicate cannot be awaited as a condition: observe the
  // topics for one more second after the last expected answer, then count.
  const auto observed = out_->size();
  wait_until([&] { return out_->size() > observed; }, 1s);
  std::map<std::string, int> count;
  for (const auto& r : out_->snapshot()) {
    if (r.topic == t.dlq || !is_answer(r.value)) continue;
    auto key =
        r.value["user_id"].get<std::string>() + "/" + r.value["request_id"].get<std::string>();
    ++count[key];
    auto want = expect[key];
    if (want == "job.queued") {
      EXPECT_EQ(r.value["type"], "job.queued") << key;
    } else {
      EXPECT_EQ(r.value["error"]["code"], want) << key;
    }
  }
  EXPECT_EQ(count.size(), expect.size());
  for (const auto& [key, n] : count) EXPECT_EQ(n, 1) << key;
  EXPECT_EQ(out_->matching(t.dlq, [](const json&) { return true; }).size(),
            static_cast<std::size_t>(unreadable));
}

TEST_F(EngineTest, KilledMidStreamAndRestartedAnswersEveryEventOnce) {
  start({{"max_in_flight", 16}});
  ASSERT_FALSE(HasFatalFailure());
  const int total = 500;
  std::set<std::string> onboardings;
  for (int i = 0; i < total; ++i) {
    auto user = "k" + std::to_string(i % 23);
    auto req = "e" + std::to_string(i);
    if (i % 2 == 0) {
      send_onboarding(onboarding(user, req));
      onboardings.insert(user + "/" + req);
    } else {
      send_inference(inference(user, req));
    }
  }
  in_->flush();
  ASSERT_TRUE(wait_until([&] { return out_->size() >= 100; }, 60s));
  engine_->kill();
  auto seen_before_kill = out_->size();
  ASSERT_LT(seen_before_kill, static_cast<std::size_t>(total))
      << "the kill came too late to test anything";
  engine_->start();
  ASSERT_FALSE(HasFatalFailure());
  auto distinct = [&] {
    std::set<std::string> keys;
    for (const auto& r : out_->snapshot())
      keys.insert(r.value["user_id"].get<std::string>() + "/" +
                  r.value["request_id"].get<std::string>());
    return keys.size();
  };
  ASSERT_TRUE(wait_until([&] { return distinct() >= static_cast<std::size_t>(total); }, 120s))
      << distinct() << " of " << total << " answered";
  expect_answers_seen_twice_identical(out_->snapshot());
  auto jobs = json::parse(engine_->get("/v1/jobs?limit=10000").second);
  EXPECT_EQ(jobs.size(), onboardings.size()) << "one job per onboarding request, none twice";
  std::set<std::string> job_ids;
  for (const auto& j : jobs) job_ids.insert(j["job_id"].get<std::string>());
  EXPECT_EQ(job_ids.size(), onboardings.size());
}

// Exactly-once output (kafka.exactly_once): answers and the offsets they
// answer commit in one transaction. A first run answers 100 events and
// stops. A second is killed (TAILOR_FAULT_COMMIT=1) just before its first
// commit of offsets, with answers produced: a consumer that ignores
// transactions has seen them, one reading committed records has not. The
// third run aborts that transaction and answers those events again, once;
// the events the first run committed are not read again.
TEST_F(EngineTest, ExactlyOnceOutputAnswersEachEventOnceAcrossACrash) {
  start({{"kafka", {{"exactly_once", true}}}});
  ASSERT_FALSE(HasFatalFailure());
  const auto& t = engine_->topics();
  collector raw(engine_->bootstrap(), {t.results, t.dlq}, true);
  int sent = 0;
  // Users with no model: an error result each; every fifth event unreadable.
  auto send = [&](int n) {
    for (int i = 0; i < n; ++i, ++sent) {
      if (sent % 5 == 4)
        in_->send(t.inference, "x", "{\"broken\":" + std::to_string(sent));
      else
        send_inference(inference("x" + std::to_string(sent % 13), "q" + std::to_string(sent)));
    }
    in_->flush();
  };
  // What `c` holds for each answered event: results by (user, request),
  // DLQ records by their source offset.
  auto counts = [&](const collector& c) {
    std::map<std::string, int> n;
    for (const auto& r : c.snapshot()) {
      if (!r.value.is_object()) continue;
      if (r.topic == t.dlq)
        ++n["dlq/" + std::to_string(r.value["source"]["partition"].get<int>()) + "/" +
            std::to_string(r.value["source"]["offset"].get<int64_t>())];
      else
        ++n[r.value.value("user_id", "") + "/" + r.value.value("request_id", "")];
    }
    return n;
  };
  send(100);
  ASSERT_TRUE(wait_until([&] { return counts(*out_).size() >= 100u; }, 60s))
      << counts(*out_).size() << " of the first 100 answered and committed";
  const auto first_run = counts(*out_);
  ASSERT_EQ(engine_->stop(), 0);
  ::setenv("TAILOR_FAULT_COMMIT", "1", 1);
  engine_->start();
  ::unsetenv("TAILOR_FAULT_COMMIT");
  ASSERT_FALSE(HasFatalFailure());
  send(200);
  ASSERT_NE(engine_->wait_exit(60s), -1) << "the fault did not end tailord:\n"
                                         << engine_->log_tail(40);
  engine_->start();
  ASSERT_FALSE(HasFatalFailure());
  ASSERT_TRUE(wait_until([&] { return counts(*out_).size() >= 300u; }, 60s))
      << counts(*out_).size() << " of 300 answered after the restart";
  // The absence of a duplicate cannot be awaited: observe one more second.
  const auto observed = out_->size();
  wait_until([&] { return out_->size() > observed; }, 1s);
  const auto committed = counts(*out_);
  EXPECT_EQ(committed.size(), 300u);
  for (const auto& [key, n] : committed) EXPECT_EQ(n, 1) << key << " answered " << n << " times";
  int aborted = 0;
  for (const auto& [key, n] : counts(raw)) {
    if (first_run.count(key))
      EXPECT_EQ(n, 1) << key << ", committed by the first run, was answered again";
    else
      aborted += n > 1;
  }
  EXPECT_GT(aborted, 0) << "no answer was in the aborted transaction";
  EXPECT_EQ(engine_->stop(), 0);
}

// The ingress failing (a fault injector: the process's fifth event read
// throws) is restarted: a fresh consumer rejoins the group and reads again
// what was not answered, so every request is answered, an answer seen
// twice the same, and the restart is counted.
// Exactly-once output when the broker refuses part of a transaction: the
// transaction is aborted, its publishers are told, and the ingress whose
// answers it held is restarted and reads those events again. Each event is
// answered once, and tailord goes on. A real broker cannot be made to refuse
// on cue, so this runs on librdkafka's mock cluster with an injected error.
// The mock keeps no offsets committed in transactions, so its restarted
// ingress reads from the start: the warm-up request is answered again, and
// the committed offsets are checked on the real broker instead
// (ExactlyOnceOutputAnswersEachEventOnceAcrossACrash).
TEST_F(EngineTest, AnAbortedTransactionsEventsAreReadAgainAndAnsweredOnce) {
  // No heartbeat meets the injected error in a transaction of its own.
  const json config = {{"kafka", {{"exactly_once", true}}},
                       {"instance", {{"heartbeat_ms", 3600000}, {"takeover_after_ms", 0}}}};
  start_on_mock(config);
  ASSERT_FALSE(HasFatalFailure());
  send_inference(inference("u0", "warm"));
  in_->flush();
  await_one("u0", "warm");
  ASSERT_TRUE(wait_until(
      [&] { return metric("tailor_transactions_total{outcome=\"committed\"}") >= 1; }, 30s));
  // AddPartitionsToTxn (API key 24) refused for a topic: librdkafka makes
  // the transaction abortable, and its commit fails.
  constexpr int16_t add_partitions_to_txn = 24;
  mock_->fail_requests(add_partitions_to_txn, {RdKafka::ERR_TOPIC_AUTHORIZATION_FAILED});
  constexpr int n = 100;
  for (int i = 0; i < n; ++i)
    send_inference(inference("u" + std::to_string(i % 5), "q" + std::to_string(i)));
  in_->flush();
  const auto answers = [&] {
    std::map<std::string, int> count;
    for (const auto& r : out_->snapshot())
      if (r.topic == engine_->topics().results) ++count[r.value.value("request_id", "")];
    count.erase("warm");
    return count;
  };
  EXPECT_TRUE(wait_until([&] { return answers().size() == n; }, 90s))
      << answers().size() << " of " << n << " answered; log:\n"
      << engine_->log_tail(40);
  // The absence of a duplicate cannot be awaited: observe one more second.
  const auto observed = out_->size();
  wait_until([&] { return out_->size() > observed; }, 1s);
  for (const auto& [request, times] : answers()) EXPECT_EQ(times, 1) << request;
  EXPECT_GE(metric("tailor_transactions_total{outcome=\"aborted\"}"), 1);
  EXPECT_GE(metric("tailor_ingress_restarts_total"), 1) << "the refused ingress read again";
  const auto status = json::parse(engine_->get("/v1/status").second, nullptr, false);
  EXPECT_EQ(status.value("health", ""), "ok") << status.dump();
  EXPECT_EQ(engine_->stop(), 0) << engine_->log_tail(40);
}

// A producer learns a topic's partitions on its first message to it, and
// that message waits for librdkafka's next scan of unknown topics (each
// second): a start's first answers came 0.2-1 s later than the next.
// tailord's producers look their topics up as they start. Shown on the mock
// cluster by failing every later lookup of tailor.results: the first answer
// is still delivered, where without the early lookup it failed and was
// retried for good.
TEST_F(EngineTest, TheFirstAnswersNeedNoLookupOfTheirTopic) {
  start_on_mock(json::object());
  ASSERT_FALSE(HasFatalFailure());
  const auto& t = engine_->topics();
  // The collector reads every output topic: an unreadable event's DLQ
  // record has come back.
  in_->send(t.inference, "k1", "{not json");
  in_->flush();
  await_match(t.dlq, [](const json& j) { return j.contains("error"); });
  mock_->fail_lookups(t.results, RdKafka::ERR_TOPIC_AUTHORIZATION_FAILED);
  send_inference(inference("u1", "first"));
  in_->flush();
  // Counted on its delivery report. Not read back: the collector, which
  // subscribes to tailor.results, rejoins its group over the failed lookup.
  const auto delivered = "tailor_events_out_total{topic=\"" + t.results + "\"}";
  EXPECT_TRUE(wait_until([&] { return metric(delivered) == 1; }, 30s)) << engine_->log_tail(20);
  mock_->fail_lookups(t.results, RdKafka::ERR_NO_ERROR);
  EXPECT_EQ(engine_->stop(), 0) << engine_->log_tail(20);
}

// A broker away for longer than the consumer's session (10 s) loses no
// request: tailord stays up, its answers wait in its producer, and its
// consumer, which lost its partitions, joins the group again once the broker
// is back. Meanwhile /readyz says that no broker is reachable, and
// tailor_kafka_brokers_up is 0. Run on the mock cluster, whose broker can be
// taken down on cue.
void EngineTest::broker_away_longer_than_the_session(const json& config) {
  start_on_mock(config);
  ASSERT_FALSE(HasFatalFailure());
  const auto answered = [&] {
    std::map<std::string, std::set<std::string>> payloads;  // by request id
    for (const auto& r : out_->snapshot())
      if (r.topic == engine_->topics().results)
        payloads[r.value.value("request_id", "")].insert(r.payload);
    return payloads;
  };
  const auto revoked = [&] {
    return occurrences(engine_->log_tail(100000), "partitions revoked");
  };
  const auto send = [&](int from, int to) {
    for (int i = from; i < to; ++i)
      send_inference(inference("u" + std::to_string(i % 7), "q" + std::to_string(i)));
    in_->flush();
  };
  const auto brokers_up = [&](const std::string& client) {
    return metric("tailor_kafka_brokers_up{client=\"" + client + "\"}");
  };
  send(0, 50);
  ASSERT_TRUE(wait_until([&] { return answered().size() == 50u; }, 30s));
  // The consumers' statistics come each second: each reaches the broker.
  EXPECT_TRUE(wait_until(
      [&] { return brokers_up("tailord-ingress") == 1 && brokers_up("tailord-state") == 1; },
      10s))
      << brokers_up("tailord-ingress") << " " << brokers_up("tailord-state");
  EXPECT_EQ(engine_->get("/readyz"), std::make_pair(200, std::string("ready\n")));
  const auto revoked_before = revoked();
  send(50, 250);
  mock_->set_down(true);
  // Away from Kafka, the instance says so: it can take no work.
  std::pair<int, std::string> away;
  // Both consumers' statistics come each second, not at once: wait for the
  // ingress's to be in the answer.
  EXPECT_TRUE(wait_until(
      [&] {
        away = engine_->get("/readyz");
        return away.second.find("no Kafka broker reachable (tailord-ingress") != std::string::npos;
      },
      15s))
      << away.first << " " << away.second;
  EXPECT_EQ(away.first, 503);
  EXPECT_EQ(brokers_up("tailord-ingress"), 0);
  // Down until tailord's consumer has given its partitions up (its session
  // ran out): the outage is longer than the session, whatever this host's pace.
  EXPECT_TRUE(wait_until([&] { return revoked() > revoked_before; }, 60s))
      << engine_->log_tail(30);
  EXPECT_EQ(engine_->get("/readyz").first, 503) << "still away";
  mock_->set_down(false);
  EXPECT_TRUE(wait_until([&] { return answered().size() == 250u; }, 120s))
      << answered().size() << " of 250 answered; log:\n"
      << engine_->log_tail(40);
  EXPECT_TRUE(wait_until([&] { return engine_->get("/readyz").first == 200; }, 15s))
      << engine_->get("/readyz").second;
  for (const auto& [request, payloads] : answered())
    EXPECT_EQ(payloads.size(), 1u) << request << ": repeats are byte-identical";
  // The outage is in tailord's log, in its format: librdkafka's lines too.
  const auto log = engine_->log_tail(100000);
  EXPECT_NE(log.find("] [error] kafka: tailord-"), std::string::npos) << log.substr(0, 4000);
  EXPECT_EQ(log.find("|FAIL|"), std::string::npos) << "a line in librdkafka's own format";
  const auto status = json::parse(engine_->get("/v1/status").second, nullptr, false);
  EXPECT_EQ(status.value("health", ""), "ok") << status.dump();
  send(250, 260);
  EXPECT_TRUE(wait_until([&] { return answered().size() == 260u; }, 30s))
      << "serving again after the outage";
  EXPECT_EQ(engine_->stop(), 0) << engine_->log_tail(40);
}

TEST_F(EngineTest, ABrokerAwayLongerThanTheSessionLosesNoRequest) {
  broker_away_longer_than_the_session(json::object());
}

TEST_F(EngineTest, ABrokerAwayLongerThanTheSessionLosesNoRequestUnderExactlyOnceOutput) {
  broker_away_longer_than_the_session({{"kafka", {{"exactly_once", true}}}});
}

TEST_F(EngineTest, AnIngressThatFailsIsRestartedAndEveryEventIsAnswered) {
  start_with_fault("TAILOR_FAULT_TAKE", "5");
  ASSERT_FALSE(HasFatalFailure());
  const int total = 40;
  std::set<std::string> expected;
  for (int i = 0; i < total; ++i) {
    const auto user = "g" + std::to_string(i % 7), req = "q" + std::to_string(i);
    // Onboardings are answered through the egress, inference (users with no
    // model: an error result) by the ingress itself.
    if (i % 4 == 0)
      send_onboarding(onboarding(user, req));
    else
      send_inference(inference(user, req));
    expected.insert(user + "/" + req);
  }
  in_->flush();
  auto answered = [&] {
    std::set<std::string> keys;
    for (const auto& r : out_->snapshot())
      if (r.value.is_object() && r.value.contains("request_id"))
        keys.insert(r.value.value("user_id", "") + "/" + r.value.value("request_id", ""));
    return keys;
  };
  ASSERT_TRUE(wait_until([&] { return answered() == expected; }, 120s))
      << answered().size() << " of " << total << " answered";
  expect_answers_seen_twice_identical(out_->snapshot());
  EXPECT_EQ(metric("tailor_ingress_restarts_total"), 1);
}

// librdkafka's idempotent producer can fail for good (a fatal error: its
// sequence broken), and then fails every message. A fault injector raises
// one through librdkafka's own test hook on the process's Nth batch sent.
// The producer is replaced in place and what it held is sent again: the
// ingress's, which publishes results (here: users with no model), and the
// egress's, which publishes events (onboarding).
TEST_F(EngineTest, TheIngresssProducerWithAFatalErrorIsReplacedAndEveryEventIsAnswered) {
  start_with_fault("TAILOR_FAULT_FATAL", "3");
  ASSERT_FALSE(HasFatalFailure());
  ask_users_without_a_model("h", 5, 20);
  expect_replaced_once_and_healthy(*engine_, *out_, "tailord-ingress");
}

TEST_F(EngineTest, TheEgresssProducerWithAFatalErrorIsReplacedAndEveryJobIsAnnounced) {
  start_with_fault("TAILOR_FAULT_FATAL", "2");
  ASSERT_FALSE(HasFatalFailure());
  const int users = 4;
  for (int i = 0; i < users; ++i)
    send_onboarding(onboarding("j" + std::to_string(i), "o" + std::to_string(i)));
  in_->flush();
  for (int i = 0; i < users; ++i)
    await_event("j" + std::to_string(i), "o" + std::to_string(i), "model.ready", 120s);
  expect_replaced_once_and_healthy(*engine_, *out_, "tailord-egress");
}

// The egress is one of the actors the supervisor cannot restart in place:
// every actor that publishes holds its handle. When it ends, tailord stops
// in order and exits with status 1 rather than hang with nothing to publish
// through; its next run reads again what the first did not finish, and
// every request gets its answers, an answer seen twice the same.
TEST_F(EngineTest, AnActorThatCannotBeRestartedEndsTailordAndItsNextRunLosesNothing) {
  // The egress's second publish throws: the first is one job's job.queued.
  start_with_fault("TAILOR_FAULT_PUBLISH", "2");
  ASSERT_FALSE(HasFatalFailure());
  const int users = 6;
  auto user = [](int i) { return "f" + std::to_string(i); };
  for (int i = 0; i < users; ++i) send_onboarding(onboarding(user(i), "o" + std::to_string(i)));
  in_->flush();
  const int status = engine_->wait_exit(60s);
  ASSERT_EQ(status, 1) << "tailord should have ended by itself; the end of its log:\n"
                       << engine_->log_tail(40);
  const auto log = engine_->log_tail(400);
  // The log says what ended and why.
  EXPECT_NE(log.find("stopped after a failure: the egress ended: fault injected by "
                     "TAILOR_FAULT_PUBLISH"),
            std::string::npos)
      << log;
  engine_->start();
  ASSERT_FALSE(HasFatalFailure());
  for (int i = 0; i < users; ++i)
    await_event(user(i), "o" + std::to_string(i), "model.ready", 120s);
  expect_answers_seen_twice_identical(out_->snapshot());
  auto jobs = json::parse(engine_->get("/v1/jobs?limit=10000").second);
  EXPECT_EQ(jobs.size(), static_cast<std::size_t>(users)) << "one job per request, none twice";
  EXPECT_EQ(engine_->get("/healthz"), std::make_pair(200, std::string("ok\n")));
}

namespace {

// A tmpfs of its own, to run full under a tailord's data directory.
// Mounting one needs root (or CAP_SYS_ADMIN).
class small_disk {
 public:
  explicit small_disk(int megabytes)
      : dir_((fs::temp_directory_path() / ("tailor-small-disk-" + std::to_string(::getpid()) +
                                           "-" + std::to_string(megabytes)))
                 .string()) {
    fs::create_directories(dir_);
    const auto size = "size=" + std::to_string(megabytes) + "m";
    if (::mount("tailor-test", dir_.c_str(), "tmpfs", 0, size.c_str()) != 0) error_ = errno;
  }
  ~small_disk() {
    if (error_ == 0) ::umount2(dir_.c_str(), MNT_DETACH);
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  int error() const { return error_; }
  const std::string& path() const { return dir_; }
  // Fills what is free with one file: true once a write found no room.
  bool fill() {
    const int fd = ::open((dir_ + "/filler").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return false;
    std::vector<char> block(1 << 20, 'x');
    while (::write(fd, block.data(), block.size()) > 0) {
    }
    const bool full = errno == ENOSPC;
    ::close(fd);
    return full;
  }
  void make_room() { fs::remove(dir_ + "/filler"); }

 private:
  std::string dir_;
  int error_ = 0;
};

}  // namespace

void EngineTest::fill_the_disk_while_a_job_trains(const std::string& data_dir, json extra,
                                                  const std::function<bool()>& fill) {
  extra.merge_patch(
      {{"data_dir", data_dir}, {"training", {{"slots", 1}, {"checkpoint_every", 5}}}});
  start(extra);
  ASSERT_FALSE(HasFatalFailure());
  send_onboarding(onboarding("early", "o1"));
  in_->flush();
  await_event("early", "o1", "model.ready");
  send_onboarding(onboarding_with("late", "o2", {{"steps", 4000}}));
  in_->flush();
  ASSERT_TRUE(wait_until([&] { return progressed_past("late", "o2", 1); }, 60s));
  ASSERT_TRUE(fill());
}

// A test on a small disk needs its mount: it fails (never skips) where
// this user may not mount one, as a kafka test does without its broker.
#define ASSERT_MOUNTED(disk)                                                     \
  ASSERT_EQ((disk).error(), 0) << "mounting a tmpfs (root or CAP_SYS_ADMIN, as " \
                               << "CI has): " << std::strerror((disk).error())

// The disk of the artifacts runs full while a job trains (the store's
// write-ahead log keeps the room RocksDB set aside for it). LibTorch's
// checkpoint writer ended the process there; then each full-disk run used
// one of the job's three attempts, and the user's sign-up failed within a
// second. Now the job waits (job.retrying, storage_full) as long as the
// disk is full, using none, answers keep coming, and once there is room
// the job ends ready.
TEST_F(EngineTest, AJobWaitsOutAFullDiskWithoutUsingItsAttempts) {
  small_disk disk(160);
  ASSERT_MOUNTED(disk);
  // 8 MB of store memory: a write-ahead log of 4 MB, set aside at its start.
  fill_the_disk_while_a_job_trains(disk.path() + "/data",
                                   {{"store_memory_mb", 8}, {"training", {{"max_attempts", 3}}}},
                                   [&] { return disk.fill(); });
  ASSERT_FALSE(HasFatalFailure());
  // More waits than the job has attempts, at a backoff that doubles from 200 ms.
  auto waits = [&] {
    int n = 0;
    for (const auto& e : events_of("late", "o2", "job.retrying")) {
      EXPECT_EQ(e.value["error"]["code"], "storage_full") << e.payload;
      ++n;
    }
    return n;
  };
  ASSERT_TRUE(wait_until([&] { return waits() >= 4; }, 60s))
      << waits() << " waits; the end of tailord's log:\n"
      << engine_->log_tail(30);
  EXPECT_TRUE(events_of("late", "o2", "job.failed").empty());
  // Answers go on meanwhile: reading an adapter needs no room.
  send_inference(inference("early", "q1"));
  in_->flush();
  auto answer = await_one("early", "q1");
  EXPECT_FALSE(answer.value.contains("error")) << answer.payload;
  disk.make_room();
  await_event("late", "o2", "model.ready", 120s);
  EXPECT_EQ(events_of("late", "o2", "model.ready").size(), 1u);
  EXPECT_TRUE(events_of("late", "o2", "job.failed").empty());
  auto jobs = json::parse(engine_->get("/v1/jobs?limit=10").second);
  for (const auto& j : jobs) {
    if (j["user_id"] == "late") {
      EXPECT_EQ(j["attempts"], 0) << j.dump();
    }
  }
  EXPECT_EQ(engine_->stop(), 0) << engine_->log_tail(30);
}

// The store's disk runs full (no room set aside: the write-ahead log of
// the default store memory, 64 MB, does not fit on it): RocksDB's writes
// fail. RocksDB's own log file ended the process there (an assertion in
// Debian's build). Now tailord keeps running and says why it is not ready;
// requests wait in Kafka, and once there is room every one is answered,
// once, generated once, and the job that was training ends ready.
TEST_F(EngineTest, AFullStoreEndsNothingAndLosesNothing) {
  small_disk disk(48);
  ASSERT_MOUNTED(disk);
  fill_the_disk_while_a_job_trains(disk.path() + "/data", json::object(),
                                   [&] { return disk.fill(); });
  ASSERT_FALSE(HasFatalFailure());
  const int n = 12;  // under the user's 16 requests in flight: all wait for room
  for (int i = 0; i < n; ++i) send_inference(inference("early", "q" + std::to_string(i)));
  in_->flush();
  std::pair<int, std::string> ready;
  ASSERT_TRUE(wait_until(
      [&] {
        ready = engine_->get("/readyz");
        return ready.first == 503;
      },
      30s))
      << "the end of tailord's log:\n"
      << engine_->log_tail(30);
  EXPECT_NE(ready.second.find("not ready: the store cannot write: "), std::string::npos)
      << ready.second;
  EXPECT_NE(ready.second.find("No space left on device"), std::string::npos) << ready.second;
  EXPECT_EQ(metric("tailor_store_writable"), 0);
  const auto status = json::parse(engine_->get("/v1/status").second);
  EXPECT_EQ(status["ready"], false);
  EXPECT_TRUE(status["store"].contains("cannot_write")) << status.dump();
  // Retried, not given up: each event's retry fails again, a second apart.
  ASSERT_TRUE(wait_until([&] { return metric("tailor_store_write_failures_total") >= 3 * n; },
                         60s));
  EXPECT_EQ(engine_->get("/healthz"), std::make_pair(200, std::string("ok\n")));
  disk.make_room();
  for (int i = 0; i < n; ++i) {
    auto r = await_one("early", "q" + std::to_string(i));
    EXPECT_FALSE(r.value.contains("error")) << r.payload;
  }
  await_event("late", "o2", "model.ready", 120s);
  EXPECT_TRUE(wait_until([&] { return engine_->get("/readyz").first == 200; }, 10s));
  EXPECT_EQ(metric("tailor_store_writable"), 1);
  for (int i = 0; i < n; ++i)
    EXPECT_EQ(answers_to("early", "q" + std::to_string(i)).size(), 1u) << i;
  // Each generated once: a retry stores the answer it kept, not a new one.
  const auto m = engine_->get("/metrics").second;
  const std::string served = "\ntailor_user_requests_total{user=\"early\"} ";
  ASSERT_NE(m.find(served), std::string::npos);
  EXPECT_EQ(std::stod(m.substr(m.find(served) + served.size())), n);
  EXPECT_EQ(events_of("late", "o2", "model.ready").size(), 1u);
  EXPECT_TRUE(events_of("late", "o2", "job.failed").empty());
  EXPECT_FALSE(fs::exists(disk.path() + "/data/metadata/LOG")) << "RocksDB's log goes to ours";
  EXPECT_EQ(engine_->stop(), 0) << engine_->log_tail(30);
}

// A stop that does not end (a fault injector: the consumer's close never
// returns, as one whose group was deleted under it was seen not to) ends
// tailord with status 1 after stop_timeout_seconds, or at once at a second
// signal, the log naming the step it was stuck at. Nothing is lost: the
// requests sent while it hung are answered by the next run.
TEST_F(EngineTest, AStopThatHangsEndsTailordAfterTheStopTimeoutOrASecondSignal) {
  start_with_fault("TAILOR_FAULT_CLOSE", "1", {{"stop_timeout_seconds", 2}});
  ASSERT_FALSE(HasFatalFailure());
  ask_users_without_a_model("s", 2, 4);
  // Without the watchdog this would wait the harness's 60 s and fail.
  EXPECT_EQ(engine_->stop(), 1) << engine_->log_tail(40);
  auto log = engine_->log_tail(100);
  EXPECT_NE(log.find("the stop did not finish within 2 s (stop_timeout_seconds); exiting without "
                     "finishing the stop, which was at: the consumers committing and leaving "
                     "their group"),
            std::string::npos)
      << log;

  // No limit now: only a second signal ends it.
  engine_->reconfigure({{"stop_timeout_seconds", 0}});
  ::setenv("TAILOR_FAULT_CLOSE", "1", 1);
  engine_->start();
  ::unsetenv("TAILOR_FAULT_CLOSE");
  ASSERT_FALSE(HasFatalFailure());
  // The log goes on across runs: this run's hang is the second one in it.
  auto hangs = [&] {
    return occurrences(engine_->log_tail(1000000), "the consumer close hangs");
  };
  ASSERT_EQ(hangs(), 1u);
  ASSERT_EQ(::kill(engine_->pid(), SIGTERM), 0);
  ASSERT_TRUE(wait_until([&] { return hangs() == 2; }, 30s)) << engine_->log_tail(40);
  for (int i = 0; i < 3; ++i) send_inference(inference("t" + std::to_string(i), "late"));
  in_->flush();
  ASSERT_EQ(::kill(engine_->pid(), SIGINT), 0);
  EXPECT_EQ(engine_->wait_exit(30s), 1) << engine_->log_tail(40);
  log = engine_->log_tail(100);
  EXPECT_NE(log.find("SIGINT received again; exiting without finishing the stop"),
            std::string::npos)
      << log;

  // The next run starts on the same store and answers what came meanwhile;
  // an ordinary stop still ends with 0.
  engine_->start();
  ASSERT_FALSE(HasFatalFailure());
  for (int i = 0; i < 3; ++i) {
    auto r = await_one("t" + std::to_string(i), "late");
    EXPECT_EQ(r.value["error"]["code"], "no_ready_model") << r.payload;
  }
  EXPECT_EQ(engine_->stop(), 0) << engine_->log_tail(40);
}

// Two tailords in one group share the topics' partitions. While a second
// one joins and later leaves, partitions move between them (revoked, then
// assigned again, the inference partitions' queues forwarded anew), and
// every request is answered; an answer seen twice is the same answer.
// Two instances of a group with `extra` configuration: 900 requests of
// users without a model (each answered at once with an error, the same
// from either instance) while the second joins, takes half the partitions
// and leaves again. Every request is answered; the results, counted by
// (user, request), are returned.
std::map<std::string, int> EngineTest::answers_while_partitions_move(json extra) {
  extra["max_in_flight"] = 8;
  start(extra);
  if (HasFatalFailure()) return {};
  engine_process second("second", extra);
  second.join_group_of(*engine_);
  auto send = [&](int from, int to) {
    for (int i = from; i < to; ++i)
      send_inference(inference("m" + std::to_string(i % 31), "r" + std::to_string(i)));
    in_->flush();
  };
  auto results = [&] {
    std::map<std::string, int> n;
    for (const auto& r : out_->snapshot())
      if (r.topic == engine_->topics().results)
        ++n[r.value.value("user_id", "") + "/" + r.value.value("request_id", "")];
    return n;
  };
  send(0, 300);
  second.start();  // the first instance gives up half of the partitions
  if (HasFatalFailure()) return {};
  send(300, 600);
  EXPECT_TRUE(wait_until([&] { return results().size() >= 600u; }, 90s))
      << results().size() << " of 600";
  const auto m = second.get("/metrics").second;
  const auto key = "tailor_events_in_total{topic=\"" + engine_->topics().inference + "\"} ";
  const auto pos = m.find(key);
  EXPECT_NE(pos, std::string::npos) << m;
  if (pos != std::string::npos) {
    EXPECT_GT(std::stod(m.substr(pos + key.size())), 0) << "the second instance read nothing";
  }
  EXPECT_EQ(second.stop(), 0);  // the first takes every partition back
  send(600, 900);
  // Its backpressure still holds the partitions it got back.
  double most = 0;
  EXPECT_TRUE(wait_until(
      [&] {
        most = std::max(most, in_flight(*engine_, engine_->topics().inference));
        return results().size() >= 900u;
      },
      90s))
      << results().size() << " of 900";
  EXPECT_LE(most, 8) << "events read past max_in_flight";
  // The absence of a duplicate cannot be awaited: observe one more second.
  const auto observed = out_->size();
  wait_until([&] { return out_->size() > observed; }, 1s);
  return results();
}

TEST_F(EngineTest, PartitionsMovingBetweenTwoInstancesLoseNoRequest) {
  const auto answers = answers_while_partitions_move(json::object());
  ASSERT_FALSE(HasFatalFailure());
  EXPECT_EQ(answers.size(), 900u);
  expect_answers_seen_twice_identical(out_->snapshot());
}

// Under exactly-once output an instance that gives up its partitions
// commits first the answers it sent with their offsets; the answers it
// holds, and those its user actors still work on, go to the partitions'
// next owner to be made again. No request is answered twice.
TEST_F(EngineTest, PartitionsMovingUnderExactlyOnceOutputAnswerEachRequestOnce) {
  const auto answers =
      answers_while_partitions_move({{"kafka", {{"exactly_once", true}}}});
  ASSERT_FALSE(HasFatalFailure());
  EXPECT_EQ(answers.size(), 900u);
  for (const auto& [key, n] : answers) EXPECT_EQ(n, 1) << key << " answered " << n << " times";
}

TEST_F(EngineTest, IdleUserActorsArePassivatedAndComeBackOnTheNextEvent) {
  start({{"user_idle_seconds", 1}});
  ASSERT_FALSE(HasFatalFailure());
  send_onboarding(onboarding("sleepy", "p1"));
  in_->flush();
  await_one("sleepy", "p1");
  auto users = [&] {
    auto m = engine_->get("/metrics").second;
    auto pos = m.find("\ntailor_user_actors ");
    return pos == std::string::npos ? -1 : std::stoi(m.substr(pos + 20));
  };
  EXPECT_EQ(users(), 1);
  ASSERT_TRUE(wait_until([&] { return users() == 0; }, 15s))
      << "the idle user actor was not retired";
  // The user's next event spawns a fresh actor that still knows the user's history.
  send_onboarding(onboarding("sleepy", "p1"));
  send_onboarding(onboarding("sleepy", "p2"));
  in_->flush();
  ASSERT_TRUE(wait_until([&] { return events_of("sleepy", "p1", "job.queued").size() >= 2; }, 30s));
  EXPECT_EQ(events_of("sleepy", "p1", "job.queued")[1].payload,
            events_of("sleepy", "p1", "job.queued")[0].payload);
  EXPECT_EQ(await_one("sleepy", "p2").value["type"], "job.queued");
  EXPECT_EQ(users(), 1);
}

TEST(EngineStartup, BadConfigurationIsRefusedWithAClearMessage) {
  const temp_dir dir("badcfg");
  auto run = [&](const std::string& args) {
    auto log = (dir / "out.txt").string();
    std::string cmd = std::string(TAILORD_PATH) + " -d " + (dir / "data").string() + " -p 0 " +
                      args + " >" + log + " 2>&1";
    int status = std::system(cmd.c_str());
    std::ifstream in(log);
    std::stringstream ss;
    ss << in.rdbuf();
    return std::make_pair(WEXITSTATUS(status), ss.str());
  };
  std::ofstream(dir / "cfg.json") << R"({"kafka":{"bootstrap_servers":1}})";
  auto [code, out] = run("--config " + (dir / "cfg.json").string());
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("kafka.bootstrap_servers: has the wrong type"), std::string::npos) << out;
  std::ofstream(dir / "cfg2.json") << R"({"no_such_key":true})";
  std::tie(code, out) = run("--config " + (dir / "cfg2.json").string());
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("unknown key 'no_such_key'"), std::string::npos) << out;
  std::tie(code, out) = run("-X no.such.property=1");
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("no.such.property"), std::string::npos) << out;
  // Usage errors end with 2, as --help says.
  std::tie(code, out) = run("--admin-port 70000");
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("--admin-port"), std::string::npos) << out;
  std::tie(code, out) = run("--no-such-flag");
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("--no-such-flag"), std::string::npos) << out;
  // --check-config: the same checks, then 0 without starting anything.
  std::tie(code, out) = run("--config " + (dir / "cfg.json").string() + " --check-config");
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("kafka.bootstrap_servers: has the wrong type"), std::string::npos) << out;
  std::ofstream(dir / "good.json") << R"({"kafka":{"bootstrap_servers":"127.0.0.1:1"},)"
                                   << R"("training":{"slots":3},"history_retention_days":0})";
  std::tie(code, out) = run("--config " + (dir / "good.json").string() + " --check-config");
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("the configuration is good"), std::string::npos) << out;
  EXPECT_FALSE(std::filesystem::exists(dir / "data")) << "a check starts nothing";
  std::tie(code, out) = run("--config " + (dir / "good.json").string() +
                            " --admin-token-file " + (dir / "no-token").string() +
                            " --check-config");
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("admin.token_file: cannot read"), std::string::npos) << out;
  std::tie(code, out) = run("--version");
  EXPECT_EQ(code, 0) << out;
  EXPECT_EQ(out, std::string("tailord ") + TAILOR_VERSION + "\n");
  std::tie(code, out) = run("--stop-timeout-seconds -1");
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("--stop-timeout-seconds"), std::string::npos) << out;
  std::ofstream(dir / "cfg3.json") << R"({"stop_timeout_seconds":-5})";
  std::tie(code, out) = run("--config " + (dir / "cfg3.json").string());
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("stop_timeout_seconds: must be 0 (no limit) or more"), std::string::npos)
      << out;
}

// The ingress reads Kafka only when librdkafka says its queue turned
// non-empty (actors/kafka.hpp, queue_wakeup). Here a consumer reads only
// after a wake-up, as the ingress does: each record must arrive that way,
// including one produced after the queue was drained and re-armed.
TEST(QueueWakeup, EveryRecordArrivesThroughAWakeUp) {
  const auto bootstrap = broker_bootstrap();
  ASSERT_FALSE(bootstrap.empty());
  const auto topic = "wakeup-" + std::to_string(::getpid());
  std::string err;
  std::unique_ptr<RdKafka::Conf> conf(RdKafka::Conf::create(RdKafka::Conf::CONF_GLOBAL));
  const std::vector<std::pair<std::string, std::string>> props{{"bootstrap.servers", bootstrap},
                                                               {"group.id", topic},
                                                               {"auto.offset.reset", "earliest"},
                                                               {"enable.auto.commit", "false"}};
  for (const auto& [k, v] : props) ASSERT_EQ(conf->set(k, v, err), RdKafka::Conf::CONF_OK) << err;
  std::unique_ptr<RdKafka::KafkaConsumer> consumer(RdKafka::KafkaConsumer::create(conf.get(), err));
  ASSERT_TRUE(consumer) << err;
  std::mutex mu;
  std::condition_variable cv;
  int wakes = 0;
  auto wakeup = std::make_unique<tailor::actors::queue_wakeup>(
      consumer->c_ptr(), tailor::actors::queue_wakeup::queue::consumer, [&] {
        std::lock_guard lock(mu);
        ++wakes;
        cv.notify_all();
      });
  ASSERT_EQ(consumer->subscribe({topic}), RdKafka::ERR_NO_ERROR);

  int seen = 0;
  // Waits for a wake-up, re-arms, reads what is queued without waiting;
  // until `want` was read or 60 s pass.
  auto read_through_wakeups = [&](const std::string& want) {
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    for (;;) {
      {
        std::unique_lock lock(mu);
        if (!cv.wait_until(lock, deadline, [&] { return wakes > seen; })) return false;
        seen = wakes;
      }
      wakeup->rearm();
      for (;;) {
        std::unique_ptr<RdKafka::Message> m(consumer->consume(0));
        if (m->err() == RdKafka::ERR__TIMED_OUT) break;
        if (m->err() == RdKafka::ERR_NO_ERROR &&
            std::string(static_cast<const char*>(m->payload()), m->len()) == want)
          return true;
      }
    }
  };
  producer out(bootstrap);
  out.send(topic, "k", "first");
  out.flush();
  EXPECT_TRUE(read_through_wakeups("first"));
  out.send(topic, "k", "second");
  out.flush();
  EXPECT_TRUE(read_through_wakeups("second"));
  wakeup.reset();  // before the consumer it refers to
  consumer->close();
}

// The egress serves delivery reports when librdkafka says they arrived
// (queue_wakeup on the producer's main queue): each report must come to a
// producer that polls only after a wake-up.
TEST(QueueWakeup, DeliveryReportsArriveThroughAWakeUp) {
  const auto bootstrap = broker_bootstrap();
  ASSERT_FALSE(bootstrap.empty());
  const auto topic = "wakeup-dr-" + std::to_string(::getpid());
  struct reports : RdKafka::DeliveryReportCb {
    int ok = 0;
    void dr_cb(RdKafka::Message& m) override { ok += m.err() == RdKafka::ERR_NO_ERROR; }
  } delivered;
  std::string err;
  std::unique_ptr<RdKafka::Conf> conf(RdKafka::Conf::create(RdKafka::Conf::CONF_GLOBAL));
  ASSERT_EQ(conf->set("bootstrap.servers", bootstrap, err), RdKafka::Conf::CONF_OK) << err;
  ASSERT_EQ(conf->set("dr_cb", &delivered, err), RdKafka::Conf::CONF_OK) << err;
  std::unique_ptr<RdKafka::Producer> producer(RdKafka::Producer::create(conf.get(), err));
  ASSERT_TRUE(producer) << err;
  std::mutex mu;
  std::condition_variable cv;
  int wakes = 0, seen = 0;
  auto wakeup = std::make_unique<tailor::actors::queue_wakeup>(
      producer->c_ptr(), tailor::actors::queue_wakeup::queue::main, [&] {
        std::lock_guard lock(mu);
        ++wakes;
        cv.notify_all();
      });
  // Produces one record, then polls only after wake-ups until its report is in.
  auto delivered_through_wakeups = [&](int want) {
    std::string payload = "record " + std::to_string(want);
    if (producer->produce(topic, RdKafka::Topic::PARTITION_UA, RdKafka::Producer::RK_MSG_COPY,
                          payload.data(), payload.size(), nullptr, 0, 0,
                          nullptr) != RdKafka::ERR_NO_ERROR)
      return false;
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    while (delivered.ok < want) {
      {
        std::unique_lock lock(mu);
        if (!cv.wait_until(lock, deadline, [&] { return wakes > seen; })) return false;
        seen = wakes;
      }
      wakeup->rearm();
      producer->poll(0);
    }
    return true;
  };
  EXPECT_TRUE(delivered_through_wakeups(1));
  EXPECT_TRUE(delivered_through_wakeups(2));
  wakeup.reset();  // before the producer it refers to
  producer->flush(10000);
}

namespace {

// A batch_producer's configuration for a test: the fixture's broker (empty,
// and the test failed, without one) and topics of this process's own.
tailor::actors::kafka_config producer_test_config(const std::string& prefix) {
  tailor::actors::kafka_config cfg;
  cfg.bootstrap_servers = broker_bootstrap();
  const auto tag = std::to_string(::getpid());
  cfg.topics.results = prefix + "-results-" + tag;
  cfg.topics.events = prefix + "-events-" + tag;
  cfg.topics.dlq = prefix + "-dlq-" + tag;
  return cfg;
}

}  // namespace

// The ingress publishes its answers, and the egress everything else,
// through batch_producer: a batch is done once every message of it is in
// Kafka, or with an error naming the topic of a message that could not go
// out; either way exactly once, from poll() on the caller's thread.
TEST(BatchProducer, ABatchIsDoneOnceEveryMessageIsInKafkaOrWithItsError) {
  using tailor::messages::channel;
  const auto cfg = producer_test_config("bp");
  const auto& bootstrap = cfg.bootstrap_servers;
  ASSERT_FALSE(bootstrap.empty());
  const auto tag = std::to_string(::getpid());
  auto stats = std::make_shared<tailor::actors::metrics>();
  std::string err;
  auto out = tailor::actors::batch_producer::make(cfg, stats, "bp-test", err);
  ASSERT_TRUE(out) << err;
  std::vector<std::string> first, second;
  // Reports are served by polling, as the actors do after a wake-up; each
  // poll waits up to 100 ms for one.
  auto poll_until = [&](const std::vector<std::string>& done) {
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    while (done.empty() && std::chrono::steady_clock::now() < deadline)
      out->producer().poll(100);
    return !done.empty();
  };
  out->send({{channel::results, "u1", "result-" + tag},
             {channel::events, "u1", "event-" + tag},
             {channel::dlq, "k1", "dlq-" + tag}},
            [&](const std::string& error) { first.push_back("done:" + error); });
  ASSERT_TRUE(poll_until(first));
  EXPECT_EQ(first, std::vector<std::string>{"done:"});
  EXPECT_FALSE(out->waiting());
  collector seen(bootstrap, {cfg.topics.results, cfg.topics.events, cfg.topics.dlq});
  EXPECT_TRUE(wait_until([&] { return seen.size() == 3; }, 60s)) << seen.size() << " of 3";
  std::set<std::pair<std::string, std::string>> got;
  for (const auto& r : seen.snapshot()) got.insert({r.topic, r.payload});
  EXPECT_EQ(got, (std::set<std::pair<std::string, std::string>>{
                     {cfg.topics.results, "result-" + tag},
                     {cfg.topics.events, "event-" + tag},
                     {cfg.topics.dlq, "dlq-" + tag}}));
  const auto text = stats->render();
  EXPECT_NE(text.find("tailor_events_out_total{topic=\"" + cfg.topics.events + "\"} 1"),
            std::string::npos)
      << text;
  // librdkafka refuses a message above message.max.bytes (1 MB) at once:
  // the batch is done with that error, after its other message's report.
  out->send({{channel::results, "u1", "small-" + tag},
             {channel::results, "u1", std::string(2 << 20, 'x')}},
            [&](const std::string& error) { second.push_back("done:" + error); });
  ASSERT_TRUE(poll_until(second));
  ASSERT_EQ(second.size(), 1u);
  EXPECT_NE(second[0].find(cfg.topics.results + ": "), std::string::npos) << second[0];
  EXPECT_TRUE(out->flush(10000));
  EXPECT_EQ(second.size(), 1u) << "done more than once";
}

// The transactions of exactly-once output, as the egress runs them: what
// a committed transaction holds is read by read_committed consumers; what
// an aborted one held, and what a producer held when a successor of the
// same transactional id started (as a restarted tailord does), only by
// consumers that ignore transactions. The fenced producer can commit no
// more and is not replaced.
TEST(BatchProducer, OnlyWhatATransactionCommitsIsReadCommitted) {
  using tailor::messages::channel;
  const auto cfg = producer_test_config("bp-txn");
  const auto& bootstrap = cfg.bootstrap_servers;
  ASSERT_FALSE(bootstrap.empty());
  const auto txn_id = "bp-txn-" + std::to_string(::getpid());
  std::string err;
  auto first = tailor::actors::batch_producer::make(cfg, nullptr, "bp-txn", err, txn_id);
  ASSERT_TRUE(first) << err;
  ASSERT_TRUE(first->transactional());
  // Sends one message in a transaction of `p` and waits for its report.
  auto send_one = [&](tailor::actors::batch_producer& p, const std::string& payload) {
    std::vector<std::string> done;
    p.send({{channel::results, "u", payload}},
           [&](const std::string& error) { done.push_back(error); });
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    while (done.empty() && std::chrono::steady_clock::now() < deadline) p.producer().poll(100);
    return done == std::vector<std::string>{""};
  };
  ASSERT_TRUE(first->begin().ok());
  ASSERT_TRUE(send_one(*first, "kept"));
  const auto committed = first->commit(30000);
  ASSERT_TRUE(committed.ok()) << committed.error;
  ASSERT_TRUE(first->begin().ok());
  ASSERT_TRUE(send_one(*first, "dropped"));
  const auto aborted = first->abort(30000);
  ASSERT_TRUE(aborted.ok()) << aborted.error;
  ASSERT_TRUE(first->begin().ok());
  ASSERT_TRUE(send_one(*first, "fenced"));
  // A successor of the same transactional id aborts what `first` left open.
  auto second = tailor::actors::batch_producer::make(cfg, nullptr, "bp-txn", err, txn_id);
  ASSERT_TRUE(second) << err;
  ASSERT_TRUE(second->begin().ok());
  ASSERT_TRUE(send_one(*second, "after"));
  ASSERT_TRUE(second->commit(30000).ok());
  const auto late = first->commit(30000);
  EXPECT_FALSE(late.ok()) << "a fenced producer committed";
  EXPECT_FALSE(first->replace("fenced", err));
  EXPECT_NE(err.find("not replaced"), std::string::npos) << err;
  first.reset();
  auto payloads = [](const collector& c) {
    std::multiset<std::string> got;
    for (const auto& r : c.snapshot()) got.insert(r.payload);
    return got;
  };
  collector all(bootstrap, {cfg.topics.results}, true);
  collector read_committed(bootstrap, {cfg.topics.results});
  ASSERT_TRUE(wait_until([&] { return all.size() >= 4 && read_committed.size() >= 2; }, 60s))
      << all.size() << " and " << read_committed.size() << " read";
  EXPECT_EQ(payloads(read_committed), (std::multiset<std::string>{"after", "kept"}));
  EXPECT_EQ(payloads(all), (std::multiset<std::string>{"after", "dropped", "fenced", "kept"}));
}

namespace {

// The broker's topics whose names begin with `prefix` (all topics'
// metadata: asking for one topic by name could create it).
std::vector<std::string> topics_named(const std::string& bootstrap, const std::string& prefix) {
  std::string err;
  std::unique_ptr<RdKafka::Conf> conf(RdKafka::Conf::create(RdKafka::Conf::CONF_GLOBAL));
  conf->set("bootstrap.servers", bootstrap, err);
  std::unique_ptr<RdKafka::Producer> p(RdKafka::Producer::create(conf.get(), err));
  if (!p) throw std::runtime_error("producer: " + err);
  RdKafka::Metadata* md = nullptr;
  if (p->metadata(true, nullptr, &md, 5000) != RdKafka::ERR_NO_ERROR)
    throw std::runtime_error("no metadata from the broker");
  std::unique_ptr<RdKafka::Metadata> owned(md);
  std::vector<std::string> found;
  for (const auto* t : *owned->topics())
    if (t->topic().rfind(prefix, 0) == 0) found.push_back(t->topic());
  return found;
}

// Whether the broker lists `topic`.
bool topic_listed(const std::string& bootstrap, const std::string& topic) {
  const auto named = topics_named(bootstrap, topic);
  return std::find(named.begin(), named.end(), topic) != named.end();
}

// Commits `offset` of partition 0 of `topic` for `group`, as a consumer
// outside the group does (the group then exists, empty, with that offset).
void commit_offset(const std::string& bootstrap, const std::string& group,
                   const std::string& topic, int64_t offset) {
  std::string err;
  std::unique_ptr<RdKafka::Conf> conf(RdKafka::Conf::create(RdKafka::Conf::CONF_GLOBAL));
  conf->set("bootstrap.servers", bootstrap, err);
  conf->set("group.id", group, err);
  std::unique_ptr<RdKafka::KafkaConsumer> c(RdKafka::KafkaConsumer::create(conf.get(), err));
  if (!c) throw std::runtime_error("consumer: " + err);
  std::vector<RdKafka::TopicPartition*> parts = {RdKafka::TopicPartition::create(topic, 0, offset)};
  const auto rc = c->commitSync(parts);
  RdKafka::TopicPartition::destroy(parts);
  c->close();
  if (rc != RdKafka::ERR_NO_ERROR) throw std::runtime_error("commit: " + RdKafka::err2str(rc));
}

}  // namespace

// tailor-bench against a broker it did not start (--bootstrap) leaves nothing
// on it: each run's topics and consumer groups are deleted as it ends, and
// only those; deleting what is already gone is no error.
TEST(BenchCleanup, ARunsTopicsAndGroupsAreDeletedAndNothingElse) {
  const auto bootstrap = broker_bootstrap();
  ASSERT_FALSE(bootstrap.empty());
  const auto tag = std::to_string(::getpid());
  const std::string kept = "cleanup-kept-" + tag, gone = "cleanup-gone-" + tag,
                    group = "cleanup-group-" + tag;
  tailor::actors::kafka_config cfg;
  cfg.bootstrap_servers = bootstrap;
  cfg.topic_partitions = 1;
  ASSERT_EQ(tailor::actors::create_topics(cfg, {kept, gone}), "");
  ASSERT_TRUE(wait_until([&] { return topic_listed(bootstrap, gone); }, 30s));
  commit_offset(bootstrap, group, kept, 1);
  ASSERT_EQ(committed_total(bootstrap, group, kept, 1), 1);
  EXPECT_EQ(tailor::bench::delete_topics_and_groups(bootstrap, {gone}, {group}), "");
  EXPECT_TRUE(wait_until([&] { return !topic_listed(bootstrap, gone); }, 30s));
  EXPECT_TRUE(topic_listed(bootstrap, kept));
  EXPECT_EQ(committed_total(bootstrap, group, kept, 1), 0) << "the group's offsets are gone";
  EXPECT_EQ(tailor::bench::delete_topics_and_groups(bootstrap, {gone}, {group}), "");
}

// A run whose tailord fails during start-up leaves nothing behind either.
// Here its admin port is taken, which tailord finds after it has created
// the run's topics: they are deleted, tailor-bench's error carries
// tailord's reason, and the run's directory is gone.
TEST(BenchCleanup, ARunThatFailsToStartLeavesNoTopicsAndNoDirectory) {
  const auto bootstrap = broker_bootstrap();
  ASSERT_FALSE(bootstrap.empty());
  const int taken = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(taken, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  ASSERT_EQ(::bind(taken, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(::listen(taken, 1), 0);
  ASSERT_EQ(::getsockname(taken, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  tailor::bench::engine_run_options o;
  o.bootstrap = bootstrap;
  o.config = test_base_config();
  o.config["admin"] = {{"port", ntohs(addr.sin_port)}};
  std::string what = "started";
  try {
    tailor::bench::engine_run run(o);
  } catch (const std::exception& e) {
    what = e.what();
  }
  ::close(taken);
  EXPECT_NE(what.find("tailord exited during start-up"), std::string::npos) << what;
  EXPECT_NE(what.find("admin API: cannot listen"), std::string::npos) << what;
  // Runs of this process name their topics bench<pid>-..., their directory
  // tailor-bench-<pid>-...
  const auto pid = std::to_string(::getpid());
  std::vector<std::string> left;
  EXPECT_TRUE(wait_until(
      [&] {
        left = topics_named(bootstrap, "bench" + pid + "-");
        return left.empty();
      },
      30s))
      << left.size() << " topics left, the first " << left.front();
  for (const auto& e : std::filesystem::directory_iterator(std::filesystem::temp_directory_path()))
    EXPECT_NE(e.path().filename().string().rfind("tailor-bench-" + pid + "-", 0), 0u) << e.path();
}

// A base model no configuration names is refused at once, with the names
// there are, before the bench starts a broker (half a minute) for nothing.
TEST(BenchArguments, AnUnknownBaseModelIsRefusedBeforeABrokerStarts) {
  const std::string cmd = std::string(TAILOR_BENCH_PATH) +
                          " serving --base-model no-such-base --adapters 1 --requests 1 2>&1";
  FILE* out = ::popen(cmd.c_str(), "r");
  ASSERT_NE(out, nullptr);
  std::string text;
  char buf[4096];
  for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, out)) > 0;) text.append(buf, n);
  const int status = ::pclose(out);
  ASSERT_TRUE(WIFEXITED(status)) << text;
  EXPECT_EQ(WEXITSTATUS(status), 1) << text;
  EXPECT_NE(text.find("unknown model configuration 'no-such-base'"), std::string::npos) << text;
  EXPECT_NE(text.find("tailor-base"), std::string::npos) << text;
  EXPECT_EQ(text.find("starting a Kafka broker"), std::string::npos) << text;
}

namespace {

// The children of process `parent` (from /proc: each process's parent id).
std::vector<pid_t> children_of(pid_t parent) {
  std::vector<pid_t> out;
  for (const auto& e : std::filesystem::directory_iterator("/proc")) {
    const auto name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream stat(e.path() / "stat");
    std::string line;
    if (!std::getline(stat, line)) continue;  // ended meanwhile
    // pid (comm) state ppid ...: comm may hold spaces, so read after its ')'.
    std::istringstream rest(line.substr(line.rfind(')') + 1));
    std::string state;
    pid_t ppid = 0;
    if (rest >> state >> ppid && ppid == parent) out.push_back(std::stoi(name));
  }
  return out;
}

}  // namespace

// A bench interrupted by Ctrl-C cleans up as one that ends: its tailord
// stops, its topics and directory are gone, and it exits with 128 + SIGINT.
TEST(BenchCleanup, AnInterruptedRunStopsItsTailordAndLeavesNothing) {
  const auto bootstrap = broker_bootstrap();
  ASSERT_FALSE(bootstrap.empty());
  const temp_dir dir("interrupt");
  const auto config = (dir / "tailord.json").string(), log = (dir / "bench.log").string();
  std::ofstream(config) << test_base_config().dump();
  const pid_t bench = ::fork();
  ASSERT_GE(bench, 0);
  if (bench == 0) {
    if (!std::freopen(log.c_str(), "w", stdout)) ::_exit(126);
    ::dup2(::fileno(stdout), 2);
    // More sign-ups than it gets through before the interrupt.
    ::execl(TAILOR_BENCH_PATH, TAILOR_BENCH_PATH, "onboarding-spike", "--jobs", "5000", "--steps",
            "50", "--bootstrap", bootstrap.c_str(), "--tailord-config", config.c_str(), nullptr);
    ::_exit(127);
  }
  const auto prefix = "bench" + std::to_string(bench) + "-";
  auto bench_log = [&] {
    std::ifstream in(log);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  };
  // Interrupted while it runs: its tailord is up and its topics exist.
  pid_t tailord = -1;
  const bool running = wait_until(
      [&] {
        const auto kids = children_of(bench);
        if (kids.empty() || topics_named(bootstrap, prefix).empty()) return false;
        tailord = kids.front();
        return bench_log().find("published 5000") != std::string::npos;
      },
      120s);
  if (!running) ::kill(bench, SIGKILL);  // its tailord gets SIGTERM (PR_SET_PDEATHSIG)
  ASSERT_TRUE(running) << bench_log();
  ASSERT_EQ(::kill(bench, SIGINT), 0);
  int status = 0;
  const bool ended = wait_until([&] { return ::waitpid(bench, &status, WNOHANG) == bench; }, 90s);
  if (!ended) {
    ::kill(bench, SIGKILL);
    ::waitpid(bench, &status, 0);
  }
  ASSERT_TRUE(ended) << "the bench did not end within 90 s of SIGINT:\n" << bench_log();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 128 + SIGINT) << status;
  EXPECT_NE(bench_log().find("interrupted by SIGINT"), std::string::npos) << bench_log();
  EXPECT_TRUE(::kill(tailord, 0) != 0 && errno == ESRCH) << "its tailord " << tailord << " runs";
  std::vector<std::string> left;
  EXPECT_TRUE(wait_until(
      [&] {
        left = topics_named(bootstrap, prefix);
        return left.empty();
      },
      30s))
      << left.size() << " topics left";
  for (const auto& e : std::filesystem::directory_iterator(std::filesystem::temp_directory_path()))
    EXPECT_NE(e.path().filename().string().rfind("tailor-bench-" + std::to_string(bench) + "-", 0),
              0u)
        << e.path();
}
