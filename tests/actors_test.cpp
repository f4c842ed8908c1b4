// Actor-layer parts that need no broker: training data resolution,
// configuration checks, the host tier of the adapter cache, how job actors
// end when the engine stops, and the ingress's timeout for answers.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/scoped_actor.hpp>
#include <chrono>
#include <deque>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <nlohmann/json.hpp>
#include <thread>

#include "actors/config.hpp"
#include "actors/engine.hpp"
#include "actors/fair_shares.hpp"
#include "actors/gpu.hpp"
#include "actors/health.hpp"
#include "actors/kafka.hpp"
#include "actors/metrics.hpp"
#include "actors/reply_watch.hpp"
#include "actors/state_follower.hpp"
#include "actors/training_data.hpp"
#include "actors/training_pool.hpp"
#include "model/transformer.hpp"
#include "storage/metadata_store.hpp"

using namespace tailor::actors;
using tailor::messages::errc;
namespace fs = std::filesystem;

namespace {

class TrainingData : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("tailor-data-" + std::to_string(::getpid()));
    fs::create_directories(dir_ / "root" / "sub");
    root_ = (dir_ / "root").string();
  }
  void TearDown() override { fs::remove_all(dir_); }
  void write(const fs::path& p, const std::string& text) { std::ofstream(p) << text; }
  static errc code(const caf::error& e) { return static_cast<errc>(e.code()); }

  fs::path dir_;
  std::string root_;
};

}  // namespace

TEST_F(TrainingData, ResolvesFilesInsideTheDirectoryOnly) {
  write(dir_ / "root" / "sub" / "a.txt", "x");
  write(dir_ / "outside.txt", "y");
  auto ok = resolve_data_ref(root_, "sub/a.txt");
  ASSERT_TRUE(ok);
  EXPECT_EQ(*ok, fs::canonical(dir_ / "root" / "sub" / "a.txt").string());
  EXPECT_TRUE(resolve_data_ref(root_, "sub/../sub/a.txt"));
  EXPECT_EQ(code(resolve_data_ref(root_, "../outside.txt").error()), errc::path_escape);
  EXPECT_EQ(code(resolve_data_ref(root_, (dir_ / "outside.txt").string()).error()),
            errc::path_escape);
  fs::create_symlink(dir_ / "outside.txt", dir_ / "root" / "link.txt");
  EXPECT_EQ(code(resolve_data_ref(root_, "link.txt").error()), errc::path_escape);
  fs::create_directory_symlink(dir_, dir_ / "root" / "up");
  EXPECT_EQ(code(resolve_data_ref(root_, "up/outside.txt").error()), errc::path_escape);
  // A symlink that stays inside is fine.
  fs::create_symlink(dir_ / "root" / "sub" / "a.txt", dir_ / "root" / "inner.txt");
  EXPECT_TRUE(resolve_data_ref(root_, "inner.txt"));
  EXPECT_EQ(code(resolve_data_ref(root_, "nope.txt").error()), errc::data_not_found);
  EXPECT_EQ(code(resolve_data_ref(root_, "sub").error()), errc::data_not_found);
  EXPECT_EQ(code(resolve_data_ref((dir_ / "absent").string(), "a.txt").error()),
            errc::data_not_found);
}

TEST_F(TrainingData, ReadsEntriesSeparatedByPercentLines) {
  write(dir_ / "f.txt", "one\nline two\n%\n\n%\nthree\n");
  auto e = read_training_file((dir_ / "f.txt").string(), "f.txt", 1 << 20);
  ASSERT_TRUE(e);
  EXPECT_EQ(*e, (std::vector<std::string>{"one\nline two\n", "three\n"}));
  write(dir_ / "g.txt", "just one entry\nwith two lines");
  e = read_training_file((dir_ / "g.txt").string(), "g.txt", 1 << 20);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->size(), 1u);
}

TEST_F(TrainingData, RefusesOversizedInvalidOrEmptyFiles) {
  write(dir_ / "big.txt", std::string(100, 'a'));
  EXPECT_EQ(code(read_training_file((dir_ / "big.txt").string(), "big.txt", 99).error()),
            errc::invalid_data);
  write(dir_ / "bin.txt", "ok \xff\xfe");
  auto bad = read_training_file((dir_ / "bin.txt").string(), "bin.txt", 1 << 20);
  ASSERT_FALSE(bad);
  EXPECT_EQ(code(bad.error()), errc::invalid_data);
  write(dir_ / "empty.txt", "\n%\n  \n");
  EXPECT_EQ(code(read_training_file((dir_ / "empty.txt").string(), "empty.txt", 1 << 20).error()),
            errc::invalid_data);
}

