// Workflow B against a real Kafka broker (CTest label `kafka`): a user is
// answered by their own model, batched with other users' requests, through a
// tiered adapter cache, fairly, and within their quota.
#include <gtest/gtest.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

#include "engine_harness.hpp"
#include "model/checkpoint.hpp"
#include "model/generate.hpp"
#include "model/pretrain.hpp"
#include "storage/metadata_store.hpp"
#include "temp_dir.hpp"
#include "terse_base.hpp"

using namespace tailor::test;
namespace fs = std::filesystem;

namespace {

// Whether a thread of this process may take SCHED_FIFO (root or CAP_SYS_NICE);
// tailord, started by it, may then too.
bool may_run_realtime() {
  bool ok = false;
  std::thread([&] {
    sched_param p{};
    p.sched_priority = 1;
    ok = pthread_setschedparam(pthread_self(), SCHED_FIFO, &p) == 0;
  }).join();
  return ok;
}

// The scheduling policy of each thread of process `pid`: how many threads
// have each.
std::map<int, int> thread_policies(pid_t pid) {
  std::map<int, int> n;
  for (const auto& t : fs::directory_iterator("/proc/" + std::to_string(pid) + "/task")) {
    std::ifstream in(t.path() / "stat");
    std::string line;
    std::getline(in, line);
    // After the command name in parentheses: fields 3, 4, ...; policy is field 41.
    std::istringstream rest(line.substr(line.rfind(')') + 2));
    std::string field;
    for (int i = 3; i <= 41 && rest >> field; ++i)
      if (i == 41) ++n[std::stoi(field)];
  }
  return n;
}

int threads_with(const std::map<int, int>& policies, int policy) {
  auto it = policies.find(policy);
  return it == policies.end() ? 0 : it->second;
}

class ServingTest : public engine_test {
 protected:
  // User `u`'s onboarding request "signup", with texts of their own.
  static json signup(const std::string& u, int steps) {
    auto j = onboarding(u, "signup",
                        {"I am " + u + " and I say " + u + " all day long.",
                         u + " " + u + " " + u + "!", "Ask " + u + " anything."});
    j["hyperparameters"] = {{"steps", steps}, {"learning_rate", 0.01}};
    return j;
  }
  // Onboards `users` and waits for their models.
  std::map<std::string, std::string> onboard_all(const std::vector<std::string>& users,
                                                 int steps = 3) {
    for (const auto& u : users) send_onboarding(signup(u, steps));
    in_->flush();
    std::map<std::string, std::string> models;
    for (const auto& u : users)
      models[u] = await_event(u, "signup", "model.ready", 120s).value.value("model_id", "");
    return models;
  }
  json ask(const std::string& user, const std::string& request, const std::string& prompt,
           uint64_t seed, int max_tokens = 24) {
    auto j = inference(user, request, prompt);
    j["seed"] = seed;
    j["max_tokens"] = max_tokens;
    j["temperature"] = 0.8;
    return j;
  }
  // Sends the cancel of (user, request) and waits until the ingress has read
  // it. The ingress hands events to the user actor in the order it reads
  // them: the cancel reaches it before a request sent afterwards.
  void send_cancel_first(const std::string& user, const std::string& request) {
    const auto before = cancels_read();
    send_control({{"type", "inference.cancel"},
                   {"schema_version", 1},
                   {"user_id", user},
                   {"request_id", request}});
    in_->flush();
    ASSERT_TRUE(wait_until([&] { return cancels_read() > before; }, 30s));
  }
  double cancels_read() {
    return labelled("tailor_events_in_total", "topic", engine_->topics().control);
  }
  // A request that runs to its end unless cancelled: 58 tokens, with the
  // prompt's 6 all that tailor-test's context of 64 holds.
  json long_ask(const std::string& user, const std::string& request) {
    auto j = ask(user, request, "hello", 7, 58);
    j["ignore_end_of_text"] = true;
    return j;
  }
  // Sends `n` requests of `user` (ids `prefix`0, `prefix`1 ...), each of
  // which runs its full 60 steps, and waits until at least `waiting` of them
  // wait on the device. With max_batch 1, 1500 are ~3.5 s of steps of the
  // test model (300 were 0.7 s).
  void send_backlog(const std::string& user, const std::string& prefix, int n, int waiting) {
    for (int i = 0; i < n; ++i) {
      auto j = ask(user, prefix + std::to_string(i), "go", static_cast<uint64_t>(i), 60);
      j["ignore_end_of_text"] = true;
      send_inference(j);
    }
    in_->flush();
    ASSERT_TRUE(wait_until(
        [&] { return labelled("tailor_serving_waiting", "device", "tailor-test/0") >= waiting; },
        60s))
        << "no backlog formed";
  }
  json result(const std::string& user, const std::string& request,
              std::chrono::milliseconds timeout = 60s) {
    return await_event(user, request, "inference.result", timeout).value;
  }
  // Sends one request and waits for its result.
  json answer_to(const json& request) {
    send_inference(request);
    in_->flush();
    return result(request["user_id"], request["request_id"]);
  }
  // Sends `request` again: its repeat gets the stored result, byte for byte.
  void expect_repeat_gets_the_stored_result(const json& request) {
    const std::string user = request["user_id"], id = request["request_id"];
    send_inference(request);
    in_->flush();
    ASSERT_TRUE(
        wait_until([&] { return events_of(user, id, "inference.result").size() >= 2; }, 30s));
    auto both = events_of(user, id, "inference.result");
    EXPECT_EQ(both[0].payload, both[1].payload);
  }
  // Whether instance `e` lists `model` as `user`'s, ready.
  static bool lists(const engine_process& e, const std::string& user, const std::string& model) {
    auto [status, body] = e.get("/v1/users/" + user + "/models");
    if (status != 200) return false;
    for (const auto& m : json::parse(body))
      if (m.value("model_id", "") == model && m.value("status", "") == "ready") return true;
    return false;
  }
  double labelled(const std::string& name, const std::string& label, const std::string& value) {
    return labelled_of(*engine_, name, label, value);
  }
  static double labelled_of(const engine_process& e, const std::string& name,
                            const std::string& label, const std::string& value) {
    auto m = e.get("/metrics").second;
    auto key = "\n" + name + "{" + label + "=\"" + value + "\"} ";
    auto pos = m.find(key);
    return pos == std::string::npos ? 0 : std::stod(m.substr(pos + key.size()));
  }
};

}  // namespace

TEST_F(ServingTest, AUserIsAnsweredByTheirOwnModel) {
  // With the threads' default policy (compute.scheduling normal) and no
  // step helper: the scheduling changes when threads run, never what they
  // compute. With synced writes, whose answers and history take the store
  // actor's way (the other tests take the default's).
  start({{"compute", {{"scheduling", "normal"}}},
         {"serving", {{"step_helper", false}}},
         {"sync_writes", true}});
  ASSERT_FALSE(HasFatalFailure());
  EXPECT_EQ(threads_with(thread_policies(engine_->pid()), SCHED_BATCH), 0);
  EXPECT_EQ(threads_with(thread_policies(engine_->pid()), SCHED_IDLE), 0);
  auto models = onboard_all({"ann", "bob"}, 40);
  // Past an end-of-text too: 24 bytes of each, not a one-byte answer that
  // two small models may share by chance.
  auto q = [&](const std::string& user) {
    auto j = ask(user, "q1", "Who are you?", 7);
    j["ignore_end_of_text"] = true;
    return j;
  };
  send_inference(q("ann"));
  send_inference(q("bob"));
  in_->flush();
  auto a = result("ann", "q1");
  auto b = result("bob", "q1");
  ASSERT_FALSE(HasFailure());
  EXPECT_FALSE(a.contains("error")) << a.dump();
  EXPECT_EQ(a["model_id"], models["ann"]);
  EXPECT_EQ(b["model_id"], models["bob"]);
  EXPECT_NE(a["text"], b["text"]) << "two users' models answer the same prompt and seed alike";
  EXPECT_TRUE(a["finish_reason"] == "stop" || a["finish_reason"] == "length");
  const auto& t = a["timings_ms"];
  EXPECT_GT(t["total"].get<double>(), 0.0);
  // Each to the microsecond: the sum of two rounded may pass the rounded total by 1 us.
  EXPECT_GE(t["total"].get<double>(),
            t["decode"].get<double>() + t["prefill"].get<double>() - 1e-3 - 1e-9);
  // A repeated request id gets the stored result, byte for byte.
  expect_repeat_gets_the_stored_result(q("ann"));
  ASSERT_FALSE(HasFatalFailure());
  auto both = events_of("ann", "q1", "inference.result");
  // The engine's own share of a generated answer's latency is observed once
  // its delivery is reported: two of the three answers delivered, not the
  // stored answer sent again (whose timings are those of its first run).
  const auto results_out = "tailor_events_out_total{topic=\"" + engine_->topics().results + "\"}";
  ASSERT_TRUE(wait_until([&] { return metric(results_out) >= 3; }, 10s));
  EXPECT_EQ(metric("tailor_inference_overhead_ms_count"), 2);
  // Inputs and outputs are kept in the user's history.
  ASSERT_TRUE(wait_until(
      [&] {
        auto h = json::parse(engine_->get("/v1/users/ann/history").second);
        return h["entries"].size() >= 1u;
      },
      10s));
  auto h = json::parse(engine_->get("/v1/users/ann/history").second);
  EXPECT_EQ(h["entries"][0]["request_id"], "q1");
  EXPECT_NE(h["entries"][0]["input"].get<std::string>().find("Who are you?"), std::string::npos);
  EXPECT_EQ(h["entries"][0]["output"], both[0].payload);
}

