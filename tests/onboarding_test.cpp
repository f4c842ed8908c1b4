// Workflow A against a real Kafka broker (CTest label `kafka`): an onboarding
// request becomes a personal model, however many arrive at once, through
// crashes, cancellations and bad input.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "engine_harness.hpp"
#include "messages/events.hpp"
#include "messages/ids.hpp"
#include "messages/jobs.hpp"
#include "storage/artifacts.hpp"

using namespace tailor::test;
namespace fs = std::filesystem;

using OnboardingTest = engine_test;

namespace {

std::vector<std::string> types_of(const std::vector<collector::record>& rs) {
  std::vector<std::string> out;
  for (const auto& r : rs) out.push_back(r.value.value("type", ""));
  return out;
}

// A job's record on tailor.state as instance `owner` publishes it (with the
// request it runs, when given).
json job_state(const std::string& owner, const std::string& status, const std::string& job_id,
               const std::string& user, const std::string& request_id, uint64_t payload_hash,
               const json& request = nullptr) {
  char hash[17];
  std::snprintf(hash, sizeof(hash), "%016llx", static_cast<unsigned long long>(payload_hash));
  json j = {{"type", "job.state"}, {"schema_version", 1},        {"owner", owner},
            {"status", status},    {"job_id", job_id},           {"request_id", request_id},
            {"user_id", user},     {"base_model", "tailor-test"}, {"payload_hash", hash},
            {"created_ms", 1}};
  if (!request.is_null()) j["request"] = request;
  return j;
}

// The hash tailord keeps of a request, to tell a repeat from a reused id.
uint64_t hash_of(const json& request) {
  return tailor::messages::fnv1a64(request.dump());
}

// Records of job `job_id` on the state topic with `status`.
std::vector<collector::record> job_states(const collector& state, const std::string& topic,
                                          const std::string& job_id, const std::string& status) {
  return state.matching(topic, [&](const json& j) {
    return j.value("type", "") == "job.state" && j.value("job_id", "") == job_id &&
           j.value("status", "") == status;
  });
}

// Publishes on `state_topic` user "far"'s job "job" as open on another
// instance, tailord-far, with its request; returns that request.
json publish_far_job(producer& in, const std::string& state_topic) {
  const auto request = onboarding("far", "job");
  const auto job_id = tailor::messages::job_id_for("far", "job");
  in.send(state_topic, "job/" + job_id,
          job_state("tailord-far", "queued", job_id, "far", "job", hash_of(request), request)
              .dump());
  in.flush();
  return request;
}

}  // namespace

TEST_F(OnboardingTest, AJobRunsThroughEveryStateAndItsModelIsListed) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  send_onboarding(onboarding_with("ada", "signup", {{"steps", 30}, {"rank", 4}}));
  in_->flush();
  auto ready = await_event("ada", "signup", "model.ready");
  ASSERT_FALSE(HasFailure());
  auto types = types_of(answers_to("ada", "signup"));
  // Every transition, in order; progress at least at the first and last step.
  std::vector<std::string> lifecycle;
  for (const auto& t : types)
    if (t != "job.progress") lifecycle.push_back(t);
  EXPECT_EQ(lifecycle, (std::vector<std::string>{"job.queued", "job.admitted", "job.training",
                                                 "job.saving", "model.ready"}))
      << json(types).dump();
  auto progress = events_of("ada", "signup", "job.progress");
  ASSERT_GE(progress.size(), 2u);
  EXPECT_EQ(progress.front().value["progress"]["step"], 1);
  EXPECT_EQ(progress.back().value["progress"]["step"], 30);
  EXPECT_EQ(progress.back().value["progress"]["steps"], 30);
  EXPECT_GT(progress.back().value["progress"]["loss"].get<double>(), 0.0);
  // How training went: of its 3 texts one was held out, and the model is the
  // adapter of the step that did best on it, no worse than the base.
  const auto& training = ready.value["training"];
  EXPECT_EQ(training["steps"], 30) << training.dump();
  EXPECT_EQ(training["train_texts"], 2);
  EXPECT_EQ(training["validation_texts"], 1);
  EXPECT_GE(training["best_step"].get<int>(), 0);
  EXPECT_LE(training["best_step"].get<int>(), 30);
  EXPECT_EQ(training["loss"], progress.back().value["progress"]["loss"]);
  EXPECT_GT(training["base_validation_loss"].get<double>(), 0.0);
  EXPECT_LE(training["validation_loss"].get<double>(),
            training["base_validation_loss"].get<double>());
  // Steps given: trained at the configured learning rate, not scaled.
  EXPECT_EQ(training["learning_rate"], tailor::messages::hyperparameter_values{}.learning_rate)
      << training.dump();

  std::string model_id = ready.value["model_id"];
  std::string job_id = ready.value["job_id"];
  auto models = json::parse(engine_->get("/v1/users/ada/models").second);
  ASSERT_EQ(models.size(), 1u) << models.dump();
  EXPECT_EQ(models[0]["model_id"], model_id);
  EXPECT_EQ(models[0]["status"], "ready");
  EXPECT_EQ(models[0]["job_id"], job_id);
  EXPECT_EQ(models[0]["training"], training) << "the model record keeps how it was trained";
  // The artifact is on disk, and its bytes are the registered ones.
  std::string path = models[0]["artifact_path"];
  auto bytes = tailor::storage::read_file(path, models[0]["checksum"]);
  ASSERT_TRUE(bytes) << tailor::storage::to_string(
      static_cast<tailor::storage::errc>(bytes.error().code()));
  EXPECT_GT(bytes->size(), 1000u);
  auto job = json::parse(engine_->get("/v1/jobs/" + job_id).second);
  EXPECT_EQ(job["status"], "ready");
  EXPECT_EQ(job["model_id"], model_id);
}