TEST(EngineConfig, ValidationNamesTheOffendingKey) {
  engine_config cfg;
  EXPECT_EQ(validate(cfg), "");
  cfg.training.slots = 0;
  EXPECT_NE(validate(cfg).find("training.slots"), std::string::npos);
  cfg = {};
  cfg.training.defaults.steps = -1;
  EXPECT_NE(validate(cfg).find("training.steps"), std::string::npos);
  cfg = {};
  cfg.training.defaults.steps = 0;  // from the data
  EXPECT_EQ(validate(cfg), "");
  cfg = {};
  cfg.default_base_model = "other";
  EXPECT_NE(validate(cfg).find("default_base_model"), std::string::npos);
  cfg = {};
  cfg.training.admission_queue = 0;
  EXPECT_NE(validate(cfg).find("training.admission_queue"), std::string::npos);
  cfg = {};
  cfg.memory_trim_idle_seconds = -1;
  EXPECT_NE(validate(cfg).find("memory_trim_idle_seconds"), std::string::npos);
  cfg = {};
  cfg.kafka.commit_interval_ms = -1;
  EXPECT_NE(validate(cfg).find("kafka.commit_interval_ms"), std::string::npos);
  cfg = {};
  cfg.serving.prefix_cache_entries = -1;
  EXPECT_NE(validate(cfg).find("serving.prefix_cache_entries"), std::string::npos);
  cfg.serving.prefix_cache_entries = 0;  // off
  EXPECT_EQ(validate(cfg), "");
  cfg.serving.prefix_cache_mb = 0;
  EXPECT_NE(validate(cfg).find("serving.prefix_cache_mb"), std::string::npos);
  cfg = {};
  cfg.serving.default_min_tokens = -1;
  EXPECT_NE(validate(cfg).find("serving.default_min_tokens"), std::string::npos);
  cfg.serving.default_min_tokens = cfg.limits.max_tokens + 1;
  EXPECT_NE(validate(cfg).find("serving.default_min_tokens"), std::string::npos);
  cfg.serving.default_min_tokens = cfg.limits.max_tokens;
  EXPECT_EQ(validate(cfg), "");
  cfg = {};
  cfg.serving.batch_thread = "fast";
  EXPECT_NE(validate(cfg).find("serving.batch_thread"), std::string::npos);
  cfg.serving.batch_thread = "realtime";
  EXPECT_EQ(validate(cfg), "");
  cfg = {};
  cfg.serving.kv_cache = "bfloat16";
  EXPECT_NE(validate(cfg).find("serving.kv_cache"), std::string::npos);
  cfg.serving.kv_cache = "float32";
  EXPECT_EQ(validate(cfg), "");
  cfg.serving.products = "float16";
  EXPECT_NE(validate(cfg).find("serving.products"), std::string::npos);
  for (const char* products : {"auto", "amx", "bfloat16", "float32"}) {
    cfg.serving.products = products;
    EXPECT_EQ(validate(cfg), "") << products;
  }
  cfg = {};
  cfg.serving.prefill_chunk = -1;
  EXPECT_NE(validate(cfg).find("serving.prefill_chunk"), std::string::npos);
  cfg.serving.prefill_chunk = 0;  // whole prompts
  EXPECT_EQ(validate(cfg), "");
  cfg = {};
  cfg.serving.step_helper = "sometimes";
  EXPECT_NE(validate(cfg).find("serving.step_helper"), std::string::npos);
  for (const char* v : {"auto", "on", "off"}) {
    cfg.serving.step_helper = v;
    EXPECT_EQ(validate(cfg), "") << v;
  }
  cfg = {};
  cfg.admin_max_user_series = 0;
  EXPECT_NE(validate(cfg).find("admin.max_user_series"), std::string::npos);
  cfg = {};
  for (int mb : {-1, 4}) {
    cfg.store_memory_mb = mb;
    EXPECT_NE(validate(cfg).find("store_memory_mb"), std::string::npos) << mb;
  }
  for (int mb : {0, 8, 4096}) {
    cfg.store_memory_mb = mb;
    EXPECT_EQ(validate(cfg), "") << mb;
  }
  cfg = {};
  cfg.history_retention_days = -1;
  EXPECT_NE(validate(cfg).find("history_retention_days"), std::string::npos);
  cfg.history_retention_days = 0;  // kept forever
  EXPECT_EQ(validate(cfg), "");
  cfg = {};
  cfg.stop_timeout_seconds = -1;
  EXPECT_NE(validate(cfg).find("stop_timeout_seconds"), std::string::npos);
  cfg.stop_timeout_seconds = 0;  // no limit
  EXPECT_EQ(validate(cfg), "");
  cfg = {};
  cfg.compute.actor_threads = -1;
  EXPECT_NE(validate(cfg).find("compute"), std::string::npos);
  cfg.compute.actor_threads = 0;  // CAF's default
  EXPECT_EQ(validate(cfg), "");
  cfg.compute.scheduling = "fifo";
  EXPECT_NE(validate(cfg).find("compute.scheduling"), std::string::npos);
  cfg.compute.scheduling = "normal";
  EXPECT_EQ(validate(cfg), "");
  cfg = {};
  cfg.instance.id = "a b";
  EXPECT_NE(validate(cfg).find("instance.id"), std::string::npos);
  cfg.instance.id = "tailord-1";
  EXPECT_EQ(validate(cfg), "");
  cfg.instance.takeover_after_ms = cfg.instance.heartbeat_ms;  // would take over the living
  EXPECT_NE(validate(cfg).find("instance.takeover_after_ms"), std::string::npos);
  cfg.instance.takeover_after_ms = 0;  // never
  EXPECT_EQ(validate(cfg), "");
  cfg.instance.heartbeat_ms = 0;
  EXPECT_NE(validate(cfg).find("instance.heartbeat_ms"), std::string::npos);
}

// Every instance that sees the same live instances picks the same one to
// take over a job; a lost instance's jobs spread over all the live ones,
// and a job's taker changes only if its taker is itself gone.
TEST(Takeover, EachJobHasOneTakerAmongTheLiveAndTheJobsSpread) {
  const std::vector<std::string> live = {"tailord-a", "tailord-b", "tailord-c"};
  auto reversed = live;
  std::reverse(reversed.begin(), reversed.end());
  std::map<std::string, int> taken;
  int kept = 0;
  for (int i = 0; i < 300; ++i) {
    const auto job = "job-u" + std::to_string(i) + ":signup";
    const auto taker = taker_of(job, live);
    ASSERT_NE(std::find(live.begin(), live.end(), taker), live.end());
    EXPECT_EQ(taker_of(job, reversed), taker) << "not the order they were heard in";
    ++taken[taker];
    // Without tailord-c: jobs that tailord-c would not have taken keep their taker.
    const auto without_c = taker_of(job, {"tailord-a", "tailord-b"});
    if (taker != "tailord-c") kept += without_c == taker;
  }
  for (const auto& id : live) EXPECT_GT(taken[id], 60) << id << " takes its share";
  EXPECT_EQ(kept, 300 - taken["tailord-c"]);
  EXPECT_EQ(taker_of("job-1", {}), "");
}