// Without a model_id, a request is served by the user's newest ready model:
// none before the first onboarding, and the second model once it is ready
// (the user actor keeps its pick only while no model has been added).
// Under exactly-once output a job's events go out in transactions too, and
// a job counts one as delivered only once it is committed: the whole of
// workflows A and B works as without it, each event once and in order.
TEST_F(ServingTest, UnderExactlyOnceOutputAUserIsOnboardedAndServedEachEventOnce) {
  start({{"kafka", {{"exactly_once", true}}}});
  ASSERT_FALSE(HasFatalFailure());
  auto models = onboard_all({"eve"});
  const auto r = answer_to(ask("eve", "q1", "hello", 3));
  EXPECT_FALSE(r.contains("error")) << r.dump();
  EXPECT_EQ(r.value("model_id", ""), models["eve"]);
  std::vector<std::string> types;
  for (const auto& e : answers_to("eve", "signup"))
    if (e.value.value("type", "") != "job.progress") types.push_back(e.value.value("type", ""));
  EXPECT_EQ(types, (std::vector<std::string>{"job.queued", "job.admitted", "job.training",
                                             "job.saving", "model.ready"}));
  EXPECT_EQ(answers_to("eve", "q1").size(), 1u);
  EXPECT_EQ(engine_->stop(), 0);
}

TEST_F(ServingTest, ARequestIsServedByTheUsersNewestReadyModel) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  send_inference(ask("cara", "before", "hello", 1));
  in_->flush();
  EXPECT_EQ(result("cara", "before")["error"]["code"], "no_ready_model");
  auto first = onboard_all({"cara"})["cara"];
  send_inference(ask("cara", "after-first", "hello", 1));
  in_->flush();
  auto r1 = result("cara", "after-first");
  EXPECT_EQ(r1["model_id"], first) << r1.dump();
  auto j = onboarding("cara", "again", {"Cara again, with new words.", "New words for cara."});
  j["hyperparameters"] = {{"steps", 3}, {"learning_rate", 0.01}};
  send_onboarding(j);
  in_->flush();
  auto second = await_event("cara", "again", "model.ready", 120s).value.value("model_id", "");
  ASSERT_FALSE(second.empty());
  ASSERT_NE(second, first);
  send_inference(ask("cara", "after-second", "hello", 1));
  in_->flush();
  auto r2 = result("cara", "after-second");
  EXPECT_EQ(r2["model_id"], second) << r2.dump();
  // Served requests are in the history, written with their answers.
  auto h = json::parse(engine_->get("/v1/users/cara/history").second);
  ASSERT_EQ(h["entries"].size(), 2u) << h.dump();
  EXPECT_EQ(h["entries"][0]["request_id"], "after-first");
  EXPECT_EQ(h["entries"][1]["request_id"], "after-second");
  EXPECT_EQ(h["entries"][1]["output"], events_of("cara", "after-second", "inference.result")
                                           .at(0)
                                           .payload);
}

// tailor_serving_busy_seconds_total is the time a device spent in steps:
// it grows with a request's steps, and not while the device has nothing to
// step (an operator reads 1 - its rate as the share of time the batch was
// empty).
TEST_F(ServingTest, ADevicesBusyTimeCountsItsStepsNotItsIdleTime) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  auto busy = [&] {
    // Summed over the devices (one here).
    auto m = engine_->get("/metrics").second;
    const std::string key = "\ntailor_serving_busy_seconds_total{";
    double sum = 0;
    int series = 0;
    for (auto pos = m.find(key); pos != std::string::npos; pos = m.find(key, pos + 1)) {
      sum += std::stod(m.substr(m.find("} ", pos) + 2));
      ++series;
    }
    EXPECT_EQ(series, 1) << m;
    return sum;
  };
  onboard_all({"dora"});
  send_inference(ask("dora", "first", "hello", 1, 16));
  in_->flush();
  ASSERT_FALSE(result("dora", "first").contains("error"));
  const double b1 = busy();
  EXPECT_GT(b1, 0.0) << "the first request's steps";
  // A stretch with nothing to step: another user's onboarding (training,
  // then its model registered), awaited until its model is ready.
  const auto idle_from = std::chrono::steady_clock::now();
  onboard_all({"eli"}, 40);
  const double idle =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - idle_from).count();
  // Ten times the slack below, so that counting it would show.
  ASSERT_GT(idle, 0.01) << "an onboarding too short to tell idle time from steps";
  const auto sent = std::chrono::steady_clock::now();
  send_inference(ask("dora", "second", "hello", 2, 16));
  in_->flush();
  ASSERT_FALSE(result("dora", "second").contains("error"));
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - sent).count();
  const double b2 = busy();
  EXPECT_GT(b2, b1) << "the second request's steps";
  // Its steps ran between its sending and its answer (published before the
  // answer leaves); the onboarding before it is not in it.
  EXPECT_LE(b2 - b1, elapsed + 0.001) << "busy " << b1 << " -> " << b2 << ", elapsed " << elapsed
                                      << ", idle before it " << idle;
}

TEST_F(ServingTest, ARequestNamingAnotherUsersModelIsRefused) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  auto models = onboard_all({"owner", "thief"});
  auto j = ask("thief", "steal", "hello", 1);
  j["model_id"] = models["owner"];
  send_inference(j);
  in_->flush();
  auto r = result("thief", "steal");
  EXPECT_EQ(r["error"]["code"], "model_not_owned") << r.dump();
  EXPECT_FALSE(r.contains("text") && !r["text"].get<std::string>().empty());
}

// A prompt the base model's context cannot hold is refused with the reason,
// not cut where the requester cannot see; one that fits is read whole, and
// its generation ends where the context is full (tailor-test: 64 tokens).
TEST_F(ServingTest, APromptLongerThanTheContextIsRefusedAndOneThatFitsIsReadWhole) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  auto models = onboard_all({"talker"});
  const std::string fits(63, 'a');
  auto too_long = ask("talker", "long", fits + "a", 1, 8);
  auto r = answer_to(too_long);
  EXPECT_EQ(r["error"]["code"], "prompt_too_long") << r.dump();
  const std::string message = r["error"].value("message", "");
  EXPECT_EQ(message.rfind("prompt: ", 0), 0u) << message;
  EXPECT_NE(message.find("at most 63 bytes"), std::string::npos) << message;
  EXPECT_NE(message.find("tailor-test"), std::string::npos) << message;
  EXPECT_EQ(r["model_id"], models["talker"]);
  expect_repeat_gets_the_stored_result(too_long);
  // max_tokens over what is left: the context ends it after one token.
  auto longest = ask("talker", "longest", fits, 1, 64);
  longest["ignore_end_of_text"] = true;
  r = answer_to(longest);
  EXPECT_FALSE(r.contains("error")) << r.dump();
  EXPECT_EQ(r["finish_reason"], "length") << r.dump();
  EXPECT_EQ(r["usage"]["prompt_tokens"], 64) << r.dump();
  EXPECT_EQ(r["usage"]["completion_tokens"], 1) << r.dump();
}