// Texts that only teach the adapter what the held-out one is not: the model
// is the untrained adapter, model.ready says so, and /metrics counts it.
TEST_F(OnboardingTest, AUserWhoseTextsDoNotHelpGetsTheBaseAndIsToldSo) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  EXPECT_EQ(metric("tailor_models_as_base_total"), 0.0);
  auto j = onboarding("few", "signup",
                      {std::string(80, 'q'), "0123456789 9876543210 0246813579 1357924680"});
  j["hyperparameters"] = {{"steps", 6}, {"learning_rate", 0.5}, {"rank", 4}};
  send_onboarding(j);
  in_->flush();
  auto ready = await_event("few", "signup", "model.ready");
  ASSERT_FALSE(HasFailure());
  const auto& training = ready.value["training"];
  EXPECT_EQ(training["steps"], 6) << training.dump();
  EXPECT_EQ(training["validation_texts"], 1);
  EXPECT_EQ(training["best_step"], 0);
  EXPECT_EQ(training["validation_loss"], training["base_validation_loss"]);
  EXPECT_EQ(training["learning_rate"], 0.5);
  EXPECT_TRUE(wait_until([&] { return metric("tailor_models_as_base_total") == 1.0; }, 10s))
      << metric("tailor_models_as_base_total");
}

TEST_F(OnboardingTest, ASpikeLargerThanTheAdmissionQueuePausesConsumptionAndCompletesEveryJob) {
  const int jobs = 40, cap = 4;
  start({{"training", {{"slots", 2}, {"admission_queue", cap}, {"steps", 2}}}});
  ASSERT_FALSE(HasFatalFailure());
  for (int i = 0; i < jobs; ++i) send_onboarding(onboarding("spike" + std::to_string(i), "signup"));
  in_->flush();
  double max_queue = 0;
  auto ready = [&] {
    return out_
        ->matching(engine_->topics().events,
                   [](const json& j) { return j.value("type", "") == "model.ready"; })
        .size();
  };
  bool done = wait_until(
      [&] {
        max_queue = std::max(max_queue, metric("tailor_training_queue"));
        return ready() >= static_cast<std::size_t>(jobs);
      },
      180s);
  ASSERT_TRUE(done) << ready() << " of " << jobs << " models ready";
  EXPECT_LE(max_queue, cap) << "the admission queue never holds more than its capacity";
  auto metrics = engine_->get("/metrics").second;
  auto pauses = "tailor_ingress_pauses_total{topic=\"" + engine_->topics().onboarding + "\"} ";
  auto pos = metrics.find(pauses);
  ASSERT_NE(pos, std::string::npos) << "onboarding was never paused:\n" << metrics;
  EXPECT_GE(std::stoi(metrics.substr(pos + pauses.size())), 1);
  EXPECT_NE(metrics.find("tailor_ingress_paused{topic=\"" + engine_->topics().onboarding + "\"} 0"),
            std::string::npos)
      << "consumption resumed at the end";
  std::set<std::string> users;
  for (const auto& r : out_->matching(engine_->topics().events, [](const json& j) {
         return j.value("type", "") == "model.ready";
       }))
    users.insert(r.value["user_id"].get<std::string>());
  EXPECT_EQ(users.size(), static_cast<std::size_t>(jobs)) << "one model per user, none twice";
}

TEST_F(OnboardingTest, ARepeatedRequestYieldsOneJobAndOneModel) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  send_onboarding(onboarding("rep", "once"));
  send_onboarding(onboarding("rep", "once"));
  in_->flush();
  await_event("rep", "once", "model.ready");
  send_onboarding(onboarding("rep", "once"));  // again after the model exists
  in_->flush();
  ASSERT_TRUE(wait_until([&] { return events_of("rep", "once", "job.queued").size() >= 3; }, 30s));
  EXPECT_EQ(events_of("rep", "once", "job.admitted").size(), 1u);
  EXPECT_EQ(events_of("rep", "once", "model.ready").size(), 1u);
  EXPECT_EQ(json::parse(engine_->get("/v1/jobs").second).size(), 1u);
  EXPECT_EQ(json::parse(engine_->get("/v1/users/rep/models").second).size(), 1u);
}

TEST_F(OnboardingTest, BadDataBadHyperparametersAndPathEscapesFailWithTheirReasons) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  auto data = engine_->data_dir() + "/data/training-data";
  std::ofstream(data + "/good.txt") << "First entry of mine.\n%\nSecond entry, also mine.\n";
  std::ofstream(data + "/latin1.txt") << "caf\xe9 au lait\n";
  std::ofstream(engine_->data_dir() + "/secret.txt") << "not yours\n";
  fs::create_symlink(engine_->data_dir() + "/secret.txt", data + "/link.txt");
  auto with_ref = [](const std::string& req, const std::string& ref) {
    json j = onboarding("bad", req);
    j.erase("texts");
    j["data_ref"] = ref;
    return j;
  };
  send_onboarding(with_ref("good", "good.txt"));
  send_onboarding(with_ref("link", "link.txt"));
  send_onboarding(with_ref("dotdot", "../secret.txt"));
  send_onboarding(with_ref("missing", "nope.txt"));
  send_onboarding(with_ref("latin1", "latin1.txt"));
  send_onboarding(onboarding("bad", "empty", {"", ""}));
  send_onboarding(onboarding_with("bad", "rank", {{"rank", 0}}));
  send_onboarding(onboarding_with("bad", "lr", {{"learning_rate", 5.0}}));
  in_->flush();
  auto failed = [&](const std::string& req) {
    auto ev = await_event("bad", req, "job.failed");
    return std::make_pair(ev.value["error"].value("code", ""),
                          ev.value["error"].value("message", ""));
  };
  auto [c1, m1] = failed("link");
  EXPECT_EQ(c1, "path_escape");
  EXPECT_NE(m1.find("data_ref"), std::string::npos) << m1;
  EXPECT_EQ(failed("dotdot").first, "path_escape");
  EXPECT_EQ(failed("missing").first, "data_not_found");
  auto [c4, m4] = failed("latin1");
  EXPECT_EQ(c4, "invalid_data");
  EXPECT_NE(m4.find("UTF-8"), std::string::npos) << m4;
  EXPECT_EQ(failed("empty").first, "invalid_data");
  auto [c6, m6] = failed("rank");
  EXPECT_EQ(c6, "out_of_bounds");
  EXPECT_NE(m6.find("hyperparameters.rank"), std::string::npos) << m6;
  EXPECT_EQ(failed("lr").first, "out_of_bounds");
  await_event("bad", "good", "model.ready");
  EXPECT_TRUE(out_->matching(engine_->topics().dlq, [](const json&) { return true; }).empty())
      << "ungrantable requests are answered to the requester, not the DLQ";
  EXPECT_EQ(json::parse(engine_->get("/v1/users/bad/models").second).size(), 1u);
}