TEST(EngineConfig, FileSectionsRefuseUnknownKeys) {
  auto path = fs::temp_directory_path() / ("tailor-cfg-" + std::to_string(::getpid()) + ".json");
  engine_config cfg;
  // Loads `text` into a fresh cfg; the error, empty when it loads.
  const auto load = [&](const char* text) {
    std::ofstream(path) << text;
    cfg = {};
    return load_config_file(path.string(), cfg);
  };
  const auto refused = [&](const char* text, const std::string& why) {
    const auto err = load(text);
    EXPECT_NE(err.find(why), std::string::npos) << text << ": " << err;
  };
  refused(R"({"training":{"slots":3,"nope":1}})", "training: unknown key 'nope'");
  refused(R"({"admin":{"port":9,"maxuserseries":5}})", "admin: unknown key 'maxuserseries'");
  // The admin token's file is tailord's to read (at start and by
  // --check-config), not every reader's of the configuration: tailorctl
  // takes the rest of a file whose secret it may not read.
  EXPECT_EQ(load(R"({"admin":{"token_file":"/nonexistent/token"}})"), "");
  EXPECT_EQ(cfg.admin_token_file, "/nonexistent/token");
  std::string read;
  EXPECT_NE(read_admin_token(cfg.admin_token_file, read).find("cannot read /nonexistent/token"),
            std::string::npos);
  const auto token = path.string() + ".token";
  std::ofstream(token) << " \n";
  EXPECT_NE(read_admin_token(token, read).find("holds no token"), std::string::npos);
  std::ofstream(token) << "  t0ken \n";
  EXPECT_EQ(read_admin_token(token, read), "");
  EXPECT_EQ(read, "t0ken");
  fs::remove(token);
  refused(R"({"kafka":{"exactly_one":true}})", "kafka: unknown key 'exactly_one'");
  refused(R"({"kafka":{"exactly_once":"yes"}})", "kafka.exactly_once: has the wrong type");
  EXPECT_EQ(load(R"({"kafka":{"exactly_once":true,"commit_interval_ms":50}})"), "");
  EXPECT_TRUE(cfg.kafka.exactly_once);
  EXPECT_FALSE(engine_config{}.kafka.exactly_once);
  std::ofstream(path)
      << R"({"training":{"slots":3,"steps":7},)"
         R"("compute":{"blas_threads":2,"actor_threads":3,"scheduling":"normal"},)"
         R"("admin":{"port":0,"max_user_series":50},"store_memory_mb":64,"stop_timeout_seconds":9,)"
         R"("history_retention_days":7,)"
         R"("serving":{"prefix_cache_entries":8,"prefix_cache_mb":32,"batch_thread":"realtime",)"
         R"("kv_cache":"float32","products":"float32","prefill_chunk":64,"step_helper":false}})";
  cfg = {};
  EXPECT_EQ(load_config_file(path.string(), cfg), "");
  EXPECT_EQ(cfg.serving.prefix_cache_entries, 8);
  EXPECT_EQ(cfg.serving.prefix_cache_mb, 32);
  EXPECT_EQ(cfg.serving.batch_thread, "realtime");
  EXPECT_EQ(cfg.serving.prefill_chunk, 64);
  EXPECT_EQ(engine_config{}.serving.prefill_chunk, 256);
  EXPECT_EQ(cfg.serving.step_helper, "off");  // false: the spelling before "auto"
  EXPECT_EQ(engine_config{}.serving.step_helper, "auto");
  EXPECT_EQ(cfg.serving.kv_cache, "float32");
  EXPECT_EQ(engine_config{}.serving.kv_cache, "float16");
  EXPECT_EQ(cfg.serving.products, "float32");
  EXPECT_EQ(engine_config{}.serving.products, "auto");
  EXPECT_EQ(cfg.training.slots, 3);
  EXPECT_EQ(cfg.training.defaults.steps, 7);
  EXPECT_EQ(cfg.compute.blas_threads, 2);
  EXPECT_EQ(cfg.compute.actor_threads, 3);
  EXPECT_EQ(engine_config{}.compute.actor_threads, 1);
  EXPECT_EQ(cfg.compute.scheduling, "normal");
  EXPECT_EQ(engine_config{}.compute.scheduling, "batch");
  EXPECT_EQ(cfg.admin_port, 0);
  EXPECT_EQ(cfg.admin_max_user_series, 50);
  EXPECT_EQ(engine_config{}.admin_max_user_series, 1000);
  EXPECT_EQ(cfg.store_memory_mb, 64);
  EXPECT_EQ(engine_config{}.store_memory_mb, 128);
  EXPECT_EQ(cfg.stop_timeout_seconds, 9);
  EXPECT_EQ(engine_config{}.stop_timeout_seconds, 120);
  EXPECT_EQ(cfg.history_retention_days, 7);
  EXPECT_EQ(engine_config{}.history_retention_days, 30);
  for (auto [text, helper] : std::vector<std::pair<std::string, std::string>>{
           {"true", "on"}, {"\"on\"", "on"}, {"\"auto\"", "auto"}, {"\"off\"", "off"}}) {
    std::ofstream(path) << R"({"serving":{"step_helper":)" << text << "}}";
    cfg = {};
    EXPECT_EQ(load_config_file(path.string(), cfg), "") << text;
    EXPECT_EQ(cfg.serving.step_helper, helper) << text;
  }
  std::ofstream(path) << R"({"serving":{"step_helper":3}})";
  cfg = {};
  EXPECT_NE(load_config_file(path.string(), cfg).find("serving.step_helper: has the wrong type"),
            std::string::npos);
  fs::remove(path);
}