// A request's min_tokens reaches its batch row. On a base that always
// prefers end-of-text (as a prompt that ends a sentence often makes a real
// one), a request is answered with nothing; with min_tokens, with exactly
// that many tokens before end-of-text ends it; serving.default_min_tokens
// stands in for a request's and for an onboarding prompt's.
TEST_F(ServingTest, MinTokensKeepsAnAnswerFromEndingBeforeThatManyTokens) {
  const temp_dir models_dir("terse-base");
  auto cfg = tailor::model::named_config("tailor-test");
  ASSERT_TRUE(cfg);
  auto base = terse_base(*cfg);
  ASSERT_FALSE(tailor::model::save_base((models_dir / "tailor-test.safetensors").string(), base));
  start({{"models", {{"dir", models_dir.path().string()}}}});
  ASSERT_FALSE(HasFatalFailure());
  onboard_all({"terse"});
  auto plain = answer_to(ask("terse", "plain", "Tell me something.", 1));
  EXPECT_EQ(plain["finish_reason"], "stop") << plain.dump();
  EXPECT_EQ(plain["text"], "") << plain.dump();
  auto held = ask("terse", "held", "Tell me something.", 1);
  held["min_tokens"] = 6;
  auto r = answer_to(held);
  EXPECT_EQ(r["finish_reason"], "stop") << r.dump();
  EXPECT_EQ(r["usage"]["completion_tokens"], 6) << r.dump();
  EXPECT_NE(r["text"], "") << r.dump();
  // More than max_tokens allows: refused to the requester, with the reason.
  auto over = ask("terse", "over", "Tell me something.", 1, 4);
  over["min_tokens"] = 5;
  auto refused = answer_to(over);
  EXPECT_EQ(refused["error"]["code"], "invalid_argument") << refused.dump();
  EXPECT_EQ(refused["error"]["message"], "min_tokens: must not exceed max_tokens (4)");
  // serving.default_min_tokens: for requests that leave min_tokens out, and
  // for an onboarding request's prompts; a request's own still wins.
  ASSERT_EQ(engine_->stop(), 0);
  engine_->reconfigure({{"serving", {{"default_min_tokens", 3}}}});
  engine_->start();
  ASSERT_FALSE(HasFatalFailure());
  auto defaulted = answer_to(ask("terse", "defaulted", "Tell me something.", 1));
  EXPECT_EQ(defaulted["finish_reason"], "stop") << defaulted.dump();
  EXPECT_EQ(defaulted["usage"]["completion_tokens"], 3) << defaulted.dump();
  auto own = ask("terse", "own", "Tell me something.", 1);
  own["min_tokens"] = 0;
  EXPECT_EQ(answer_to(own)["usage"]["completion_tokens"], 0);
  auto signup_with_prompt = signup("newcomer", 3);
  signup_with_prompt["prompts"] = {"Tell me something."};
  send_onboarding(signup_with_prompt);
  in_->flush();
  auto welcome = result("newcomer", "signup#0");
  EXPECT_EQ(welcome["usage"]["completion_tokens"], 3) << welcome.dump();
}

// Design section 6: every instance of a group reads the ready models from
// the state topic. Whichever instance a user's partition moves to then
// serves the user's own model (the instances share the artifact store), and
// an instance that starts later learns the models made before it started,
// and answers a repeat of the request that made one as the first did.
TEST_F(ServingTest, EveryInstanceOfAGroupServesEveryUsersOwnModel) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  auto models = onboard_all({"ann"});  // before the second instance starts
  engine_process second("second", {{"artifact_dir", engine_->data_dir() + "/data/artifacts"}});
  second.join_group_of(*engine_);
  second.start();
  ASSERT_FALSE(HasFatalFailure());
  // Read before it read any event: it is ready only once its ingress runs.
  EXPECT_TRUE(lists(second, "ann", models["ann"]));
  // Each trained by whichever instance holds the user's partition.
  const std::vector<std::string> users = {"ann", "bob", "cid", "dee", "eve", "fay"};
  models.merge(onboard_all({"bob", "cid", "dee", "eve", "fay"}));
  for (const auto& u : users) {
    EXPECT_TRUE(wait_until([&] { return lists(*engine_, u, models[u]); }, 30s))
        << "the first instance does not list " << u << "'s model";
    EXPECT_TRUE(wait_until([&] { return lists(second, u, models[u]); }, 30s))
        << "the second instance does not list " << u << "'s model";
  }
  // How each model was trained reaches the other instance with it.
  auto training_of = [&](const engine_process& e, const std::string& u) {
    for (const auto& m : json::parse(e.get("/v1/users/" + u + "/models").second))
      if (m.value("model_id", "") == models[u]) return m.value("training", json());
    return json();
  };
  for (const auto& u : users) {
    const auto here = training_of(*engine_, u);
    ASSERT_TRUE(here.is_object()) << u << ": " << here.dump();
    EXPECT_EQ(here.value("steps", 0), 3) << u << ": " << here.dump();
    EXPECT_EQ(training_of(second, u), here) << u;
  }
  std::map<std::string, json> before;
  for (const auto& u : users) send_inference(ask(u, "q1", "Who are you?", 7));
  in_->flush();
  for (const auto& u : users) before[u] = result(u, "q1");
  ASSERT_FALSE(HasFailure());
  // The second instance takes every partition, and serves every user.
  ASSERT_EQ(engine_->stop(), 0);
  for (const auto& u : users) send_inference(ask(u, "q2", "Who are you?", 7));
  in_->flush();
  for (const auto& u : users) {
    auto r = result(u, "q2");
    EXPECT_FALSE(r.contains("error")) << r.dump();
    EXPECT_EQ(r["model_id"], models[u]);
    EXPECT_EQ(r["text"], before[u]["text"]) << u << ": the same model, prompt and seed";
  }
  // Ann's model was made by the first instance before the second started.
  send_onboarding(signup("ann", 3));
  auto other = signup("ann", 3);
  other["texts"] = {"not what ann sent"};
  send_onboarding(other);
  in_->flush();
  const auto refusal = await_event("ann", "signup", "job.failed");
  EXPECT_EQ(refusal.value["error"]["code"], "duplicate_request_id") << refusal.payload;
  const auto queued = events_of("ann", "signup", "job.queued");
  ASSERT_EQ(queued.size(), 2u) << "the repeat is answered as the first instance answered it";
  EXPECT_EQ(queued[0].payload, queued[1].payload);
  EXPECT_EQ(events_of("ann", "signup", "job.admitted").size(), 1u) << "trained once";
  const auto ann_job = queued[0].value["job_id"].get<std::string>();
  EXPECT_EQ(second.get("/v1/jobs/" + ann_job).first, 404);
  // A cancel of Ann's job, ended on the first instance, says that it is ready.
  send_control(job_cancel("ann", ann_job));
  in_->flush();
  const auto rejected = await_match(engine_->topics().events, [&](const json& j) {
    return j.value("type", "") == "job.cancel_rejected" && j.value("job_id", "") == ann_job;
  });
  ASSERT_FALSE(HasFailure());
  EXPECT_EQ(rejected.value["error"]["code"], "job_not_cancellable") << rejected.payload;
  EXPECT_NE(rejected.value["error"]["message"].get<std::string>().find(models["ann"]),
            std::string::npos)
      << rejected.payload;
  const auto m = second.get("/metrics").second;
  EXPECT_NE(m.find("tailor_state_records_total{outcome=\"imported\"}"), std::string::npos) << m;
  EXPECT_EQ(m.find("tailor_state_records_total{outcome=\"rejected\"}"), std::string::npos);
  EXPECT_EQ(second.stop(), 0);
}