// Exactly-once output: job.queued goes out in its own transaction, before
// the request's offset commits in a later one. A kill between the two
// (TAILOR_FAULT_COMMIT=1: before the first commit of offsets) makes the
// next run read the request again; it finds job.queued recorded as
// published for that very event and publishes nothing, and the job,
// recovered from the store, ends with one model. A client's repeat of the
// request (a new event) still gets the stored job.queued.
TEST_F(OnboardingTest, UnderExactlyOnceOutputARequestReadAgainAfterACrashIsAnnouncedOnce) {
  start_with_fault("TAILOR_FAULT_COMMIT", "1", {{"kafka", {{"exactly_once", true}}}});
  ASSERT_FALSE(HasFatalFailure());
  send_onboarding(onboarding_with("eon", "join", {{"steps", 30}}));
  in_->flush();
  ASSERT_NE(engine_->wait_exit(60s), -1) << "the fault did not end tailord:\n"
                                         << engine_->log_tail(40);
  EXPECT_TRUE(wait_until([&] { return events_of("eon", "join", "job.queued").size() == 1; }, 30s))
      << "not announced before the kill";
  engine_->start();
  ASSERT_FALSE(HasFatalFailure());
  await_event("eon", "join", "model.ready", 120s);
  ASSERT_FALSE(HasFailure());
  // Read again and answered: its offset is committed, with whatever it
  // published (the job may have ended before the request is read again).
  ASSERT_TRUE(wait_until(
      [&] {
        return committed_total(engine_->bootstrap(), engine_->group(),
                               engine_->topics().onboarding, 4) >= 1;
      },
      60s));
  const auto observed = out_->size();
  wait_until([&] { return out_->size() > observed; }, 2s);
  EXPECT_EQ(events_of("eon", "join", "job.queued").size(), 1u);
  EXPECT_EQ(events_of("eon", "join", "model.ready").size(), 1u);
  EXPECT_EQ(json::parse(engine_->get("/v1/users/eon/models").second).size(), 1u);
  send_onboarding(onboarding_with("eon", "join", {{"steps", 30}}));
  in_->flush();
  EXPECT_TRUE(wait_until([&] { return events_of("eon", "join", "job.queued").size() == 2; }, 30s));
  EXPECT_EQ(engine_->stop(), 0);
}

TEST_F(OnboardingTest, KilledDuringTrainingAndRestartedEndsWithExactlyOneModel) {
  json cfg = {{"training", {{"checkpoint_every", 20}, {"progress_interval_ms", 50}}}};
  start(cfg);
  ASSERT_FALSE(HasFatalFailure());
  send_onboarding(onboarding_with("crash", "job", {{"steps", 1500}, {"batch_size", 32}}));
  in_->flush();
  // Killed once training is under way (past its first checkpoint).
  ASSERT_TRUE(wait_until([&] { return progressed_past("crash", "job", 20); }, 120s));
  ASSERT_TRUE(events_of("crash", "job", "model.ready").empty()) << "killed too late";
  engine_->kill();
  auto before = events_of("crash", "job", "job.progress").size();
  engine_->start();
  ASSERT_FALSE(HasFatalFailure());
  auto ready = await_event("crash", "job", "model.ready", 300s);
  ASSERT_FALSE(HasFailure());
  auto models = json::parse(engine_->get("/v1/users/crash/models").second);
  ASSERT_EQ(models.size(), 1u) << models.dump();
  EXPECT_EQ(models[0]["model_id"], ready.value["model_id"]);
  EXPECT_EQ(events_of("crash", "job", "model.ready").size(), 1u);
  // The run after the restart resumed from a checkpoint, not from step 1.
  auto progress = events_of("crash", "job", "job.progress");
  ASSERT_GT(progress.size(), before);
  EXPECT_GT(progress[before].value["progress"]["step"].get<int>(), 20) << progress[before].payload;
  EXPECT_EQ(json::parse(engine_->get("/v1/jobs").second).size(), 1u);
}

