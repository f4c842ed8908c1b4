#include "onboarding_bench.hpp"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>

#include "engine_run.hpp"
#include "interrupt.hpp"
#include "progress.hpp"

namespace tailor::bench {

namespace {

using json = nlohmann::json;
using clock = std::chrono::steady_clock;

// Counts how each request ended, from tailor.events.
class end_tracker {
 public:
  end_tracker(const std::string& bootstrap, const std::string& topic)
      : watch_(bootstrap, topic, [this](const json& j) { on_event(j); }) {}
  std::size_t ended() const {
    std::lock_guard<std::mutex> g(mtx_);
    return ended_.size();
  }
  std::map<std::string, int> counts() const {
    std::lock_guard<std::mutex> g(mtx_);
    return counts_;
  }
  clock::time_point last_end() const {
    std::lock_guard<std::mutex> g(mtx_);
    return last_end_;
  }

 private:
  void on_event(const json& j) {
    auto type = j.value("type", "");
    auto key = j.value("user_id", "") + "/" + j.value("request_id", "");
    std::lock_guard<std::mutex> g(mtx_);
    ++counts_[type];
    if (type == "model.ready" || type == "job.failed" || type == "job.cancelled") {
      ended_.insert(key);
      last_end_ = clock::now();
    }
  }
  mutable std::mutex mtx_;
  std::set<std::string> ended_;
  std::map<std::string, int> counts_;
  clock::time_point last_end_{};
  topic_watch watch_;  // last: it stops before the members it feeds go
};

// `bytes` of plain words, different for each user `i` (a user's own writing,
// which the store and the trainer see as they would real text).
std::string writing_of(int i, int bytes) {
  static const char* words[] = {"morning", "letter", "garden", "river",  "quiet", "friend",
                                "window",  "summer", "story",  "bright", "walk",  "kitchen",
                                "paper",   "music",  "winter", "coffee"};
  std::string out;
  out.reserve(static_cast<std::size_t>(bytes) + 16);
  uint64_t x = 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(i + 1);
  while (out.size() < static_cast<std::size_t>(bytes)) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    out += words[(x >> 33) % 16];
    out += (x >> 40) % 9 == 0 ? ". " : " ";
  }
  out.resize(static_cast<std::size_t>(bytes));
  return out;
}

}  // namespace