// S-LoRA's virtual token counter as the GPU actor keeps it: a new or idle
// user starts at the floor, which never falls, and one served above it
// keeps that service when coming back.
TEST(FairShares, ANewOrIdleUserStartsAtTheFloorAndKeepsServiceAboveIt) {
  fair_shares shares;
  auto* a = shares.arrive("a");
  shares.lift(*a);
  EXPECT_EQ(a->served, 0);
  a->served = 100;
  shares.raise_floor(100);
  auto* b = shares.arrive("b");
  shares.lift(*b);
  EXPECT_EQ(b->served, 100) << "a new user starts at the floor, not at 0";
  shares.release("a");  // at the floor: coming back, it would be lifted to it
  EXPECT_EQ(shares.users(), 1u);
  auto* h = shares.arrive("h");
  shares.lift(*h);
  h->served = 1000;
  shares.release("h");  // idle, but served above the floor
  EXPECT_EQ(shares.users(), 2u);
  auto* again = shares.arrive("h");
  shares.lift(*again);
  EXPECT_EQ(again->served, 1000) << "idling must not forgive service";
  shares.raise_floor(50);
  EXPECT_EQ(shares.floor(), 100) << "the floor never falls";
  auto* returning = shares.arrive("a");
  shares.lift(*returning);
  EXPECT_EQ(returning->served, 100);
}

// Thousands of users, each with one request and gone: the table holds those
// in flight and those above the floor, not everyone ever served, and never
// forgets a user whose service is above the floor.
TEST(FairShares, RemembersOnlyUsersInFlightOrAboveTheFloor) {
  fair_shares shares;
  auto* heavy = shares.arrive("heavy");
  shares.lift(*heavy);
  heavy->served = 1e12;  // served far more than anyone will be here
  shares.release("heavy");
  struct flight {
    std::string user;
    fair_shares::share* share;
    double rate;  // tokens per step: some users leave above the floor
  };
  std::deque<flight> in_flight;
  std::size_t most = 0;
  for (int i = 0; i < 10000; ++i) {
    const auto user = "user-" + std::to_string(i);
    auto* s = shares.arrive(user);
    shares.lift(*s);
    in_flight.push_back({user, s, 5.0 * (1 + i % 3)});
    for (auto& f : in_flight) f.share->served += f.rate;  // a step's tokens
    double least = in_flight.front().share->served;
    for (auto& f : in_flight) least = std::min(least, f.share->served);
    shares.raise_floor(least);
    if (in_flight.size() > 8) {
      shares.release(in_flight.front().user);
      in_flight.pop_front();
    }
    most = std::max(most, shares.users());
  }
  EXPECT_LE(most, 600u) << "the table grew with every user ever served";
  EXPECT_GT(shares.floor(), 0);
  auto* back = shares.arrive("heavy");
  shares.lift(*back);
  EXPECT_EQ(back->served, 1e12) << "a user above the floor was forgotten";
}

// tailor_consumer_lag, from a consumer's statistics: what follows the last
// message handed over; on a partition not read from since a restart, what
// follows the committed offset (it once counted the partition's whole
// history there); from the start where nothing was committed. Partitions
// not assigned, or whose end is unknown, count none.
TEST(ConsumerLag, CountsFromTheLastMessageReadElseFromTheCommittedOffset) {
  const auto stats = nlohmann::json::parse(R"({"topics": {"in": {"partitions": {
    "0": {"desired": true, "app_offset": 7, "committed_offset": 5, "lo_offset": 0,
          "hi_offset": 10},
    "1": {"desired": true, "app_offset": -1001, "committed_offset": 40, "lo_offset": 0,
          "hi_offset": 40},
    "2": {"desired": true, "app_offset": -1001, "committed_offset": -1001, "lo_offset": 3,
          "hi_offset": 8},
    "3": {"desired": false, "app_offset": -1001, "committed_offset": -1001, "lo_offset": 0,
          "hi_offset": 99},
    "4": {"desired": true, "app_offset": -1001, "committed_offset": 2, "lo_offset": 0,
          "hi_offset": -1001},
    "-1": {"desired": false, "hi_offset": -1001}}}}})");
  EXPECT_EQ(consumer_lag(stats, "in"), 3 + 0 + 5);
  EXPECT_EQ(consumer_lag(stats, "out"), 0);
  EXPECT_EQ(consumer_lag(nlohmann::json::object(), "in"), 0);
}