// Several instances (design section 6): a job whose instance is gone for
// good is taken over by a live one, resumes from the checkpoint the lost
// instance left in the shared artifact store and ends with one model; the
// lost instance, started again from its data, leaves the job to the other.
TEST_F(OnboardingTest, AJobOfAnInstanceGoneSilentIsTakenOverAndEndsWithOneModel) {
  const json cfg = {{"training", {{"checkpoint_every", 20}, {"progress_interval_ms", 50}}},
                    {"instance", {{"heartbeat_ms", 200}, {"takeover_after_ms", 2000}}}};
  start(cfg);
  ASSERT_FALSE(HasFatalFailure());
  const auto request = onboarding_with("gone", "job", {{"steps", 1500}, {"batch_size", 32}});
  send_onboarding(request);
  in_->flush();
  ASSERT_TRUE(wait_until([&] { return progressed_past("gone", "job", 20); }, 120s));
  ASSERT_TRUE(events_of("gone", "job", "model.ready").empty()) << "killed too late";
  engine_->kill();
  const auto before = events_of("gone", "job", "job.progress").size();
  auto second_cfg = cfg;
  second_cfg["artifact_dir"] = engine_->data_dir() + "/data/artifacts";
  engine_process second("second", second_cfg);
  second.join_group_of(*engine_);
  second.start();
  ASSERT_FALSE(HasFatalFailure());
  auto ready = await_event("gone", "job", "model.ready", 300s);
  ASSERT_FALSE(HasFailure());
  const auto job_id = ready.value["job_id"].get<std::string>();
  const auto model_id = ready.value["model_id"].get<std::string>();
  EXPECT_EQ(json::parse(second.get("/v1/jobs/" + job_id).second)["status"], "ready");
  auto models = json::parse(second.get("/v1/users/gone/models").second);
  ASSERT_EQ(models.size(), 1u) << models.dump();
  EXPECT_EQ(models[0]["model_id"], model_id);
  // From the first instance's checkpoint, not from step 1.
  auto progress = events_of("gone", "job", "job.progress");
  ASSERT_GT(progress.size(), before);
  EXPECT_GT(progress[before].value["progress"]["step"].get<int>(), 20) << progress[before].payload;
  const auto taker = second.get("/metrics").second;
  EXPECT_NE(taker.find("\ntailor_jobs_taken_over_total 1\n"), std::string::npos) << taker;
  EXPECT_NE(taker.find("\ntailor_group_orphaned_jobs 0\n"), std::string::npos) << taker;
  // The taker shows the first instance as gone, itself as live.
  const auto group = json::parse(second.get("/v1/group").second);
  std::map<bool, int> by_live;
  for (const auto& i : group["instances"]) ++by_live[i["live"].get<bool>()];
  EXPECT_EQ(by_live[false], 1) << group.dump();
  EXPECT_EQ(by_live[true], 1) << group.dump();
  EXPECT_TRUE(wait_until(
      [&] { return json::parse(second.get("/v1/group").second)["open_jobs_total"] == 0; }, 30s))
      << "the taker reads the job's end back";
  // The first instance, back: the job was moved, and its model is listed.
  engine_->start();
  ASSERT_FALSE(HasFatalFailure());
  auto job = json::parse(engine_->get("/v1/jobs/" + job_id).second);
  EXPECT_EQ(job["status"], "moved") << job.dump();
  EXPECT_EQ(metric("tailor_jobs_handed_over_total"), 1);
  EXPECT_TRUE(wait_until([&] { return metric("tailor_group_instances_live") == 2; }, 30s))
      << "the first instance hears the second, and counts itself";
  models = json::parse(engine_->get("/v1/users/gone/models").second);
  ASSERT_EQ(models.size(), 1u) << models.dump();
  EXPECT_EQ(models[0]["model_id"], model_id);
  // A repeat, read by either instance, is answered as the first was, not trained.
  send_onboarding(request);
  in_->flush();
  ASSERT_TRUE(wait_until([&] { return events_of("gone", "job", "job.queued").size() == 2; }, 60s));
  const auto queued = events_of("gone", "job", "job.queued");
  EXPECT_EQ(queued[0].payload, queued[1].payload);
  EXPECT_EQ(engine_->stop(), 0);
  EXPECT_EQ(second.stop(), 0);
  EXPECT_EQ(events_of("gone", "job", "model.ready").size(), 1u);
  EXPECT_EQ(events_of("gone", "job", "job.admitted").size(), 2u) << "admitted by each instance";
}

// A job that another instance ran to its end (it had taken the job over
// while this one stalled) stops here at its next step, becomes `moved`,
// and says nothing more on tailor.events: its end was announced there.
TEST_F(OnboardingTest, AJobThatAnotherInstanceEndedStopsHereWithoutAWord) {
  start({{"training", {{"slots", 1}}}});
  ASSERT_FALSE(HasFatalFailure());
  send_onboarding(onboarding_with("m", "long", {{"steps", 10000}}));
  in_->flush();
  const auto first = await_event("m", "long", "job.progress");
  ASSERT_FALSE(HasFailure());
  const auto job_id = first.value["job_id"].get<std::string>();
  const json ended = {{"type", "job.state"},     {"schema_version", 1},
                      {"owner", "tailord-else"}, {"status", "ready"},
                      {"job_id", job_id},        {"request_id", "long"},
                      {"user_id", "m"},          {"base_model", "tailor-test"},
                      {"payload_hash", "0000000000000001"}, {"created_ms", 1}};
  in_->send(engine_->topics().state, "job/" + job_id, ended.dump());
  in_->flush();
  ASSERT_TRUE(wait_until(
      [&] {
        return json::parse(engine_->get("/v1/jobs/" + job_id).second).value("status", "") ==
               "moved";
      },
      60s))
      << engine_->get("/v1/jobs/" + job_id).second;
  EXPECT_EQ(metric("tailor_jobs_handed_over_total"), 1);
  // Its one slot is free again.
  send_onboarding(onboarding("m", "next"));
  in_->flush();
  await_event("m", "next", "model.ready", 60s);
  for (const char* type : {"job.cancelled", "job.failed", "model.ready", "job.saving"})
    EXPECT_TRUE(events_of("m", "long", type).empty()) << type;
}