// A deleted user leaves nothing behind: their model, its adapter file, job,
// answers and history go, and the state topic gets tombstones and the
// erasure. What they sent before the deletion is refused; what they send
// after is served as a new user's. Other users are not touched.
TEST_F(ServingTest, ADeletedUserLeavesNothingBehindAndOthersAreNotTouched) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  collector state(engine_->bootstrap(), {engine_->topics().state});
  auto models = onboard_all({"dora", "eli"});
  const auto job = await_event("dora", "signup", "job.queued").value["job_id"].get<std::string>();
  auto listed = json::parse(engine_->get("/v1/users/dora/models").second);
  ASSERT_EQ(listed.size(), 1u);
  const std::string artifact = listed[0]["artifact_path"];
  ASSERT_TRUE(fs::exists(artifact));
  EXPECT_FALSE(answer_to(ask("dora", "q1", "Who are you?", 7)).contains("error"));
  const auto sent_before = std::chrono::duration_cast<std::chrono::milliseconds>(
                               std::chrono::system_clock::now().time_since_epoch())
                               .count();
  // Still running when the deletion is read, or read after it.
  send_inference(long_ask("dora", "busy"));
  const json deletion = {
      {"type", "user.delete"}, {"schema_version", 1}, {"user_id", "dora"}, {"request_id", "del1"}};
  send_control(deletion);
  in_->flush();
  const auto deleted = await_event("dora", "del1", "user.deleted");
  ASSERT_FALSE(HasFailure());
  const auto& what = deleted.value["deleted"];
  EXPECT_EQ(what["models"], 1) << deleted.payload;
  EXPECT_EQ(what["jobs"], 1) << deleted.payload;
  EXPECT_GE(what["requests"], 2) << deleted.payload;  // signup and q1, and busy if it ran
  EXPECT_GE(what["history"], 1) << deleted.payload;
  const auto busy = result("dora", "busy");
  EXPECT_TRUE(busy.value("finish_reason", "") == "cancelled" ||
              busy.value("finish_reason", "") == "length" ||
              busy["error"]["code"] == "user_deleted")
      << busy.dump();
  EXPECT_EQ(events_of("dora", "busy", "inference.result").size(), 1u);

  EXPECT_FALSE(fs::exists(artifact)) << "the adapter's file is kept";
  EXPECT_FALSE(fs::exists(fs::path(artifact).parent_path()));
  EXPECT_EQ(json::parse(engine_->get("/v1/users/dora/models").second).size(), 0u);
  EXPECT_TRUE(json::parse(engine_->get("/v1/users/dora/history").second)["entries"].empty());
  EXPECT_EQ(engine_->get("/v1/jobs/" + job).first, 404);
  auto on_state = [&](const std::string& key, bool tombstone) {
    return wait_until(
        [&] {
          for (const auto& r : state.snapshot())
            if (r.key == key && r.tombstone == tombstone) return true;
          return false;
        },
        30s);
  };
  EXPECT_TRUE(on_state(models["dora"], true)) << "no tombstone of the model";
  EXPECT_TRUE(on_state("job/" + job, true)) << "no tombstone of the job";
  EXPECT_TRUE(on_state("user/dora", false)) << "no erasure record";
  EXPECT_EQ(labelled("tailor_users_deleted_total", "by", "here"), 1);
  const auto metrics = engine_->get("/metrics").second;
  EXPECT_EQ(metrics.find("user=\"dora\""), std::string::npos) << "her id stays on /metrics";
  EXPECT_EQ(metrics.find(models["dora"]), std::string::npos);

  // Sent before the deletion, read after it: refused, and kept nowhere.
  send_inference(ask("dora", "late", "hi", 1), sent_before);
  in_->flush();
  EXPECT_EQ(result("dora", "late")["error"]["code"], "user_deleted");
  EXPECT_EQ(answer_to(ask("dora", "q2", "hi", 1))["error"]["code"], "no_ready_model");
  const auto eli = answer_to(ask("eli", "q1", "Who are you?", 7));
  EXPECT_FALSE(eli.contains("error")) << eli.dump();
  EXPECT_EQ(eli["model_id"], models["eli"]);
  EXPECT_EQ(json::parse(engine_->get("/v1/users/eli/history").second)["entries"].size(), 1u);

  // The deletion read again is answered as the first time.
  send_control(deletion);
  in_->flush();
  ASSERT_TRUE(
      wait_until([&] { return events_of("dora", "del1", "user.deleted").size() >= 2; }, 30s));
  const auto both = events_of("dora", "del1", "user.deleted");
  EXPECT_EQ(both[0].payload, both[1].payload);
  // Signing up again, even with the same request id, makes a new model.
  send_onboarding(signup("dora", 3));
  in_->flush();
  ASSERT_TRUE(wait_until([&] { return events_of("dora", "signup", "model.ready").size() >= 2; },
                         120s));
  EXPECT_TRUE(fs::exists(artifact));
  const auto again = answer_to(ask("dora", "q3", "Who are you?", 7));
  EXPECT_FALSE(again.contains("error")) << again.dump();
  EXPECT_EQ(engine_->stop(), 0);
}

// A deletion read while the user has requests running and waiting ends them
// (cancelled), waits for their answers to be stored, and then deletes those
// too: every request is answered once, and nothing of them is kept.
TEST_F(ServingTest, ADeletionEndsTheUsersRunningRequestsFirstAndKeepsNoneOfThem) {
  start({{"max_in_flight", 4000},
         {"serving", {{"max_batch", 1}, {"max_requests_per_user", 4000}}}});
  ASSERT_FALSE(HasFatalFailure());
  onboard_all({"hal"});
  constexpr int n = 1500;
  send_backlog("hal", "w", n, 50);
  ASSERT_FALSE(HasFatalFailure());
  send_control(
      {{"type", "user.delete"}, {"schema_version", 1}, {"user_id", "hal"}, {"request_id", "d"}});
  in_->flush();
  const auto deleted = await_event("hal", "d", "user.deleted", 120s);
  ASSERT_FALSE(HasFailure());
  int cancelled = 0;
  for (int i = 0; i < n; ++i) {
    const auto answers = events_of("hal", "w" + std::to_string(i), "inference.result");
    ASSERT_EQ(answers.size(), 1u) << "w" << i;
    const auto reason = answers[0].value.value("finish_reason", "");
    EXPECT_TRUE(reason == "length" || reason == "cancelled") << answers[0].payload;
    cancelled += reason == "cancelled";
  }
  EXPECT_GT(cancelled, 0) << "the deletion waited for the backlog instead of ending it";
  // Each answer was stored before the deletion went on, and went with it.
  EXPECT_EQ(deleted.value["deleted"]["requests"], n + 1) << deleted.payload;  // and the signup
  EXPECT_EQ(deleted.value["deleted"]["history"], n) << deleted.payload;
  EXPECT_TRUE(json::parse(engine_->get("/v1/users/hal/history").second)["entries"].empty());
}

// A deletion cut short by a crash between the user's files and records
// goes on when its event is read again at the next start, and is answered
// once.
TEST_F(ServingTest, ADeletionCutShortByACrashEndsAtTheNextStart) {
  start_with_fault("TAILOR_FAULT_ERASE", "1");
  ASSERT_FALSE(HasFatalFailure());
  auto models = onboard_all({"ida"});
  auto listed = json::parse(engine_->get("/v1/users/ida/models").second);
  ASSERT_EQ(listed.size(), 1u);
  const std::string artifact = listed[0]["artifact_path"];
  send_control(
      {{"type", "user.delete"}, {"schema_version", 1}, {"user_id", "ida"}, {"request_id", "d"}});
  in_->flush();
  const int status = engine_->wait_exit(60s);
  ASSERT_NE(status, -1) << "the fault did not end tailord:\n" << engine_->log_tail(40);
  EXPECT_FALSE(fs::exists(artifact)) << "killed before the files went";
  EXPECT_TRUE(events_of("ida", "d", "user.deleted").empty()) << "answered before its records went";
  engine_->start();
  ASSERT_FALSE(HasFatalFailure());
  const auto deleted = await_event("ida", "d", "user.deleted");
  ASSERT_FALSE(HasFailure());
  EXPECT_EQ(deleted.value["deleted"]["models"], 1) << deleted.payload;
  EXPECT_EQ(deleted.value["deleted"]["jobs"], 1) << deleted.payload;
  EXPECT_EQ(json::parse(engine_->get("/v1/users/ida/models").second).size(), 0u);
  EXPECT_EQ(events_of("ida", "d", "user.deleted").size(), 1u);
  EXPECT_EQ(engine_->stop(), 0);
}