json run_onboarding_spike(const onboarding_options& o) {
  json base = json::object();
  if (!o.tailord_config.empty())
    if (auto err = read_tailord_config(o.tailord_config, base); !err.empty())
      throw std::runtime_error(err);
  engine_run_options ro;
  ro.bootstrap = o.bootstrap;
  ro.keep_topics = o.keep_topics;
  ro.tailord = o.tailord;
  ro.config = {{"training",
                {{"slots", o.slots},
                 {"steps", o.steps},
                 {"admission_queue", o.admission_queue},
                 {"checkpoint_every", 0}}}};
  if (o.store_memory_mb >= 0) ro.config["store_memory_mb"] = o.store_memory_mb;
  base.merge_patch(ro.config);
  ro.config = std::move(base);
  std::fprintf(stderr, "starting tailord (%d training slots, %d steps per job)...\n", o.slots,
               o.steps);
  engine_run engine(ro);
  const double idle_rss = engine.rss_mb();
  end_tracker ends(engine.bootstrap(), engine.topic("events"));
  bench_producer producer(engine.bootstrap());

  const auto t0 = clock::now();
  for (int i = 0; i < o.jobs; ++i) {
    auto user = "spike-" + std::to_string(i);
    json req = {{"type", "onboarding.request"},
                {"schema_version", 1},
                {"user_id", user},
                {"request_id", "signup"},
                {"texts",
                 {"Hello, I am " + user + ".", "I like short answers and long walks.",
                  "My favourite fortune: a journey of a thousand miles begins with one step."}}};
    if (o.text_bytes > 0) req["texts"].push_back(writing_of(i, o.text_bytes));
    producer.send(engine.topic("onboarding"), user, req.dump());
  }
  producer.flush();
  const double publish_s = std::chrono::duration<double>(clock::now() - t0).count();
  std::fprintf(stderr, "published %d onboarding requests in %.1f s\n", o.jobs, publish_s);

  cli::progress_bar bar;
  double max_lag = 0, peak_rss = idle_rss;
  const auto deadline = t0 + std::chrono::duration<double>(o.timeout_minutes * 60);
  while (ends.ended() < static_cast<std::size_t>(o.jobs) && clock::now() < deadline) {
    throw_if_interrupted();
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    max_lag = std::max(max_lag,
                       engine.metric("tailor_consumer_lag", "topic", engine.topic("onboarding")));
    peak_rss = std::max(peak_rss, engine.rss_mb());
    auto done = ends.ended();
    auto running = engine.metric("tailor_training_assigned");
    auto elapsed = std::chrono::duration<double>(clock::now() - t0).count();
    bar.update(static_cast<double>(done) / o.jobs,
               "submitted " + std::to_string(o.jobs) + " | running " +
                   std::to_string(static_cast<int>(running)) + " | done " + std::to_string(done) +
                   " | " + cli::format_duration(elapsed));
  }
  bar.done();
  // Lag is sampled every 2 s inside tailord; the last samples come after the end.
  max_lag =
      std::max(max_lag, engine.metric("tailor_consumer_lag", "topic", engine.topic("onboarding")));
  const auto ended = ends.ended();
  const auto counts = ends.counts();
  const double train_s = engine.metric("tailor_training_seconds_total");
  const double first_admission = engine.metric("tailor_training_first_admission_seconds");
  const double drained = engine.metric("tailor_training_queue_drained_seconds");
  // Models as the engine registered them: more than one for a request is a duplicate.
  int duplicates = 0;
  for (int i = 0; i < o.jobs; ++i) {
    auto models =
        json::parse(engine.get("/v1/users/spike-" + std::to_string(i) + "/models"), nullptr, false);
    if (models.is_array() && models.size() > 1) duplicates += static_cast<int>(models.size()) - 1;
  }
  peak_rss = std::max(peak_rss, engine.peak_rss_mb());
  // What the store holds at the end: its part of the growth.
  const auto store_mb = [&](const char* part) {
    return engine.metric("tailor_store_memory_bytes", "part", part) / (1024.0 * 1024.0);
  };
  const double memtables_mb = store_mb("memtables"), block_cache_mb = store_mb("block_cache");
  // What the store was given to write per sign-up, by table: its WAL, memtables and files.
  json written_by_table = json::object();
  double written_kb = 0;
  for (const char* table : {"users", "models", "jobs", "job_requests", "requests", "history"}) {
    const double kb =
        engine.metric("tailor_store_written_bytes_total", "table", table) / 1024.0 / o.jobs;
    written_by_table[table] = kb;
    written_kb += kb;
  }
  const double wall_s =
      std::chrono::duration<double>((ended > 0 ? ends.last_end() : clock::now()) - t0).count();
  auto count = [&](const char* type) {
    auto it = counts.find(type);
    return it == counts.end() ? 0 : it->second;
  };
  json out;
  // What the process keeps once the spike is over: tailord hands the heap
  // malloc no longer uses back after memory_trim_idle_seconds idle. Read
  // after its first trim, or `settle_seconds` when none comes.
  const double trims_before = engine.metric("tailor_memory_trims_total");
  const auto settle_deadline =
      clock::now() + std::chrono::duration_cast<clock::duration>(
                         std::chrono::duration<double>(o.settle_seconds));
  while (clock::now() < settle_deadline &&
         engine.metric("tailor_memory_trims_total") <= trims_before)
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  out["settled_rss_mb"] = engine.rss_mb();
  out["memory_trimmed_mb"] = engine.metric("tailor_memory_trimmed_bytes_total") / (1024.0 * 1024.0);
  out["jobs"] = o.jobs;
  out["slots"] = o.slots;
  out["steps"] = o.steps;
  out["admission_queue"] = o.admission_queue;
  out["submitted"] = o.jobs;
  out["completed"] = count("model.ready") - duplicates;
  out["failed"] = count("job.failed");
  out["cancelled"] = count("job.cancelled");
  out["lost"] = o.jobs - static_cast<int>(ended);
  out["duplicates"] = duplicates;
  out["idle_rss_mb"] = idle_rss;
  out["peak_rss_mb"] = peak_rss;
  out["rss_growth_mb"] = peak_rss - idle_rss;
  out["store_memtables_mb"] = memtables_mb;
  out["store_block_cache_mb"] = block_cache_mb;
  out["store_memory_mb"] = o.store_memory_mb;
  out["text_bytes"] = o.text_bytes;
  out["store_written_kb_per_job"] = written_kb;
  out["store_written_kb_per_job_by_table"] = written_by_table;
  out["slot_utilization"] = drained > first_admission && first_admission > 0
                                ? train_s / (o.slots * (drained - first_admission))
                                : 0.0;
  out["training_seconds"] = train_s;
  out["max_consumer_lag"] = max_lag;
  out["jobs_per_min"] = wall_s > 0 ? ended * 60.0 / wall_s : 0.0;
  out["publish_s"] = publish_s;
  out["wall_s"] = wall_s;
  out["retries"] = count("job.retrying");
  out["engine_exit_status"] = engine.stop();
  return out;
}

}  // namespace tailor::bench