// Per-user request counts on /metrics: at most the limit of series, the
// busiest kept by name, the others summed under "(other)" (which no id can
// be: a user named "_other" keeps a series of its own), nothing lost.
TEST(Metrics, PerUserSeriesAreBoundedAndTheRestSumUnderOther) {
  metrics m(4);
  for (int i = 0; i < 50; ++i) m.count_request("model-heavy", "heavy");
  for (int i = 0; i < 30; ++i) m.count_request("model-x", "_other");
  for (int i = 0; i < 20; ++i) m.count_request("model-busy", "busy");
  for (int u = 0; u < 1000; ++u)
    m.count_request("model-" + std::to_string(u), "u" + std::to_string(u));
  const auto text = m.render();
  auto value = [&](const std::string& series) -> double {
    auto pos = text.find("\n" + series + " ");
    return pos == std::string::npos ? -1 : std::stod(text.substr(pos + series.size() + 2));
  };
  int user_series = 0;
  double total = 0;
  for (auto pos = text.find("\ntailor_user_requests_total{"); pos != std::string::npos;
       pos = text.find("\ntailor_user_requests_total{", pos + 1)) {
    ++user_series;
    total += std::stod(text.substr(text.find("} ", pos) + 2));
  }
  EXPECT_EQ(user_series, 5) << "four users by name and (other):\n" << text;
  EXPECT_EQ(value("tailor_user_requests_total{user=\"heavy\"}"), 50);
  EXPECT_EQ(value("tailor_user_requests_total{user=\"_other\"}"), 30) << "a user, not the rest";
  EXPECT_EQ(value("tailor_user_requests_total{user=\"busy\"}"), 20);
  EXPECT_EQ(value("tailor_user_requests_total{user=\"u999\"}"), 1) << "the newest keeps a series";
  EXPECT_EQ(value("tailor_user_requests_total{user=\"(other)\"}"), 999);
  EXPECT_EQ(total, 1100) << "every request is counted once";
  EXPECT_EQ(value("tailor_model_requests_total{model=\"model-heavy\"}"), 50);
  EXPECT_EQ(value("tailor_model_requests_total{model=\"(other)\"}"), 999);
  // A deleted user's series go (their id is theirs); the totals stay.
  m.forget_user("heavy", {"model-heavy"});
  const auto after = m.render();
  EXPECT_EQ(after.find("user=\"heavy\""), std::string::npos) << after;
  EXPECT_EQ(after.find("model=\"model-heavy\""), std::string::npos) << after;
  EXPECT_NE(after.find("\ntailor_user_requests_total{user=\"(other)\"} 1049\n"),
            std::string::npos)
      << after;
  EXPECT_NE(after.find("\ntailor_model_requests_total{model=\"(other)\"} 1049\n"),
            std::string::npos)
      << after;
}

// Latency and job durations as Prometheus histograms: cumulative buckets per
// label, a +Inf bucket, a sum and a count, so that a scraper can take any
// quantile of any interval.
TEST(Metrics, LatencyAndJobDurationsAreHistogramsByLabel) {
  metrics m;
  EXPECT_EQ(m.render().find("tailor_inference_latency_ms"), std::string::npos)
      << "no series before a sample";
  m.observe_inference(3, 1, false);
  m.observe_inference(40, 1, false);
  m.observe_inference(700, 1, true);
  m.observe_job("ready", 12);
  m.observe_job("failed", 90000);  // past the last bound
  const auto text = m.render();
  auto has = [&](const std::string& line) {
    EXPECT_NE(text.find("\n" + line + "\n"), std::string::npos) << line << " in\n" << text;
  };
  has("# TYPE tailor_inference_latency_ms histogram");
  has("tailor_inference_latency_ms_bucket{adapter=\"resident\",le=\"2\"} 0");
  has("tailor_inference_latency_ms_bucket{adapter=\"resident\",le=\"5\"} 1");
  has("tailor_inference_latency_ms_bucket{adapter=\"resident\",le=\"50\"} 2");
  has("tailor_inference_latency_ms_bucket{adapter=\"resident\",le=\"+Inf\"} 2");
  has("tailor_inference_latency_ms_sum{adapter=\"resident\"} 43");
  has("tailor_inference_latency_ms_count{adapter=\"resident\"} 2");
  has("tailor_inference_latency_ms_bucket{adapter=\"loaded\",le=\"500\"} 0");
  has("tailor_inference_latency_ms_bucket{adapter=\"loaded\",le=\"1000\"} 1");
  has("tailor_inference_latency_ms_count{adapter=\"loaded\"} 1");
  has("# TYPE tailor_job_duration_seconds histogram");
  has("tailor_job_duration_seconds_bucket{status=\"ready\",le=\"10\"} 0");
  has("tailor_job_duration_seconds_bucket{status=\"ready\",le=\"30\"} 1");
  has("tailor_job_duration_seconds_bucket{status=\"failed\",le=\"21600\"} 0");
  has("tailor_job_duration_seconds_bucket{status=\"failed\",le=\"+Inf\"} 1");
  has("tailor_job_duration_seconds_count{status=\"failed\"} 1");
  // /v1/status reads their quantiles, interpolated within the bucket as
  // Prometheus does: the first resident sample is the 1st of 1 in (2, 5].
  const auto s = m.summary();
  EXPECT_EQ(s["inference"]["latency_ms"]["resident"]["count"], 2);
  EXPECT_DOUBLE_EQ(s["inference"]["latency_ms"]["resident"]["p50"].get<double>(), 5.0);
  // 1.98 of 2: in (20, 50], 0.98 of the way from the bucket's first sample.
  EXPECT_DOUBLE_EQ(s["inference"]["latency_ms"]["resident"]["p99"].get<double>(), 49.4);
  EXPECT_EQ(s["training"]["duration_s"]["ready"]["count"], 1);
  EXPECT_DOUBLE_EQ(s["training"]["duration_s"]["failed"]["p99"].get<double>(), 21600.0)
      << "past the last bound: the last bound";
  EXPECT_DOUBLE_EQ(histogram({1, 2}).quantile(0.5), 0.0) << "no samples";
}