// The other instances of a group delete what they kept of a user deleted
// on the instance that holds the user's partition, and a restart, which
// reads the state topic again, brings none of it back.
TEST_F(ServingTest, ADeletionReachesEveryInstanceOfTheGroup) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  auto models = onboard_all({"gus"});
  engine_process second("second", {{"artifact_dir", engine_->data_dir() + "/data/artifacts"}});
  second.join_group_of(*engine_);
  second.start();
  ASSERT_FALSE(HasFatalFailure());
  ASSERT_TRUE(lists(second, "gus", models["gus"]));
  send_control(
      {{"type", "user.delete"}, {"schema_version", 1}, {"user_id", "gus"}, {"request_id", "d"}});
  in_->flush();
  const auto deleted = await_event("gus", "d", "user.deleted");
  ASSERT_FALSE(HasFailure());
  EXPECT_EQ(deleted.value["deleted"]["models"], 1) << deleted.payload;
  auto by = [&](const std::string& who) {
    return labelled_of(*engine_, "tailor_users_deleted_total", "by", who) +
           labelled_of(second, "tailor_users_deleted_total", "by", who);
  };
  EXPECT_EQ(by("here"), 1);
  EXPECT_TRUE(wait_until([&] { return by("another") == 1; }, 30s))
      << "the instance that did not delete the user kept their model";
  EXPECT_FALSE(lists(*engine_, "gus", models["gus"]));
  EXPECT_FALSE(lists(second, "gus", models["gus"]));
  ASSERT_EQ(second.stop(), 0);
  second.start();
  ASSERT_FALSE(HasFatalFailure());
  EXPECT_FALSE(lists(second, "gus", models["gus"])) << "the state topic brought it back";
  EXPECT_EQ(labelled_of(second, "tailor_users_deleted_total", "by", "another"), 0)
      << "the erasure, read again, deleted something again";
  EXPECT_EQ(second.stop(), 0);
}

// A state follower that fails (here on its first record) is started again
// and reads the topic again from its beginning; the instance serves only
// once a follower has read it all.
TEST_F(ServingTest, AStateFollowerThatFailsIsRestartedAndReadsTheTopicAgain) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  auto models = onboard_all({"ann"});
  engine_process second("second", {{"artifact_dir", engine_->data_dir() + "/data/artifacts"}});
  second.join_group_of(*engine_);
  ::setenv("TAILOR_FAULT_STATE", "1", 1);  // read by tailord as it starts
  second.start();
  ::unsetenv("TAILOR_FAULT_STATE");
  ASSERT_FALSE(HasFatalFailure());
  EXPECT_TRUE(lists(second, "ann", models["ann"]));
  const auto m = second.get("/metrics").second;
  EXPECT_NE(m.find("\ntailor_state_follower_restarts_total 1\n"), std::string::npos) << m;
  EXPECT_NE(second.log_tail(200).find("fault injected by TAILOR_FAULT_STATE"), std::string::npos);
  EXPECT_EQ(second.stop(), 0);
}

TEST_F(ServingTest, ConcurrentRequestsAreBatchedAndEachEqualsItsResultAlone) {
  // A realtime batch loop where this machine allows it: the policy changes
  // when steps run, never what they compute.
  start({{"serving", {{"max_batch", 64}, {"batch_thread", "realtime"}}}});
  ASSERT_FALSE(HasFatalFailure());
  std::vector<std::string> users;
  for (int i = 0; i < 16; ++i) users.push_back("u" + std::to_string(i));
  auto models = onboard_all(users);
  for (int i = 0; i < 64; ++i)
    send_inference(ask(users[i % 16], "b" + std::to_string(i), "Tell me something.", 100 + i));
  in_->flush();
  std::map<int, std::string> batched;
  for (int i = 0; i < 64; ++i) {
    auto r = result(users[i % 16], "b" + std::to_string(i));
    ASSERT_FALSE(r.contains("error")) << r.dump();
    batched[i] = r["text"];
  }
  EXPECT_GT(metric("tailor_serving_batch_max"), 1) << "requests of different users shared a step";
  // Every answer counted once for its user and its model, before it was published.
  for (const auto& u : users) {
    EXPECT_EQ(metric("tailor_user_requests_total{user=\"" + u + "\"}"), 4) << u;
    EXPECT_EQ(metric("tailor_model_requests_total{model=\"" + models[u] + "\"}"), 4) << u;
  }
  // By default the device computes its products with the best kernel this
  // CPU has (serving.products auto: AMX's tiles where it has them), and
  // says which: the one whose texts must not depend on the batch.
  namespace tm = tailor::model;
  const std::string products =
      tm::product_name(tm::runnable_products(tm::product_kind::amx));
  EXPECT_EQ(metric("tailor_serving_products{device=\"tailor-test/0\",products=\"" + products +
                   "\"}"),
            1);
  // Each request again, alone: the same text (same seed, whatever shared the batch).
  for (int i = 0; i < 64; ++i) {
    send_inference(ask(users[i % 16], "alone" + std::to_string(i), "Tell me something.", 100 + i));
    in_->flush();
    auto r = result(users[i % 16], "alone" + std::to_string(i));
    EXPECT_EQ(r["text"], batched[i]) << "request " << i;
  }
  // The same prompt again and again: all but its last token came from the
  // prefix cache (first prefilled, then reused, and the texts are equal).
  EXPECT_GT(labelled("tailor_prompt_tokens_total", "source", "reused"), 0);
  EXPECT_GT(labelled("tailor_prompt_tokens_total", "source", "computed"), 0);
  // What the cache holds is on view, within its budget (128 MB by default).
  const auto held = labelled("tailor_prefix_cache_bytes", "device", "tailor-test/0");
  EXPECT_GT(held, 0);
  EXPECT_LE(held, 128 << 20);
  // The loop runs realtime exactly when the machine allows it, and says so;
  // the time its thread ran on a core is on view.
  const bool realtime = may_run_realtime();
  EXPECT_EQ(labelled("tailor_batch_thread_realtime", "device", "tailor-test/0"), realtime ? 1 : 0);
  const auto policies = thread_policies(engine_->pid());
  EXPECT_EQ(threads_with(policies, SCHED_FIFO), realtime ? 1 : 0);
  // The device's step helper (serving.step_helper) runs only where a core idles.
  EXPECT_EQ(threads_with(policies, SCHED_IDLE), 1);
  // By default (auto) its first trial starts with it: the full steps above
  // were big enough for it, and it took part in some of them.
  const auto eligible =
      labelled("tailor_step_helper_eligible_steps_total", "device", "tailor-test/0");
  const auto helped = labelled("tailor_step_helper_steps_total", "device", "tailor-test/0");
  EXPECT_GT(eligible, 0);
  EXPECT_GT(helped, 0);
  EXPECT_LE(helped, eligible);
  // Every other thread runs SCHED_BATCH (compute.scheduling), started after it was set.
  int all = 0;
  for (const auto& [policy, n] : policies) all += n;
  EXPECT_EQ(threads_with(policies, SCHED_BATCH), all - (realtime ? 1 : 0) - 1);
  const auto m = engine_->get("/metrics").second;
  const std::string running =
      "\ntailor_batch_thread_seconds_total{device=\"tailor-test/0\",state=\"running\"} ";
  const auto at = m.find(running);
  ASSERT_NE(at, std::string::npos) << m;
  EXPECT_GT(std::stod(m.substr(at + running.size())), 0.0);
}