// The state topic shows a job of user "far" running on another instance
// (as when far's partition moved here from it). What is read here about the
// job is answered for that instance: a repeat of its request gets the
// job.queued it got there and is not trained here, and a cancel is passed
// on to that instance as the job's record marked `cancelling`.
TEST_F(OnboardingTest, EventsAboutAJobRunningOnAnotherInstanceAreAnsweredForIt) {
  start({{"instance", {{"takeover_after_ms", 0}}}});  // the other one is never taken over
  ASSERT_FALSE(HasFatalFailure());
  const auto& state_topic = engine_->topics().state;
  collector state(engine_->bootstrap(), {state_topic});
  const auto request = publish_far_job(*in_, state_topic);
  const auto job_id = tailor::messages::job_id_for("far", "job");
  ASSERT_TRUE(wait_until([&] { return metric("tailor_group_open_jobs") == 1; }, 30s));
  auto group = [&] { return json::parse(engine_->get("/v1/group").second); };
  const auto seen = group();
  EXPECT_EQ(seen["open_jobs_total"], 1) << seen.dump();
  ASSERT_EQ(seen["open_jobs"].size(), 1u) << seen.dump();
  EXPECT_EQ(seen["open_jobs"][0]["job_id"], job_id);
  EXPECT_EQ(seen["open_jobs"][0]["owner"], "tailord-far");
  EXPECT_EQ(seen["open_jobs"][0]["status"], "queued");
  // A limit that is not a positive integer (in range) is refused, by name.
  for (const auto* path : {"/v1/group?limit=0", "/v1/group?limit=12x", "/v1/jobs?limit=-1",
                           "/v1/users/far/history?limit=1001"}) {
    const auto [status, body] = engine_->get(path);
    EXPECT_EQ(status, 400) << path;
    EXPECT_NE(body.find("limit: must be"), std::string::npos) << path << ": " << body;
  }
  send_onboarding(request);
  in_->flush();
  const auto queued = await_event("far", "job", "job.queued");
  ASSERT_FALSE(HasFailure());
  EXPECT_EQ(queued.value["job_id"], job_id);
  const auto [status, body] = engine_->get("/v1/jobs/" + job_id);
  EXPECT_EQ(status, 404) << "not a job of this instance";
  EXPECT_NE(body.find("runs on tailord-far"), std::string::npos) << body;
  // The same id for another request is refused, as it would be there.
  send_onboarding(onboarding("far", "job", {"something else"}));
  in_->flush();
  EXPECT_EQ(await_event("far", "job", "job.failed").value["error"]["code"],
            "duplicate_request_id");
  send_control(job_cancel("far", job_id));
  in_->flush();
  auto passed_on = [&] { return job_states(state, state_topic, job_id, "cancelling"); };
  ASSERT_TRUE(wait_until([&] { return !passed_on().empty(); }, 30s)) << "the cancel is passed on";
  const auto passed = passed_on().front();
  EXPECT_EQ(passed.key, "job/" + job_id);
  EXPECT_EQ(passed.value["owner"], "tailord-far") << "to the instance that runs it";
  EXPECT_EQ(passed.value["user_id"], "far");
  EXPECT_FALSE(passed.value.contains("request"));
  EXPECT_TRUE(wait_until([&] { return group()["open_jobs"][0]["status"] == "cancelling"; }, 30s))
      << group().dump();
  const auto metrics = engine_->get("/metrics").second;
  EXPECT_NE(metrics.find("\ntailor_job_cancels_passed_on_total{way=\"sent\"} 1\n"),
            std::string::npos)
      << metrics;
  // Another user's cancel of it is refused, and not passed on.
  send_control(job_cancel("near", job_id));
  in_->flush();
  const auto refused = await_match(engine_->topics().events, [&](const json& j) {
    return j.value("user_id", "") == "near" && j.value("type", "") == "job.cancel_rejected";
  });
  ASSERT_FALSE(HasFailure());
  EXPECT_EQ(refused.value["error"]["code"], "job_not_found");
  EXPECT_EQ(passed_on().size(), 1u);
}

// Another instance read a cancel of a job that runs here and passed it on:
// the job stops here, and the answer comes from here. A cancel passed on
// after the job ended is refused with the reason, and the topic told again
// that the job ended.
TEST_F(OnboardingTest, ACancelPassedOnByAnotherInstanceStopsTheJobHere) {
  start({{"training", {{"slots", 1}}}, {"instance", {{"id", "tailord-here"}}}});
  ASSERT_FALSE(HasFatalFailure());
  const auto& state_topic = engine_->topics().state;
  collector state(engine_->bootstrap(), {state_topic});
  send_onboarding(onboarding_with("c", "long", {{"steps", 10000}}));
  in_->flush();
  const auto first = await_event("c", "long", "job.progress");
  ASSERT_FALSE(HasFailure());
  const auto job_id = first.value["job_id"].get<std::string>();
  in_->send(state_topic, "job/" + job_id,
            job_state("tailord-here", "cancelling", job_id, "c", "long", 1).dump());
  in_->flush();
  await_event("c", "long", "job.cancelled", 30s);
  ASSERT_FALSE(HasFailure());
  EXPECT_EQ(json::parse(engine_->get("/v1/jobs/" + job_id).second)["status"], "cancelled");
  EXPECT_TRUE(events_of("c", "long", "model.ready").empty());
  EXPECT_TRUE(
      wait_until([&] { return job_states(state, state_topic, job_id, "cancelled").size() == 1; },
                 30s))
      << "the group learns that it ended";
  // Ended before the cancel came.
  send_onboarding(onboarding("c", "next"));
  in_->flush();
  const auto ready = await_event("c", "next", "model.ready", 60s);
  ASSERT_FALSE(HasFailure());
  const auto next_id = ready.value["job_id"].get<std::string>();
  auto closed = [&] { return job_states(state, state_topic, next_id, "ready").size(); };
  ASSERT_TRUE(wait_until([&] { return closed() == 1; }, 30s));
  in_->send(state_topic, "job/" + next_id,
            job_state("tailord-here", "cancelling", next_id, "c", "next", 1).dump());
  in_->flush();
  const auto rej = await_event("c", "next", "job.cancel_rejected", 30s);
  ASSERT_FALSE(HasFailure());
  EXPECT_EQ(rej.value["error"]["code"], "job_not_cancellable");
  EXPECT_TRUE(wait_until([&] { return closed() == 2; }, 30s))
      << "closed again after the cancelling record";
  EXPECT_EQ(events_of("c", "next", "model.ready").size(), 1u) << "its end is not announced again";
  const auto metrics = engine_->get("/metrics").second;
  EXPECT_NE(metrics.find("\ntailor_job_cancels_passed_on_total{way=\"received\"} 2\n"),
            std::string::npos)
      << metrics;
}

// A cancel was passed on to an instance that then fell silent: the job's
// taker closes it as cancelled, without running it.
TEST_F(OnboardingTest, ACancelledJobOfASilentInstanceIsClosedByItsTakerWithoutRunning) {
  start({{"instance", {{"heartbeat_ms", 200}, {"takeover_after_ms", 2000}}}});
  ASSERT_FALSE(HasFatalFailure());
  const auto job_id = tailor::messages::job_id_for("g", "job");
  in_->send(engine_->topics().state, "job/" + job_id,
            job_state("tailord-gone", "cancelling", job_id, "g", "job", 1).dump());
  in_->flush();
  await_event("g", "job", "job.cancelled", 60s);
  ASSERT_FALSE(HasFailure());
  EXPECT_EQ(json::parse(engine_->get("/v1/jobs/" + job_id).second)["status"], "cancelled");
  EXPECT_EQ(metric("tailor_jobs_taken_over_total"), 1);
  for (const char* type : {"job.admitted", "job.training", "model.ready", "job.failed"})
    EXPECT_TRUE(events_of("g", "job", type).empty()) << type;
}