// The host tier of the adapter cache: least recently used out first, a hit
// refreshes, capacity 0 keeps nothing, and its counters reach /metrics.
TEST(HostTier, EvictsTheLeastRecentlyUsed) {
  auto stats = std::make_shared<metrics>();
  host_tier host(2, stats);
  auto adapter = [] { return std::make_shared<const tailor::model::packed_adapter>(); };
  auto a = adapter(), b = adapter(), c = adapter();
  host.insert("a", a);
  host.insert("b", b);
  EXPECT_EQ(host.find("a"), a);  // now a is the most recently used
  host.insert("c", c);
  EXPECT_EQ(host.find("b"), nullptr);
  EXPECT_EQ(host.find("a"), a);
  EXPECT_EQ(host.find("c"), c);
  auto text = stats->render();
  EXPECT_NE(text.find("tailor_adapter_cache_loads_total{tier=\"host\"} 3"), std::string::npos)
      << text;
  EXPECT_NE(text.find("tailor_adapter_cache_evictions_total{tier=\"host\"} 1"), std::string::npos)
      << text;

  host_tier none(0, stats);
  none.insert("a", a);
  EXPECT_EQ(none.find("a"), nullptr);
}

// GPU actors and the loader share it from their own threads.
TEST(HostTier, ConcurrentUseKeepsEachAdapterUnderItsOwnId) {
  auto stats = std::make_shared<metrics>();
  host_tier host(8, stats);
  std::vector<std::shared_ptr<const tailor::model::packed_adapter>> adapters;
  for (int i = 0; i < 16; ++i) {
    auto ad = std::make_shared<tailor::model::packed_adapter>();
    ad->cfg.rank = i;  // tells the adapters apart
    adapters.push_back(ad);
  }
  std::atomic<int> wrong{0}, found{0};
  auto work = [&](int seed) {
    for (int n = 0; n < 20000; ++n) {
      // Ids 0-3 on two accesses of three: they stay held while the rest churn.
      int i = n % 3 != 0 ? (n + seed) % 4 : (n * 7 + seed) % 16;
      auto id = "m" + std::to_string(i);
      if (auto ad = host.find(id)) {
        ++found;
        if (ad->cfg.rank != i) ++wrong;
      } else {
        host.insert(id, adapters[static_cast<std::size_t>(i)]);
      }
    }
  };
  std::thread t1(work, 0), t2(work, 5);
  t1.join();
  t2.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_GT(found.load(), 0);
  int held = 0;
  for (int i = 0; i < 16; ++i) held += host.find("m" + std::to_string(i)) != nullptr;
  EXPECT_EQ(held, 8);
}

namespace {

// The egress's handlers of exactly-once output, which the job actors
// never use: an error if they did.
const auto unused_offset_publish = [](publish_atom, std::vector<outgoing_message>&,
                                      input_offset&) -> caf::result<caf::ok_atom> {
  return caf::make_error(caf::sec::unexpected_message, "not used by job actors");
};
const auto unused_commit = [](commit_atom) -> caf::result<caf::ok_atom> {
  return caf::make_error(caf::sec::unexpected_message, "not used by job actors");
};

// Job actors as the engine runs them, with a real store on disk, against an
// egress that is either gone, as when the engine stops, or stalled: it
// takes events and never reports their delivery (as while the broker is out
// of reach), and tells the test which actor published them. A test may
// play the job's pool and slot itself.
class JobActors : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("tailor-jobs-" + std::to_string(::getpid()));
    fs::create_directories(dir_);
    auto db = tailor::storage::metadata_store::open((dir_ / "metadata").string(), {});
    ASSERT_TRUE(db) << caf::to_string(db.error());
    sys_cfg_.add_message_types<caf::id_block::tailor>();
    sys_ = std::make_unique<caf::actor_system>(sys_cfg_);
    self_ = std::make_unique<caf::scoped_actor>(*sys_);
    db_ = sys_->spawn(store, std::shared_ptr<tailor::storage::metadata_store>(std::move(*db)));
    using held = std::vector<caf::typed_response_promise<caf::ok_atom>>;
    caf::actor observer = caf::actor_cast<caf::actor>(*self_);
    out_ = sys_->spawn(
        [observer](egress_actor::stateful_pointer<held> self) -> egress_actor::behavior_type {
          return {[self, observer](publish_atom, std::vector<outgoing_message>&) {
                    caf::anon_send(observer, caf::actor_cast<caf::actor>(self->current_sender()));
                    self->state.push_back(self->make_response_promise<caf::ok_atom>());
                    return self->state.back();
                  },
                  unused_offset_publish, unused_commit, [](commit_atom, uint64_t) {},
                  [](poll_atom) {}, [](tick_atom) {}};
        });
  }
  void TearDown() override {
    (*self_)->send_exit(out_, caf::exit_reason::user_shutdown);
    (*self_)->send_exit(db_, caf::exit_reason::user_shutdown);
    self_.reset();
    out_ = nullptr;
    db_ = nullptr;
    sys_.reset();  // waits for every actor
    fs::remove_all(dir_);
  }
  void egress_exits() {
    (*self_)->send_exit(out_, caf::exit_reason::user_shutdown);
    (*self_)->wait_for(out_);
  }
  job_record record(const std::string& id, const std::string& status) {
    job_record j;
    j.job_id = id;
    j.request_id = "r-" + id;
    j.user_id = "u";
    j.base_model = "tailor-test";
    j.status = status;
    if (status == "ready") j.outcome = {job_event_message(j, "model.ready")};
    return j;
  }
  // The next down message, within 10 s; false on timeout.
  bool next_down() {
    bool got = false;
    (*self_)->receive([&](caf::down_msg&) { got = true; },
                      caf::after(std::chrono::seconds(10)) >> [] {});
    return got;
  }
  // The next actor the stalled egress names, within 10 s; null on timeout.
  caf::actor next_publisher() {
    caf::actor got;
    (*self_)->receive([&](caf::actor& a) { got = a; },
                      caf::after(std::chrono::seconds(10)) >> [] {});
    return got;
  }

  fs::path dir_;
  caf::actor_system_config sys_cfg_;
  std::unique_ptr<caf::actor_system> sys_;
  std::unique_ptr<caf::scoped_actor> self_;
  store_actor db_;
  egress_actor out_;
};

}  // namespace