TEST_F(ServingTest, AColdAdapterIsLoadedAndLaterEvictedUnderCapacityPressure) {
  start({{"serving", {{"device_adapters", 2}, {"host_adapters", 1}}}});
  ASSERT_FALSE(HasFatalFailure());
  std::vector<std::string> users = {"c0", "c1", "c2", "c3"};
  onboard_all(users);
  int n = 0;
  for (int round = 0; round < 2; ++round)
    for (const auto& u : users) {
      auto id = "r" + std::to_string(n++);
      send_inference(ask(u, id, "hi", 1, 4));
      in_->flush();
      auto r = result(u, id);
      ASSERT_FALSE(r.contains("error")) << r.dump();
      if (round == 0) {
        EXPECT_GT(r["timings_ms"]["adapter_load"].get<double>(), 0.0);
      }
    }
  EXPECT_EQ(labelled("tailor_adapter_cache_misses_total", "tier", "device"), 8)
      << "two places for four adapters: every request found its adapter evicted";
  EXPECT_GE(labelled("tailor_adapter_cache_evictions_total", "tier", "device"), 6);
  EXPECT_GE(labelled("tailor_adapter_cache_evictions_total", "tier", "host"), 3);
  EXPECT_EQ(labelled("tailor_adapter_cache_loads_total", "tier", "disk"), 8);
  // A hot adapter is a hit.
  send_inference(ask("c3", "hot", "hi", 1, 4));
  in_->flush();
  auto r = result("c3", "hot");
  EXPECT_EQ(labelled("tailor_adapter_cache_hits_total", "tier", "device"), 1);
  EXPECT_EQ(r["timings_ms"]["adapter_load"], 0.0);
  EXPECT_EQ(labelled("tailor_model_requests_total", "model", r["model_id"]), 3);
  EXPECT_EQ(labelled("tailor_user_requests_total", "user", "c3"), 3);
  // Their latency, by whether they waited for the adapter (observed at the
  // delivery report, which may come after the result is read); and the
  // four sign-ups' time to a model.
  auto latencies = [&](const char* adapter) {
    return labelled("tailor_inference_latency_ms_count", "adapter", adapter);
  };
  EXPECT_TRUE(wait_until([&] { return latencies("loaded") == 8 && latencies("resident") == 1; },
                         10s))
      << latencies("loaded") << " loaded, " << latencies("resident") << " resident";
  EXPECT_TRUE(wait_until(
      [&] { return labelled("tailor_job_duration_seconds_count", "status", "ready") == 4; }, 10s));
  // The least recently used adapter leaves, not the one placed first: c2
  // was placed before c3, but used after it, so c0 takes c3's place.
  auto ask_and_count = [&](const std::string& user, const std::string& id) {
    send_inference(ask(user, id, "hi", 1, 4));
    in_->flush();
    auto res = result(user, id);
    EXPECT_FALSE(res.contains("error")) << res.dump();
    return std::pair{labelled("tailor_adapter_cache_hits_total", "tier", "device"),
                     labelled("tailor_adapter_cache_misses_total", "tier", "device")};
  };
  EXPECT_EQ(ask_and_count("c2", "lru1"), std::pair(2.0, 8.0));
  EXPECT_EQ(ask_and_count("c0", "lru2"), std::pair(2.0, 9.0));
  EXPECT_EQ(ask_and_count("c2", "lru3"), std::pair(3.0, 9.0)) << "c2 was evicted, not c3";
  EXPECT_EQ(ask_and_count("c3", "lru4"), std::pair(3.0, 10.0));
}

TEST_F(ServingTest, ACorruptedAdapterGivesAnErrorResultNotACrash) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  onboard_all({"broken", "fine"});
  auto models = json::parse(engine_->get("/v1/users/broken/models").second);
  std::string path = models[0]["artifact_path"];
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(fs::file_size(path) / 2));
    f.write("garbage!", 8);
  }
  send_inference(ask("broken", "q", "hello", 1));
  send_inference(ask("fine", "q", "hello", 1));
  in_->flush();
  auto bad = result("broken", "q");
  EXPECT_EQ(bad["error"]["code"], "adapter_unavailable") << bad.dump();
  EXPECT_NE(bad["error"]["message"].get<std::string>().find("checksum"), std::string::npos);
  auto good = result("fine", "q");
  EXPECT_FALSE(good.contains("error")) << good.dump();
  EXPECT_EQ(engine_->get("/healthz").first, 200);
}

// An adapter of a higher rank than the device's bank (one registered
// before serving.max_rank was lowered, say) cannot be placed: each request
// for it gets an error result, again on a later request, and other users
// are served meanwhile.
TEST_F(ServingTest, AnAdapterTooLargeForTheBankGivesAnErrorResultEachTime) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  onboard_all({"fine"});
  ASSERT_EQ(engine_->stop(), 0);
  {
    auto cfg = tailor::model::named_config("tailor-test");
    ASSERT_TRUE(cfg);
    tailor::model::lora_config lc;
    lc.rank = 32;  // the bank's is 16
    auto ad = tailor::model::lora_adapter::init(*cfg, lc, 7);
    auto bytes = tailor::model::encode_adapter(ad, *cfg);
    ASSERT_TRUE(bytes);
    auto db = tailor::storage::metadata_store::open(engine_->data_dir() + "/data/metadata");
    ASSERT_TRUE(db);
    auto m = tailor::storage::register_ready_adapter(**db, engine_->data_dir() + "/data/artifacts",
                                                     "big", "model-big", "tailor-test", *bytes);
    ASSERT_TRUE(m) << caf::to_string(m.error());
  }
  engine_->start();
  ASSERT_FALSE(HasFatalFailure());
  for (const std::string round : {"1", "2"}) {
    send_inference(ask("big", "q" + round, "hello", 1));
    send_inference(ask("fine", "q" + round, "hello", 1));
    in_->flush();
    auto bad = result("big", "q" + round);
    EXPECT_EQ(bad["error"]["code"], "adapter_unavailable") << bad.dump();
    EXPECT_NE(bad["error"]["message"].get<std::string>().find("does not fit"), std::string::npos)
        << bad.dump();
    auto good = result("fine", "q" + round);
    EXPECT_FALSE(good.contains("error")) << good.dump();
  }
  EXPECT_EQ(engine_->get("/healthz").first, 200);
}

TEST_F(ServingTest, AHeavyUserOverQuotaIsRefusedWhileOthersAreServed) {
  start({{"serving", {{"max_requests_per_user", 2}, {"max_batch", 1}}}});
  ASSERT_FALSE(HasFatalFailure());
  onboard_all({"heavy", "light"});
  for (int i = 0; i < 10; ++i) send_inference(ask("heavy", "h" + std::to_string(i), "go", i, 60));
  send_inference(ask("light", "l", "go", 1, 10));
  in_->flush();
  auto light = result("light", "l");
  EXPECT_FALSE(light.contains("error")) << light.dump();
  int refused = 0, served = 0;
  for (int i = 0; i < 10; ++i) {
    auto r = result("heavy", "h" + std::to_string(i));
    if (r.contains("error")) {
      EXPECT_EQ(r["error"]["code"], "quota_exceeded");
      ++refused;
    } else {
      ++served;
    }
  }
  EXPECT_GE(refused, 1);
  EXPECT_GE(served, 2);
}

// Least service first (S-LoRA's virtual token counter): a user who comes
// while another has a long backlog queued is served next, not after it.
TEST_F(ServingTest, ARequestIsNotQueuedBehindAnotherUsersBacklog) {
  start({{"max_in_flight", 4000},
         {"serving", {{"max_batch", 1}, {"max_requests_per_user", 4000}}}});
  ASSERT_FALSE(HasFatalFailure());
  onboard_all({"heavy", "light"});
  const int backlog = 1500;
  send_backlog("heavy", "h", backlog, 500);
  ASSERT_FALSE(HasFatalFailure());
  send_inference(ask("light", "l", "go", 1, 60));
  in_->flush();
  auto light = result("light", "l");
  EXPECT_FALSE(light.contains("error")) << light.dump();
  // Heavy results that came out before the light one, in the order they
  // came: counted after the fact, as the backlog goes on draining while a
  // count runs.
  int answered = 0;
  for (const auto& rec : out_->snapshot()) {
    if (rec.value.value("type", "") != "inference.result") continue;
    if (rec.value.value("user_id", "") == "light") break;
    if (rec.value.value("user_id", "") == "heavy") ++answered;
  }
  // In arrival order the light request would wait for all of them.
  EXPECT_LE(answered, backlog - 300) << "the light request waited for the heavy backlog";
}