// A rolling upgrade: another instance, of a newer version, publishes
// records this one cannot read (a type it does not know, a known type's
// next schema_version). They are skipped with one warning per kind, not
// refused as unreadable, and what comes after them is read as before.
TEST_F(OnboardingTest, StateRecordsOfANewerVersionAreSkippedWithOneWarningEachKind) {
  start({{"instance", {{"takeover_after_ms", 0}}}});  // the other one is never taken over
  ASSERT_FALSE(HasFatalFailure());
  const auto& state_topic = engine_->topics().state;
  const auto request = onboarding("far", "job");
  const auto job_id = tailor::messages::job_id_for("far", "job");
  const auto key = "job/" + job_id;  // one key, one partition: read in this order
  const auto open =
      job_state("tailord-far", "queued", job_id, "far", "job", hash_of(request), request);
  auto next_schema = open;
  next_schema["schema_version"] = 2;
  next_schema["priority"] = "high";
  const json new_kind = {
      {"type", "instance.draining"}, {"schema_version", 1}, {"instance_id", "tailord-far"}};
  for (int i = 0; i < 3; ++i) in_->send(state_topic, key, new_kind.dump());
  for (int i = 0; i < 2; ++i) in_->send(state_topic, key, next_schema.dump());
  in_->send(state_topic, key, "{not json");
  in_->send(state_topic, key, open.dump());
  in_->flush();
  ASSERT_TRUE(wait_until([&] { return metric("tailor_group_open_jobs") == 1; }, 30s))
      << "the record after them is read";
  EXPECT_EQ(metric("tailor_state_records_total{outcome=\"newer\"}"), 5);
  EXPECT_EQ(metric("tailor_state_records_total{outcome=\"rejected\"}"), 1) << "{not json";
  const auto log = engine_->log_tail(100000);
  const auto count = [&](const std::string& what) { return occurrences(log, what); };
  EXPECT_EQ(count("are newer than this tailord"), 2u) << log;
  EXPECT_EQ(count("] [warning] state: records of type instance.draining with schema_version 1 "),
            1u);
  EXPECT_EQ(count("] [warning] state: records of type job.state with schema_version 2 "), 1u);
  EXPECT_EQ(count("] [error] state: record "), 1u) << "only the unreadable one is an error";
  EXPECT_EQ(engine_->get("/healthz").first, 200);
}

// A state follower started again after one failed reads the topic from its
// beginning; until it has read it all, the instance keeps the view of the
// group it had, not an empty one. Here the first follower fails on its
// third record (tailord's own heartbeat, a job's, and another instance's
// heartbeat, in some order), and the next ones cannot start for a while
// (the broker refuses their offset queries): meanwhile a repeat of a job's
// request open on another instance is answered for that instance, not
// trained here.
TEST_F(OnboardingTest, AStateFollowerStartedAgainKeepsTheGroupViewUntilItHasReadTheTopic) {
  ::setenv("TAILOR_FAULT_STATE", "3", 1);  // read by tailord as it starts
  // Never taken over; one heartbeat of its own, at its start.
  start_on_mock({{"instance", {{"takeover_after_ms", 0}, {"heartbeat_ms", 3600000}}}});
  ::unsetenv("TAILOR_FAULT_STATE");
  ASSERT_FALSE(HasFatalFailure());
  const auto& state_topic = engine_->topics().state;
  const auto request = publish_far_job(*in_, state_topic);
  const auto job_id = tailor::messages::job_id_for("far", "job");
  auto open_jobs = [&] {
    const auto g = json::parse(engine_->get("/v1/group").second, nullptr, false);
    return g.is_object() ? g.value("open_jobs_total", -1) : -1;
  };
  ASSERT_TRUE(wait_until([&] { return open_jobs() == 1; }, 30s));
  // ListOffsets (API key 2) refused until cleared below.
  mock_->fail_requests(2, std::vector<int>(1000, 29));  // TOPIC_AUTHORIZATION_FAILED
  in_->send(state_topic, "instance/tailord-far",
            json{{"type", "instance.alive"},
                 {"schema_version", 1},
                 {"instance_id", "tailord-far"},
                 {"at_ms", 1}}
                .dump());
  in_->flush();
  // The first follower failed, and at least one after it could not start.
  EXPECT_TRUE(wait_until([&] { return metric("tailor_state_follower_restarts_total") >= 2; }, 30s))
      << engine_->log_tail(20);
  EXPECT_EQ(open_jobs(), 1) << "the view stays while no follower has read the topic";
  send_onboarding(request);
  in_->flush();
  const auto queued = await_event("far", "job", "job.queued");
  EXPECT_EQ(queued.value["job_id"], job_id);
  EXPECT_EQ(engine_->get("/v1/jobs/" + job_id).first, 404) << "not trained here";
  mock_->clear_failures(2);
  // A follower reads the topic again and takes the view over: the second
  // "read ... following it" in the log.
  const auto caught_up = [&] {
    return occurrences(engine_->log_tail(100000), "; following it") >= 2;
  };
  EXPECT_TRUE(wait_until(caught_up, 60s)) << engine_->log_tail(20);
  EXPECT_EQ(open_jobs(), 1);
  EXPECT_TRUE(events_of("far", "job", "job.admitted").empty()) << "never run here";
  EXPECT_EQ(engine_->get("/healthz").first, 200);
}