// A finished job whose final events cannot go out any more (the egress has
// exited) ends, and leaves them to the next start, instead of retrying
// forever and keeping the process from stopping.
TEST_F(JobActors, AJobWhoseEventsCannotGoOutAnyMoreEnds) {
  egress_exits();
  auto& self = *self_;
  engine_config cfg;
  auto j = sys_->spawn(job, record("j1", "ready"), cfg, db_, out_,
                       caf::actor_cast<job_owner>(self), std::make_shared<metrics>(),
                       std::make_shared<std::atomic<bool>>(false));
  self->monitor(j);
  self->send(j, done_atom_v);  // announce the final events, as at recovery
  bool ended = next_down();
  EXPECT_TRUE(ended) << "the job actor is still running";
  if (!ended) self->send_exit(j, caf::exit_reason::kill);
}

// The pool's end reaches the job actors it monitors (they are not linked to
// it): once it exits, no job actor is left to hold the actor system, not
// even one that waits for its events' delivery.
TEST_F(JobActors, ThePoolsEndEndsItsJobs) {
  auto& self = *self_;
  engine_config cfg;
  cfg.training.slots = 0;  // a queued job stays queued
  auto pool = sys_->spawn(training_pool, cfg, db_, out_, std::make_shared<metrics>(), nullptr);
  for (auto [id, status] : {std::pair{"q1", "queued"}, {"r1", "ready"}, {"r2", "ready"}})
    self->request(pool, std::chrono::seconds(10), submit_atom_v, record(id, status))
        .receive([](caf::ok_atom) {}, [](caf::error& e) { FAIL() << caf::to_string(e); });
  // The ready jobs publish their final events; the stalled egress names them.
  std::vector<caf::actor> publishing;
  for (int i = 0; i < 2; ++i) {
    publishing.push_back(next_publisher());
    ASSERT_TRUE(publishing.back()) << "a ready job did not publish";
  }
  for (const auto& a : publishing) self->monitor(a);
  self->send_exit(pool, caf::exit_reason::user_shutdown);
  int ended = 0;
  for (std::size_t i = 0; i < publishing.size(); ++i) ended += next_down();
  EXPECT_EQ(ended, 2) << "job actors outlived the pool";
}

// A job that another instance ends while this one saves its adapter (a save
// is not interrupted, as a cancel does not stop it either) is handed over
// once the save is done: `moved`, with its model neither registered nor
// announced here, since the other instance announced the job's end.
TEST_F(JobActors, AJobEndedElsewhereWhileSavingIsMovedWithoutAWord) {
  auto& self = *self_;
  caf::actor observer = caf::actor_cast<caf::actor>(self);
  // An egress that delivers at once and shows the test what went out.
  auto acking = sys_->spawn([observer](egress_actor::pointer) -> egress_actor::behavior_type {
    return {[observer](publish_atom, std::vector<outgoing_message>& batch) {
              caf::anon_send(observer, std::move(batch));
              return caf::ok_atom_v;
            },
            unused_offset_publish, unused_commit, [](commit_atom, uint64_t) {}, [](poll_atom) {},
            [](tick_atom) {}};
  });
  auto rec = record("j9", "queued");
  tailor::messages::onboarding_request req;
  req.request_id = rec.request_id;
  req.user_id = rec.user_id;
  req.texts = {"hello"};
  rec.request = to_json(req);
  const request_record made{rec.user_id, rec.request_id, "onboarding", 1, rec.job_id, {}, 1, {}};
  self->request(db_, std::chrono::seconds(10), create_atom_v, rec, made)
      .receive([](caf::ok_atom) {}, [](caf::error& e) { FAIL() << caf::to_string(e); });
  engine_config cfg;
  auto j = sys_->spawn(job, rec, cfg, db_, acking, caf::actor_cast<job_owner>(self),
                       std::make_shared<metrics>(), std::make_shared<std::atomic<bool>>(false));
  self->send(j, admit_atom_v, observer);  // this test is the job's slot
  std::vector<std::string> published;
  auto note = [&](std::vector<outgoing_message>& batch) {
    for (const auto& m : batch) published.push_back(m.payload);
  };
  bool trained = false, done = false;
  self->receive_while([&] { return !trained; })(
      note,
      [&](train_atom, training_order&) -> training_outcome {
        trained = true;
        // As the slot reports a run that reaches its save, and the pool
        // passes on the job's end elsewhere, before the save is done.
        self->send(j, started_atom_v);
        self->send(j, saving_atom_v);
        self->send(j, moved_atom_v, std::string("tailord-else"));
        training_outcome out;
        out.status = "done";
        out.artifact_path = "adapters/u/model-j9.safetensors";
        out.checksum = "sha256:00";
        return out;
      },
      caf::after(std::chrono::seconds(10)) >> [&] { trained = true; });
  self->receive_while([&] { return !done; })(
      note, [](release_atom, std::string&) {}, [&](done_atom, std::string&) { done = true; },
      caf::after(std::chrono::seconds(10)) >> [&] { done = true; });
  std::vector<job_record> found;
  self->request(db_, std::chrono::seconds(10), job_atom_v, std::string("j9"))
      .receive([&](std::vector<job_record>& js) { found = std::move(js); },
               [](caf::error& e) { FAIL() << caf::to_string(e); });
  ASSERT_EQ(found.size(), 1u);
  EXPECT_EQ(found.front().status, "moved") << found.front().error_message;
  for (const auto& p : published) {
    EXPECT_EQ(p.find("model.ready"), std::string::npos) << p;
    EXPECT_EQ(p.find("model.state"), std::string::npos) << p;
  }
  std::vector<model_record> models;
  self->request(db_, std::chrono::seconds(10), models_atom_v, std::string("u"))
      .receive([&](std::vector<model_record>& ms) { models = std::move(ms); },
               [](caf::error& e) { FAIL() << caf::to_string(e); });
  EXPECT_TRUE(models.empty()) << "registered here too";
  self->send_exit(acking, caf::exit_reason::user_shutdown);
}