TEST_F(ServingTest, ACancelledRequestEndsWithCancelled) {
  // One place in the bank: while the busy user has requests queued, the
  // victim's adapter cannot be placed and the victim waits. The backlog
  // must outlast the cancel's trip through Kafka: 1500 requests of 60
  // steps are ~3.5 s of steps of the test model (300 were 0.7 s, and once
  // the cancel came later).
  // All busy requests and the victim in flight at once: no ingress pause.
  start({{"max_in_flight", 4000},
         {"serving", {{"max_batch", 1}, {"device_adapters", 1}, {"max_requests_per_user", 4000}}}});
  ASSERT_FALSE(HasFatalFailure());
  onboard_all({"busy", "victim"});
  const auto device = "tailor-test/0";
  send_backlog("busy", "w", 1500, 50);
  ASSERT_FALSE(HasFatalFailure());
  // The busy adapter is resident by now: the only device miss to come is the victim's.
  const double misses = labelled("tailor_adapter_cache_misses_total", "tier", "device");
  send_inference(ask("victim", "v", "go", 1, 60));
  in_->flush();
  ASSERT_TRUE(wait_until(
      [&] { return labelled("tailor_adapter_cache_misses_total", "tier", "device") >= misses + 1; },
      30s));
  ASSERT_TRUE(events_of("victim", "v", "inference.result").empty()) << "the victim ran already";
  // The bank's one place holds the busy adapter; the victim's waits for one.
  EXPECT_EQ(labelled("tailor_bank_places_used", "device", device), 1);
  EXPECT_EQ(labelled("tailor_bank_adapters_unplaced", "device", device), 1);
  send_control({{"type", "inference.cancel"},
                {"schema_version", 1},
                {"user_id", "victim"},
                {"request_id", "v"}});
  in_->flush();
  auto r = result("victim", "v", 60s);
  EXPECT_EQ(r["finish_reason"], "cancelled") << r.dump();
  EXPECT_FALSE(r.contains("error"));
  // Nobody waits for the victim's adapter any more: the device keeps nothing
  // of it (each such user used to stay in its map for good).
  EXPECT_TRUE(wait_until(
      [&] { return labelled("tailor_bank_adapters_unplaced", "device", device) == 0; }, 10s));
  EXPECT_EQ(labelled("tailor_bank_places_used", "device", device), 1);
}

// A cancel and its request come on different topics, so the cancel may be
// read first: the request then ends as cancelled when it comes, without
// running, and is stored so (a repeat gets the same answer). The user's
// other requests are not touched.
TEST_F(ServingTest, ACancelReadBeforeItsRequestEndsItAsCancelled) {
  start();
  ASSERT_FALSE(HasFatalFailure());
  onboard_all({"ann"});
  send_cancel_first("ann", "early");
  ASSERT_FALSE(HasFatalFailure());
  auto long_request = [&](const std::string& id) { return long_ask("ann", id); };
  auto early = answer_to(long_request("early"));
  EXPECT_FALSE(early.contains("error")) << early.dump();
  EXPECT_EQ(early["finish_reason"], "cancelled") << early.dump();
  EXPECT_EQ(early["text"], "") << early.dump();
  EXPECT_FALSE(early["model_id"].get<std::string>().empty()) << early.dump();
  expect_repeat_gets_the_stored_result(long_request("early"));
  // The user's next request runs to its end.
  auto other = answer_to(long_request("other"));
  EXPECT_EQ(other["finish_reason"], "length") << other.dump();
  EXPECT_EQ(other["usage"]["completion_tokens"], 58) << other.dump();
}

// A cancel can be read minutes before its request (backpressure holds
// inference, not control). The user actor keeps it past its idle time and
// is not retired meanwhile; once the cancelled answer is stored it lets go
// of it, and is retired like any idle actor.
TEST_F(ServingTest, AKeptCancelOutlastsItsUsersIdleTime) {
  start({{"user_idle_seconds", 1}});
  ASSERT_FALSE(HasFatalFailure());
  onboard_all({"ann"});
  send_cancel_first("ann", "late");
  ASSERT_FALSE(HasFatalFailure());
  // A clock: three other users come and go one after another, each retired
  // two idle checks after its event, so by the end an idle ann would have
  // been retired (two checks after the cancel) long before.
  for (int k = 0; k < 3; ++k) {
    const auto clock = "clock" + std::to_string(k);
    auto r = answer_to(inference(clock, "tick"));
    ASSERT_EQ(r["error"]["code"], "no_ready_model") << r.dump();
    ASSERT_TRUE(wait_until([&] { return metric("tailor_user_actors") <= 1; }, 30s));
  }
  EXPECT_EQ(metric("tailor_user_actors"), 1) << "ann's actor, which kept the cancel, was retired";
  auto late = answer_to(long_ask("ann", "late"));
  EXPECT_EQ(late["finish_reason"], "cancelled") << late.dump();
  EXPECT_EQ(late["text"], "") << late.dump();
  ASSERT_TRUE(wait_until([&] { return metric("tailor_user_actors") == 0; }, 30s))
      << "the actor kept the cancel after its answer was stored";
  expect_repeat_gets_the_stored_result(long_ask("ann", "late"));
}

// No request waits forever: one not finished within serving.deadline_ms ends
// with finish_reason deadline (with its text so far, none if it never ran),
// each gets exactly one answer, and the device goes on serving after them.
TEST_F(ServingTest, RequestsPastTheirDeadlineEndWithDeadlineAndTheDeviceGoesOn) {
  // One row at a time and a backlog of ~3.5 s of steps (as in the cancel
  // test): most of it waits beyond the 250 ms deadline.
  start({{"max_in_flight", 4000},
         {"serving", {{"max_batch", 1}, {"max_requests_per_user", 4000}, {"deadline_ms", 250}}}});
  ASSERT_FALSE(HasFatalFailure());
  onboard_all({"slow", "fresh"});
  const int backlog = 1500, tokens = 60;
  for (int i = 0; i < backlog; ++i) {
    auto j = ask("slow", "s" + std::to_string(i), "go", i, tokens);
    j["ignore_end_of_text"] = true;
    send_inference(j);
  }
  in_->flush();
  auto slow_results = [&] {
    return out_->matching(engine_->topics().results, [](const json& v) {
      return v.value("type", "") == "inference.result" && v.value("user_id", "") == "slow";
    });
  };
  ASSERT_TRUE(wait_until([&] { return slow_results().size() >= backlog; }, 120s))
      << slow_results().size() << " of " << backlog << " answered";
  std::map<std::string, int> reasons, answers;
  for (const auto& r : slow_results()) {
    const auto& v = r.value;
    ++answers[v.value("request_id", "")];
    EXPECT_FALSE(v.contains("error")) << v.dump();
    const auto reason = v.value("finish_reason", "");
    ++reasons[reason];
    const int made = v["usage"].value("completion_tokens", -1);
    if (reason == "deadline")
      EXPECT_LT(made, tokens) << v.dump();
    else
      EXPECT_EQ(made, tokens) << v.dump();
  }
  EXPECT_EQ(answers.size(), static_cast<std::size_t>(backlog));
  for (const auto& [id, n] : answers) EXPECT_EQ(n, 1) << id << " answered " << n << " times";
  EXPECT_GT(reasons["deadline"], 0) << "the backlog did not outlast the deadline";
  // The ended requests hold no row and none waits: a request now runs to its
  // end, well within the deadline.
  const auto device = "tailor-test/0";
  EXPECT_TRUE(wait_until(
      [&] {
        return labelled("tailor_serving_active", "device", device) == 0 &&
               labelled("tailor_serving_waiting", "device", device) == 0;
      },
      10s));
  auto f = ask("fresh", "f", "go", 1, tokens);
  f["ignore_end_of_text"] = true;
  send_inference(f);
  in_->flush();
  auto fresh = result("fresh", "f");
  EXPECT_FALSE(fresh.contains("error")) << fresh.dump();
  EXPECT_EQ(fresh["usage"]["completion_tokens"], tokens) << fresh.dump();
}