// The state topic lost what an instance has (it was recreated empty, or the
// models were made before it existed): at its next start the instance
// publishes its ready models and its open jobs there, so a fresh instance
// serves those models and could take those jobs over. A topic that lacks
// nothing gets nothing.
TEST_F(OnboardingTest, WhatTheStateTopicLacksIsPublishedAtTheNextStart) {
  start({{"training", {{"slots", 1}}}, {"instance", {{"id", "tailord-keeper"}}}});
  ASSERT_FALSE(HasFatalFailure());
  send_onboarding(onboarding("early", "first"));
  in_->flush();
  const auto ready = await_event("early", "first", "model.ready", 60s);
  ASSERT_FALSE(HasFailure());
  const auto model_id = ready.value["model_id"].get<std::string>();
  send_onboarding(onboarding_with("early", "long", {{"steps", 10000}}));
  in_->flush();
  const auto running = await_event("early", "long", "job.progress");
  ASSERT_FALSE(HasFailure());
  const auto job_id = running.value["job_id"].get<std::string>();
  engine_->kill();
  const auto lost_topic = engine_->topics().state;
  const auto fresh_topic = lost_topic + ".fresh";
  const json on_fresh = {{"kafka", {{"topics", {{"state", fresh_topic}}}}}};
  engine_->reconfigure(on_fresh);
  engine_->start();
  ASSERT_FALSE(HasFatalFailure());
  collector state(engine_->bootstrap(), {fresh_topic});
  auto records = [&](const std::string& type, const std::string& key) {
    return state.matching(fresh_topic, [&](const json& j) {
      return j.value("type", "") == type &&
             j.value(type == "model.state" ? "model_id" : "job_id", "") == key;
    });
  };
  ASSERT_TRUE(wait_until(
      [&] {
        return !records("model.state", model_id).empty() && !records("job.state", job_id).empty();
      },
      30s))
      << engine_->log_tail(20);
  const auto model = records("model.state", model_id).front().value;
  EXPECT_EQ(model["user_id"], "early");
  EXPECT_EQ(model["request_id"], "first") << "a repeat elsewhere is not trained again";
  EXPECT_EQ(model["artifact"].get<std::string>().rfind("adapters/", 0), 0u) << model.dump();
  const auto job = records("job.state", job_id).front().value;
  EXPECT_EQ(job["owner"], "tailord-keeper");
  EXPECT_EQ(job["status"], "queued");
  EXPECT_EQ(job["request"]["request_id"], "long") << "so another instance can run it";
  // A fresh instance on the fresh topic serves the model.
  engine_process second("second", {{"artifact_dir", engine_->data_dir() + "/data/artifacts"}});
  second.join_group_of(*engine_);
  second.reconfigure(on_fresh);
  second.start();
  ASSERT_FALSE(HasFatalFailure());
  const auto models = json::parse(second.get("/v1/users/early/models").second);
  ASSERT_EQ(models.size(), 1u) << models.dump();
  EXPECT_EQ(models[0]["model_id"], model_id);
  EXPECT_EQ(second.stop(), 0);
  // The topic lacks nothing now: a restart publishes nothing.
  auto published = [&] { return occurrences(engine_->log_tail(100000), "were not on"); };
  ASSERT_EQ(published(), 1u) << engine_->log_tail(40);
  EXPECT_EQ(engine_->stop(), 0);
  engine_->start();
  ASSERT_FALSE(HasFatalFailure());
  EXPECT_EQ(published(), 1u) << engine_->log_tail(40);
}

TEST_F(OnboardingTest, CancellationStopsARunningJobAndFreesItsSlot) {
  start({{"training", {{"slots", 1}}}});
  ASSERT_FALSE(HasFatalFailure());
  send_onboarding(onboarding_with("c", "long", {{"steps", 10000}}));
  in_->flush();
  auto first = await_event("c", "long", "job.progress");
  ASSERT_FALSE(HasFailure());
  send_control(job_cancel("c", first.value["job_id"]));
  in_->flush();
  await_event("c", "long", "job.cancelled", 30s);
  ASSERT_FALSE(HasFailure());
  auto job =
      json::parse(engine_->get("/v1/jobs/" + first.value["job_id"].get<std::string>()).second);
  EXPECT_EQ(job["status"], "cancelled");
  EXPECT_TRUE(events_of("c", "long", "model.ready").empty());
  // The one slot is free again: the next job runs to the end.
  send_onboarding(onboarding("c", "next"));
  in_->flush();
  await_event("c", "next", "model.ready", 60s);
  // A cancel of a finished job is refused with the reason.
  send_control(job_cancel("c", events_of("c", "next", "model.ready")[0].value["job_id"]));
  in_->flush();
  auto rej = await_event("c", "next", "job.cancel_rejected", 30s);
  EXPECT_EQ(rej.value["error"]["code"], "job_not_cancellable");
}

TEST_F(OnboardingTest, PromptsInTheRequestAreAnsweredRightAfterTraining) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  // The third is one byte over what tailor-test's context of 64 holds.
  send_onboarding(onboarding_with("p", "hello", {{"steps", 10}},
                                  {"Tell me a story.", "Hi!", std::string(64, 'x')}));
  in_->flush();
  auto ready = await_event("p", "hello", "model.ready");
  ASSERT_FALSE(HasFailure());
  auto refused = await_event("p", "hello#2", "inference.result", 30s);
  EXPECT_EQ(refused.value["error"]["code"], "prompt_too_long") << refused.payload;
  EXPECT_NE(refused.value["error"].value("message", "").find("prompts[2]: its 64 bytes"),
            std::string::npos)
      << refused.payload;
  EXPECT_EQ(refused.value["model_id"], ready.value["model_id"]);
  for (int i = 0; i < 2; ++i) {
    auto id = "hello#" + std::to_string(i);
    auto r = await_event("p", id, "inference.result", 30s);
    EXPECT_EQ(r.topic, engine_->topics().results);
    EXPECT_EQ(r.value["model_id"], ready.value["model_id"]);
    EXPECT_FALSE(r.value.contains("error")) << r.payload;
    EXPECT_TRUE(r.value["finish_reason"] == "stop" || r.value["finish_reason"] == "length");
    EXPECT_TRUE(r.value["text"].is_string());
  }
}