// The ingress's own timeout for an event's answer (reply_watch): CAF 0.17's
// would stay on its clock for the full 120 s even once answered. An answer
// settles its call once; a call not settled in time expires once, and a late
// answer to it is then ignored (the event was dispatched again). A settled
// call lets go of what it holds (the event) at once.
TEST(ReplyWatch, ACallNotAnsweredInTimeExpiresOnceAndItsLateAnswerIsIgnored) {
  using namespace std::chrono_literals;
  reply_watch w{100ms};
  const auto t0 = reply_watch::clock::now();
  int expired_a = 0, expired_b = 0, expired_c = 0;
  auto event = std::make_shared<int>(7);
  auto a = w.watch(t0, [&] { ++expired_a; });
  auto b = w.watch(t0 + 10ms, [&, event] { ++expired_b; });
  auto c = w.watch(t0 + 20ms, [&] { ++expired_c; });
  EXPECT_EQ(event.use_count(), 2);
  EXPECT_TRUE(reply_watch::settle(*b));
  EXPECT_FALSE(reply_watch::settle(*b)) << "an answer counted twice";
  EXPECT_EQ(event.use_count(), 1) << "a settled call still holds its event";
  EXPECT_TRUE(w.expire(t0 + 50ms).empty()) << "expired before its time";
  EXPECT_EQ(w.size(), 3u);  // b waits behind a, which is still due
  auto due = w.expire(t0 + 105ms);
  ASSERT_EQ(due.size(), 1u);
  for (auto& f : due) f();
  EXPECT_EQ(expired_a, 1);
  EXPECT_EQ(expired_b, 0) << "an answered call expired";
  EXPECT_EQ(w.size(), 1u) << "a settled call outlived the pending one ahead of it";
  EXPECT_FALSE(reply_watch::settle(*a)) << "the late answer of an expired call was taken";
  EXPECT_TRUE(w.expire(t0 + 110ms).empty()) << "a call expired twice";
  EXPECT_TRUE(reply_watch::settle(*c));
  EXPECT_TRUE(w.expire(t0 + 1s).empty());
  EXPECT_EQ(expired_c, 0);
  EXPECT_EQ(w.size(), 0u);
}

// The supervisor's delay before it restarts a failed GPU actor or ingress:
// at once after a stable run, then doubling from a second for each failure
// soon after a start, up to half a minute, so that an actor failing as it
// starts does not spin; a stable run again starts over.
TEST(RestartBackoff, FailuresSoonAfterAStartDoubleTheDelayUpToACapAndAStableRunResetsIt) {
  using namespace std::chrono_literals;
  restart_backoff r;
  auto t = std::chrono::steady_clock::now();
  r.started = t;
  std::vector<int64_t> delays;
  for (int i = 0; i < 8; ++i) {
    t += 2s;  // each fails two seconds after its start
    delays.push_back(r.next_delay(t).count());
    r.started = t + std::chrono::milliseconds(delays.back());
    t = r.started;
  }
  EXPECT_EQ(delays, (std::vector<int64_t>{0, 1000, 2000, 4000, 8000, 16000, 30000, 30000}));
  t += restart_backoff::stable_after;
  EXPECT_EQ(r.next_delay(t).count(), 0) << "a stable run did not start the delays over";
  r.started = t;  // restarted at once
  EXPECT_EQ(r.next_delay(t + 1s).count(), 1000);
}

// What tailord waits on: a failure wakes the waiter with its reason, and
// the first reason stays; a stop with no failure wakes it with none.
TEST(EngineHealth, AFailureWakesTheWaiterWithTheFirstReasonAndAStopWithNone) {
  using namespace std::chrono_literals;
  // Ends a wait left blocked by a failed check, so the test fails, not hangs.
  struct releaser {
    engine_health& h;
    ~releaser() { h.release(); }
  };
  engine_health failing;
  auto waiter = std::async(std::launch::async, [&] { return failing.wait(); });
  releaser unblock_failing{failing};
  failing.fail("the egress ended: out of memory");
  failing.fail("the store actor ended");
  ASSERT_EQ(waiter.wait_for(10s), std::future_status::ready) << "the failure did not wake it";
  EXPECT_EQ(waiter.get(), "the egress ended: out of memory");
  EXPECT_EQ(failing.failure(), "the egress ended: out of memory");

  engine_health stopping;
  EXPECT_EQ(stopping.failure(), "");
  auto idle = std::async(std::launch::async, [&] { return stopping.wait(); });
  releaser unblock_stopping{stopping};
  stopping.release();
  ASSERT_EQ(idle.wait_for(10s), std::future_status::ready) << "the stop did not wake it";
  EXPECT_EQ(idle.get(), "");
  EXPECT_EQ(stopping.wait(), "") << "a wait after the stop must not block";
}