// A batch step that throws, as LibTorch does when memory runs out, costs the
// requests in it an error result, not the device: requests after it are
// served, and every request gets exactly one answer. The fault is injected
// (TAILOR_FAULT_STEP): nothing a request can send makes a step throw.
TEST_F(ServingTest, AFailedBatchStepGivesItsRequestsAnErrorAndTheDeviceGoesOn) {
  start_with_fault("TAILOR_FAULT_STEP", "3");
  ASSERT_FALSE(HasFatalFailure());
  onboard_all({"ann", "bob"});
  // Two tokens at most: done within the first two steps.
  send_inference(ask("ann", "before", "hello", 7, 2));
  in_->flush();
  auto before = result("ann", "before");
  ASSERT_FALSE(before.contains("error")) << before.dump();
  const std::vector<std::string> users = {"ann", "bob"};
  for (int i = 0; i < 8; ++i)
    send_inference(ask(users[i % 2], "q" + std::to_string(i), "hello", i));
  in_->flush();
  int errors = 0;
  for (int i = 0; i < 8; ++i) {
    auto r = result(users[i % 2], "q" + std::to_string(i));
    if (!r.contains("error")) {
      EXPECT_FALSE(r["finish_reason"].get<std::string>().empty()) << r.dump();
      continue;
    }
    ++errors;
    EXPECT_EQ(r["error"]["code"], "internal") << r.dump();
    EXPECT_NE(r["error"]["message"].get<std::string>().find("batch step failed"),
              std::string::npos)
        << r.dump();
  }
  // The third step with rows failed: one of these requests' steps.
  EXPECT_GE(errors, 1);
  EXPECT_EQ(labelled("tailor_serving_step_failures_total", "device", "tailor-test/0"), 1);
  // The device goes on with the same base and adapters: the first request
  // sent again under a new id gets the same text.
  send_inference(ask("ann", "after", "hello", 7, 2));
  in_->flush();
  auto after = result("ann", "after");
  ASSERT_FALSE(after.contains("error")) << after.dump();
  EXPECT_EQ(after["text"], before["text"]);
  for (int i = 0; i < 8; ++i)
    EXPECT_EQ(events_of(users[i % 2], "q" + std::to_string(i), "inference.result").size(), 1u)
        << "request q" << i;
  EXPECT_EQ(engine_->get("/healthz").first, 200);
}

// A GPU actor that fails outside a batch step (an exception while placing
// an adapter, as running out of memory there would) is started afresh in
// its place, and the requests it held are sent again and served: none hangs,
// none is lost, none is answered twice. The fault is injected
// (TAILOR_FAULT_PLACE=2: the second placement of the process throws).
TEST_F(ServingTest, ADeviceThatFailsIsRestartedAndTheRequestsItHeldAreServed) {
  start_with_fault("TAILOR_FAULT_PLACE", "2");
  ASSERT_FALSE(HasFatalFailure());
  onboard_all({"ann", "bob"});
  // Some 800 steps before the failure, and a few after it: the device's
  // busy time must not go back when a fresh actor takes its place.
  for (int i = 0; i < 4; ++i) {
    auto long_one = ask("ann", "long" + std::to_string(i), "hello", 7, 200);
    long_one["ignore_end_of_text"] = true;
    ASSERT_FALSE(answer_to(long_one).contains("error"));
  }
  auto before = answer_to(ask("ann", "before", "hello", 7, 4));
  ASSERT_FALSE(before.contains("error")) << before.dump();
  const auto device = "tailor-test/0";
  const double busy_before = labelled("tailor_serving_busy_seconds_total", "device", device);
  ASSERT_GT(busy_before, 0.0);
  // Bob's adapter is the second placement: the device fails with his
  // request, and perhaps Ann's, in it.
  send_inference(ask("ann", "during", "hello", 7, 4));
  send_inference(ask("bob", "q", "hello", 7, 4));
  in_->flush();
  auto during = result("ann", "during");
  auto q = result("bob", "q");
  EXPECT_FALSE(during.contains("error")) << during.dump();
  EXPECT_FALSE(q.contains("error")) << q.dump();
  // The fresh device has the same base: the same request, the same text.
  EXPECT_EQ(during["text"], before["text"]);
  EXPECT_EQ(labelled("tailor_serving_device_restarts_total", "device", device), 1);
  EXPECT_GE(labelled("tailor_serving_busy_seconds_total", "device", device), busy_before)
      << "the fresh actor's busy time started from zero";
  // Answered once each, and nothing left waiting or running on the device.
  EXPECT_EQ(events_of("ann", "during", "inference.result").size(), 1u);
  EXPECT_EQ(events_of("bob", "q", "inference.result").size(), 1u);
  EXPECT_TRUE(wait_until(
      [&] {
        return labelled("tailor_serving_active", "device", device) == 0 &&
               labelled("tailor_serving_waiting", "device", device) == 0;
      },
      10s));
  EXPECT_EQ(engine_->get("/healthz").first, 200);
}

// A request in the device each of the three times it failed is not sent
// again: it gets an `internal` error result, once, and the engine goes on
// (the delays between the restarts are RestartBackoff's). The fault is
// injected (TAILOR_FAULT_PLACE=1+: every placement throws).
TEST_F(ServingTest, ARequestInThreeFailuresOfItsDeviceGetsAnErrorResult) {
  start_with_fault("TAILOR_FAULT_PLACE", "1+");
  ASSERT_FALSE(HasFatalFailure());
  onboard_all({"ann"});
  auto q = answer_to(ask("ann", "q", "hello", 7));
  ASSERT_TRUE(q.contains("error")) << q.dump();
  EXPECT_EQ(q["error"]["code"], "internal") << q.dump();
  EXPECT_NE(q["error"]["message"].get<std::string>().find("failed 3 times"), std::string::npos)
      << q.dump();
  EXPECT_EQ(labelled("tailor_serving_device_restarts_total", "device", "tailor-test/0"), 3);
  // The stored answer stands: a repeat gets it again, byte for byte, and the
  // device is not failed a fourth time.
  expect_repeat_gets_the_stored_result(ask("ann", "q", "hello", 7));
  EXPECT_EQ(labelled("tailor_serving_device_restarts_total", "device", "tailor-test/0"), 3);
  EXPECT_EQ(engine_->get("/healthz").first, 200);
}

// A load from disk that throws (LibTorch running out of memory while the
// loader packs an adapter, say) fails that load's request with an error
// result, and the loader, which every cold adapter goes through, goes on:
// the same adapter loads on the next request, and another user's too. No
// host tier here, so that no prefetch takes the faulty load. The fault is
// injected (TAILOR_FAULT_LOAD=1: the first load from disk throws).
TEST_F(ServingTest, AnAdapterLoadThatThrowsFailsItsRequestAndTheLoaderGoesOn) {
  start_with_fault("TAILOR_FAULT_LOAD", "1", {{"serving", {{"host_adapters", 0}}}});
  ASSERT_FALSE(HasFatalFailure());
  onboard_all({"ann", "bob"});
  auto first = answer_to(ask("ann", "first", "hello", 7));
  ASSERT_TRUE(first.contains("error")) << first.dump();
  EXPECT_EQ(first["error"]["code"], "adapter_unavailable") << first.dump();
  EXPECT_NE(first["error"]["message"].get<std::string>().find("loading its adapter failed"),
            std::string::npos)
      << first.dump();
  for (const std::string user : {"ann", "bob"}) {
    auto next = answer_to(ask(user, "next", "hello", 7));
    EXPECT_FALSE(next.contains("error")) << next.dump();
  }
  EXPECT_EQ(labelled("tailor_adapter_cache_loads_total", "tier", "disk"), 2)
      << "the two loads after the faulty one";
  EXPECT_EQ(engine_->get("/healthz").first, 200);
}