TEST_F(OnboardingTest, AUserOverTheJobQuotaIsRefusedWhileOthersGoOn) {
  start({{"training", {{"slots", 1}, {"max_jobs_per_user", 1}}}});
  ASSERT_FALSE(HasFatalFailure());
  send_onboarding(onboarding_with("heavy", "a", {{"steps", 10000}}));
  send_onboarding(onboarding_with("heavy", "b", {{"steps", 5}}));
  in_->flush();
  auto refused = await_event("heavy", "b", "job.failed");
  EXPECT_EQ(refused.value["error"]["code"], "quota_exceeded");
  send_control(job_cancel("heavy", await_one("heavy", "a").value["job_id"]));
  send_onboarding(onboarding("light", "x"));
  in_->flush();
  await_event("light", "x", "model.ready", 60s);
  await_event("heavy", "a", "job.cancelled", 30s);
}

TEST_F(OnboardingTest, TransientFailuresRetryWithBackoffThenFailWithTheReason) {
  start({{"training", {{"max_attempts", 3}, {"retry_backoff_ms", 300}}}});
  ASSERT_FALSE(HasFatalFailure());
  // A file where a user's adapter directory belongs makes saving fail.
  auto adapters = engine_->data_dir() + "/data/artifacts/adapters";
  fs::create_directories(adapters);
  std::ofstream(adapters + "/flaky") << "in the way";
  std::ofstream(adapters + "/doomed") << "in the way";
  send_onboarding(onboarding("flaky", "r"));
  send_onboarding(onboarding("doomed", "r"));
  in_->flush();
  auto retry = await_event("flaky", "r", "job.retrying", 60s);
  ASSERT_FALSE(HasFailure());
  EXPECT_EQ(retry.value["error"]["code"], "training_failed");
  EXPECT_NE(retry.value["error"]["message"].get<std::string>().find("adapter"), std::string::npos)
      << retry.payload;
  fs::remove(adapters + "/flaky");  // the fault clears: the next attempt succeeds
  await_event("flaky", "r", "model.ready", 60s);
  auto failed = await_event("doomed", "r", "job.failed", 60s);
  EXPECT_EQ(failed.value["error"]["code"], "training_failed");
  EXPECT_EQ(events_of("doomed", "r", "job.retrying").size(), 2u) << "3 attempts, 2 retries";
  EXPECT_EQ(events_of("doomed", "r", "job.admitted").size(), 3u);
  auto job =
      json::parse(engine_->get("/v1/jobs/" + failed.value["job_id"].get<std::string>()).second);
  EXPECT_EQ(job["status"], "failed");
  EXPECT_EQ(job["attempts"], 3);
}

// A job's actor that fails (a bug, not the job's own failure: a fault
// injector throws in its second transition) leaves the job persisted as it
// was; a fresh actor takes it on from there, and every user gets a model,
// from one job per request.
TEST_F(OnboardingTest, AJobWhoseActorFailsStartsAgainAndEndsWithItsModel) {
  start_with_fault("TAILOR_FAULT_JOB", "2");
  ASSERT_FALSE(HasFatalFailure());
  const std::vector<std::string> users = {"pia", "quinn", "rosa"};
  for (const auto& u : users) send_onboarding(onboarding(u, "r"));
  in_->flush();
  for (const auto& u : users) await_event(u, "r", "model.ready", 60s);
  ASSERT_FALSE(HasFailure());
  EXPECT_EQ(metric("tailor_job_actor_failures_total"), 1);
  for (const auto& u : users) {
    EXPECT_TRUE(events_of(u, "r", "job.failed").empty()) << u;
    auto models = json::parse(engine_->get("/v1/users/" + u + "/models").second);
    EXPECT_EQ(models.size(), 1u) << u << ": " << models.dump();
  }
  auto jobs = json::parse(engine_->get("/v1/jobs?limit=100").second);
  EXPECT_EQ(jobs.size(), users.size()) << "one job per request";
}

// A job whose actor fails while its slot trains: the run stops at its next
// step, keeping its checkpoint, and the job's fresh actor resumes from it
// at once, on the same slot, rather than wait for the orphaned run to end.
TEST_F(OnboardingTest, AJobWhoseActorFailsWhileTrainingResumesAtOnce) {
  start_with_fault("TAILOR_FAULT_JOB", "2",  // admitted -> training: the run has begun
                   {{"training",
                     {{"slots", 1}, {"checkpoint_every", 20}, {"progress_interval_ms", 50}}}});
  ASSERT_FALSE(HasFatalFailure());
  send_onboarding(onboarding_with("tom", "long", {{"steps", 10000}, {"batch_size", 32}}));
  in_->flush();
  // The progress the first actor would have published went nowhere: any
  // job.progress is the fresh actor's, resuming.
  const auto resumed = await_event("tom", "long", "job.progress", 30s);
  ASSERT_FALSE(HasFailure()) << "the orphaned run kept the one slot";
  EXPECT_EQ(metric("tailor_job_actor_failures_total"), 1);
  send_control(job_cancel("tom", resumed.value["job_id"]));
  in_->flush();
  await_event("tom", "long", "job.cancelled", 30s);
}

// A job that takes its actor down every time (every transition throws)
// fails at the third failure with `internal`, naming why, instead of
// starting again for good.
TEST_F(OnboardingTest, AJobWhoseActorFailsThreeTimesFailsWithTheReason) {
  start_with_fault("TAILOR_FAULT_JOB", "1+");
  ASSERT_FALSE(HasFatalFailure());
  send_onboarding(onboarding("sam", "r"));
  in_->flush();
  auto failed = await_event("sam", "r", "job.failed", 60s);
  ASSERT_FALSE(HasFailure());
  EXPECT_EQ(failed.value["error"]["code"], "internal") << failed.payload;
  const auto message = failed.value["error"]["message"].get<std::string>();
  EXPECT_NE(message.find("failed 3 times"), std::string::npos) << message;
  EXPECT_NE(message.find("TAILOR_FAULT_JOB"), std::string::npos) << message;
  EXPECT_EQ(metric("tailor_job_actor_failures_total"), 3);
  auto job =
      json::parse(engine_->get("/v1/jobs/" + failed.value["job_id"].get<std::string>()).second);
  EXPECT_EQ(job["status"], "failed");
}
