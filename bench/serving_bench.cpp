#include "serving_bench.hpp"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <stdexcept>
#include <thread>

#include "engine_run.hpp"
#include "interrupt.hpp"
#include "model/checkpoint.hpp"
#include "model/pretrain.hpp"
#include "progress.hpp"
#include "run_stats.hpp"
#include "zipf.hpp"
#include "storage/metadata_store.hpp"

namespace tailor::bench {

namespace {

using json = nlohmann::json;
using clock = std::chrono::steady_clock;

std::string user_of(int k) {
  return "user-" + std::to_string(k);
}

// Registers `n` adapters (random, of the trained shape of `base`, the
// configuration of o.base_model) for users 0..n-1 in a fresh data
// directory, as a finished onboarding would have.
void register_adapters(const std::string& data_dir, int n, const model::model_config& base,
                       const serving_options& o) {
  std::filesystem::create_directories(data_dir);
  auto db = storage::metadata_store::open(data_dir + "/metadata");
  if (!db) throw std::runtime_error("metadata store: " + caf::to_string(db.error()));
  model::lora_config lc;
  lc.rank = o.rank;
  for (int k = 0; k < n; ++k) {
    auto ad = model::lora_adapter::init(base, lc, static_cast<uint64_t>(k) + 1);
    torch::NoGradGuard no_grad;
    for (auto& layer : ad.layers)
      for (auto& p : layer) p.b = torch::randn_like(p.b) * 0.02;  // a trained-looking B
    auto bytes = model::encode_adapter(ad, base);
    if (!bytes) throw std::runtime_error("encode: " + caf::to_string(bytes.error()));
    auto m = storage::register_ready_adapter(**db, data_dir + "/artifacts", user_of(k),
                                             "model-bench-" + std::to_string(k), o.base_model,
                                             *bytes);
    if (!m) throw std::runtime_error("register an adapter: " + caf::to_string(m.error()));
  }
}

// Adapter ranks for each request: Zipf(a) over n adapters, the same sequence
// for every run of the same n.
std::vector<int> zipf_draws(int n, double a, int count, uint64_t seed) {
  const zipf draw(n, a);
  std::mt19937_64 rng(seed);
  std::vector<int> out;
  for (int i = 0; i < count; ++i) out.push_back(draw(rng));
  return out;
}

// Cumulative bucket counts of tailord's overhead histogram, by upper bound.
std::vector<std::pair<double, double>> overhead_buckets(const engine_run& engine) {
  std::vector<std::pair<double, double>> out;
  const std::string key = "tailor_inference_overhead_ms_hist_bucket{le=\"";
  auto text = engine.get("/metrics");
  for (std::size_t pos = text.find(key); pos != std::string::npos; pos = text.find(key, pos + 1)) {
    auto le_end = text.find('"', pos + key.size());
    auto le = text.substr(pos + key.size(), le_end - pos - key.size());
    double bound = le == "+Inf" ? std::numeric_limits<double>::infinity() : std::stod(le);
    out.emplace_back(bound, std::stod(text.substr(text.find(' ', le_end) + 1)));
  }
  return out;
}

// The q-quantile of the samples between two scrapes of the histogram,
// interpolated within its bucket (Prometheus' histogram_quantile).
// Waits (up to 10 s) until tailord has observed `n` overheads: it observes
// one when the answer's delivery report is back, which can come after the
// bench already read the answer. Without this wait the warm-up's slow first
// requests would count as measured ones.
void await_overheads(const engine_run& engine, double n) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < until) {
    throw_if_interrupted();
    auto b = overhead_buckets(engine);
    if (!b.empty() && b.back().second >= n) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  std::fprintf(stderr, "note: tailord observed fewer than %.0f request overheads\n", n);
}

double quantile_between(const std::vector<std::pair<double, double>>& before,
                        const std::vector<std::pair<double, double>>& after, double q) {
  if (after.empty()) return 0;
  auto count = [&](std::size_t i) {
    return after[i].second - (i < before.size() ? before[i].second : 0);
  };
  const double total = count(after.size() - 1);
  if (total <= 0) return 0;
  double prev_bound = 0, prev_count = 0;
  for (std::size_t i = 0; i < after.size(); ++i) {
    double c = count(i);
    if (c >= q * total) {
      if (std::isinf(after[i].first)) return prev_bound;
      return prev_bound + (after[i].first - prev_bound) * (q * total - prev_count) /
                              std::max(1.0, c - prev_count);
    }
    prev_bound = after[i].first;
    prev_count = c;
  }
  return prev_bound;
}

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<std::size_t>(q * static_cast<double>(v.size())))];
}

struct result_log {
  std::mutex mtx;
  std::condition_variable cv;
  std::map<std::string, clock::time_point> sent;
  std::vector<double> latency_ms, ttft_ms, cold_load_ms, transport_ms;
  std::map<std::string, std::vector<double>> timings;  // tailord's breakdown, by field
  int64_t completion_tokens = 0;
  int received = 0, errors = 0;
  std::string first_error;
};

// Forgets what was measured so far (the warm-up); called with the lock held.
result_log& result_log_reset(result_log& log) {
  log.sent.clear();
  log.latency_ms.clear();
  log.ttft_ms.clear();
  log.cold_load_ms.clear();
  log.transport_ms.clear();
  log.timings.clear();
  log.completion_tokens = 0;
  log.received = 0;
  return log;
}

// The configuration of a run's tailord (serving and Kafka settings; engine_run
// adds the data directory and topic names).
json tailord_config(const serving_options& o, int max_batch, const std::string& products) {
  json config = o.config;  // the operator's, with the bench's own options over it
  config.merge_patch({{"base_models", {o.base_model}},
                      {"default_base_model", o.base_model},
                      {"serving",
                       {{"max_batch", max_batch},
                        {"max_requests_per_user", 100000},
                        {"batch_thread", o.batch_thread},
                        {"kv_cache", o.kv_cache},
                        {"products", products}}},
                      {"kafka", {{"topic_partitions", o.partitions}}},
                      {"compute", {{"intra_op_threads", 1}, {"blas_threads", 1}}}});
  if (o.store_memory_mb >= 0) config["store_memory_mb"] = o.store_memory_mb;
  return config;
}

// One run: a tailord with `n` adapters of `base` and `max_batch`, the
// requests sent closed- or open-loop; its figures.
json run_once(const serving_options& o, const model::model_config& base, int n, int max_batch,
              const std::string& products, const char* label) {
  engine_run_options ro;
  ro.bootstrap = o.bootstrap;
  ro.keep_topics = o.keep_topics;
  ro.tailord = o.tailord;
  ro.config = tailord_config(o, max_batch, products);
  ro.prepare = [&](const std::string& dir) { register_adapters(dir, n, base, o); };
  std::fprintf(stderr, "%s: %d adapters, batch up to %d: starting tailord...\n", label, n,
               max_batch);
  engine_run engine(ro);
  result_log log;
  topic_watch results(engine.bootstrap(), engine.topic("results"), [&](const json& j) {
    auto now = clock::now();
    std::lock_guard<std::mutex> g(log.mtx);
    auto it = log.sent.find(j.value("request_id", ""));
    if (it == log.sent.end()) return;
    const double latency = std::chrono::duration<double, std::milli>(now - it->second).count();
    log.latency_ms.push_back(latency);
    log.sent.erase(it);
    ++log.received;
    if (j.contains("error")) {
      ++log.errors;
      if (log.first_error.empty()) log.first_error = j["error"].dump();
    } else {
      const auto& t = j["timings_ms"];
      log.ttft_ms.push_back(t.value("queue", 0.0) + t.value("adapter_load", 0.0) +
                            t.value("prefill", 0.0));
      if (t.value("adapter_load", 0.0) > 0) log.cold_load_ms.push_back(t["adapter_load"]);
      // Outside tailord's "total" (user actor taking the request to the GPU
      // actor answering it): Kafka both ways, the ingress and the publishing.
      log.transport_ms.push_back(std::max(0.0, latency - t.value("total", 0.0)));
      for (const auto& [field, ms] : t.items())
        if (ms.is_number()) log.timings[field].push_back(ms.get<double>());
      log.completion_tokens += j["usage"].value("completion_tokens", 0);
    }
    log.cv.notify_all();
  });
  bench_producer producer(engine.bootstrap(), o.client_linger_ms);
  auto draws = zipf_draws(n, o.zipf, o.requests, 42);
  auto send_as = [&](const std::string& user, const std::string& id, const std::string& prompt,
                     int seed) {
    json req = {{"type", "inference.request"},
                {"schema_version", 1},
                {"user_id", user},
                {"request_id", id},
                {"prompt", prompt},
                {"max_tokens", o.max_tokens},
                {"seed", seed},
                {"temperature", 0.7},
                // Every request generates max_tokens, as load tests do (vLLM's ignore_eos).
                {"ignore_end_of_text", true}};
    {
      std::lock_guard<std::mutex> g(log.mtx);
      log.sent[id] = clock::now();
    }
    producer.send(engine.topic("inference"), user, req.dump());
  };
  auto send = [&](int i) {
    send_as(user_of(draws[static_cast<std::size_t>(i)]),
            std::string(label) + "-" + std::to_string(i),
            "Tell me something about number " + std::to_string(i) + ".", i);
  };
  cli::progress_bar bar;
  auto draw = [&](double started) {
    std::lock_guard<std::mutex> g(log.mtx);
    double elapsed =
        std::chrono::duration<double>(clock::now().time_since_epoch()).count() - started;
    bar.update(static_cast<double>(log.received) / o.requests,
               std::string(label) + " " + std::to_string(log.received) + "/" +
                   std::to_string(o.requests) + " answered | " + cli::format_duration(elapsed));
  };
  // Warm-up: first steps, allocations and Kafka metadata are slow once; the
  // figures are of the steady state after them.
  const int warm = std::min(o.concurrency, o.requests);
  {
    auto warm_draws = zipf_draws(n, o.zipf, warm, 43);
    for (int i = 0; i < warm; ++i)
      send_as(user_of(warm_draws[static_cast<std::size_t>(i)]),
              std::string(label) + "-warm-" + std::to_string(i), "Warm up.", i);
    producer.flush();
    std::unique_lock<std::mutex> lock(log.mtx);
    const auto warm_deadline = clock::now() + std::chrono::minutes(5);
    while (log.received < warm) {
      if (clock::now() > warm_deadline)
        throw std::runtime_error(std::string(label) + ": the warm-up requests were not answered");
      throw_if_interrupted();
      log.cv.wait_for(lock, std::chrono::milliseconds(100));
    }
    result_log_reset(log);
  }
  await_overheads(engine, warm);
  const auto overhead0 = overhead_buckets(engine);
  const auto reused0 = engine.metric("tailor_prompt_tokens_total", "source", "reused");
  const auto computed0 = engine.metric("tailor_prompt_tokens_total", "source", "computed");
  const auto hits0 = engine.metric("tailor_adapter_cache_hits_total", "tier", "device");
  const auto misses0 = engine.metric("tailor_adapter_cache_misses_total", "tier", "device");
  auto batch_thread = [&](const char* state) {
    return engine.metric_sum("tailor_batch_thread_seconds_total",
                             std::string("state=\"") + state + "\"");
  };
  const double running0 = batch_thread("running"), runnable0 = batch_thread("runnable");
  const double helped0 = engine.metric_sum("tailor_step_helper_chunks_total", "device="),
               late0 = engine.metric_sum("tailor_step_helper_late_total", "device="),
               lent0 = engine.metric_sum("tailor_step_helper_lent_total", "device="),
               eligible0 = engine.metric_sum("tailor_step_helper_eligible_steps_total", "device="),
               helper_steps0 = engine.metric_sum("tailor_step_helper_steps_total", "device="),
               busy0 = engine.metric_sum("tailor_serving_busy_seconds_total", "device=");
  const double started = std::chrono::duration<double>(clock::now().time_since_epoch()).count();
  const auto cpu0 = read_cpu_times();
  const auto tailord_threads0 = thread_cpu_ticks(engine.pid());
  const auto bench_threads0 = thread_cpu_ticks(::getpid());
  const auto tailord_switches0 = thread_context_switches(engine.pid());
  const auto bench_switches0 = thread_context_switches(::getpid());
  const auto t0 = clock::now();
  const auto deadline = t0 + std::chrono::minutes(30);
  if (o.rate > 0) {
    // Open loop: Poisson arrivals, whatever the engine's pace.
    std::mt19937_64 rng(7);
    std::exponential_distribution<double> gap(o.rate);
    auto next = clock::now();
    for (int i = 0; i < o.requests; ++i) {
      next += std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(gap(rng)));
      std::this_thread::sleep_until(next);
      throw_if_interrupted();
      send(i);
      if (i % 16 == 0) producer.poll();
      draw(started);
    }
    producer.flush();
  } else {
    // Closed loop: `concurrency` requests outstanding at every moment.
    int next = 0;
    while (true) {
      int outstanding;
      {
        std::lock_guard<std::mutex> g(log.mtx);
        outstanding = next - log.received;
      }
      while (outstanding < o.concurrency && next < o.requests) {
        send(next++);
        ++outstanding;
      }
      producer.poll();
      draw(started);
      throw_if_interrupted();
      std::unique_lock<std::mutex> lock(log.mtx);
      if (log.received >= o.requests) break;
      if (clock::now() > deadline) break;
      log.cv.wait_for(lock, std::chrono::milliseconds(5));
    }
  }
  {
    std::unique_lock<std::mutex> lock(log.mtx);
    while (log.received < o.requests && clock::now() < deadline) {
      throw_if_interrupted();
      log.cv.wait_for(lock, std::chrono::milliseconds(100));
    }
  }
  const double wall = std::chrono::duration<double>(clock::now() - t0).count();
  const double stolen = steal_share(cpu0, read_cpu_times());
  const auto tailord_threads1 = thread_cpu_ticks(engine.pid());
  const auto bench_threads1 = thread_cpu_ticks(::getpid());
  const auto tailord_switches1 = thread_context_switches(engine.pid());
  const auto bench_switches1 = thread_context_switches(::getpid());
  bar.done();
  const auto hits = engine.metric("tailor_adapter_cache_hits_total", "tier", "device") - hits0;
  const auto misses =
      engine.metric("tailor_adapter_cache_misses_total", "tier", "device") - misses0;
  json out;
  std::lock_guard<std::mutex> g(log.mtx);
  if (log.received < o.requests)
    throw std::runtime_error(std::string(label) + ": only " + std::to_string(log.received) +
                             " of " + std::to_string(o.requests) + " requests were answered");
  if (log.errors > 0)
    throw std::runtime_error(std::string(label) + ": " + std::to_string(log.errors) +
                             " error results, e.g. " + log.first_error);
  out["adapters"] = n;
  out["max_batch"] = max_batch;
  out["requests"] = o.requests;
  out["req_per_s"] = o.requests / wall;
  out["tokens_per_s"] = static_cast<double>(log.completion_tokens) / wall;
  out["p50_ms"] = percentile(log.latency_ms, 0.5);
  out["p99_ms"] = percentile(log.latency_ms, 0.99);
  out["ttft_p50_ms"] = percentile(log.ttft_ms, 0.5);
  out["cache_hit_rate"] = hits + misses > 0 ? hits / (hits + misses) : 0.0;
  out["cold_load_p50_ms"] = percentile(log.cold_load_ms, 0.5);
  // Where the latency goes, as tailord reports it (p50 and p99 of each
  // field of timings_ms); what p50_ms adds to "total" is Kafka both ways.
  for (const auto& [field, v] : log.timings)
    out["timings_ms"][field] = {{"p50", percentile(v, 0.5)}, {"p99", percentile(v, 0.99)}};
  out["transport_p50_ms"] = percentile(log.transport_ms, 0.5);
  out["transport_p99_ms"] = percentile(log.transport_ms, 0.99);
  await_overheads(engine, warm + o.requests);
  const auto overhead1 = overhead_buckets(engine);
  const double reused = engine.metric("tailor_prompt_tokens_total", "source", "reused") - reused0,
               computed =
                   engine.metric("tailor_prompt_tokens_total", "source", "computed") - computed0;
  out["prompt_tokens_reused_fraction"] = reused + computed > 0 ? reused / (reused + computed) : 0.0;
  out["overhead_p50_ms"] = quantile_between(overhead0, overhead1, 0.5);
  out["overhead_p99_ms"] = quantile_between(overhead0, overhead1, 0.99);
  out["mean_batch"] = engine.metric("tailor_serving_rows_total") /
                      std::max(1.0, engine.metric("tailor_serving_steps_total"));
  out["wall_s"] = wall;
  // Of the machine's CPU time during the run, the share the hypervisor gave
  // other guests: a run with much of it measured a busier host, not tailord.
  out["cpu_steal"] = stolen;
  // Where a request's CPU went: microseconds of each tailord thread (by
  // name: tailor.batch.0 is the batch loop, caf.* the actors, rdk:* Kafka's)
  // and of this bench's, per measured request.
  const double ticks = static_cast<double>(::sysconf(_SC_CLK_TCK));
  out["cpu_us_per_request"] = {
      {"tailord", cpu_us_per_request(tailord_threads0, tailord_threads1, o.requests, ticks)},
      {"bench", cpu_us_per_request(bench_threads0, bench_threads1, o.requests, ticks)}};
  out["step_cpu_us_per_request"] = step_cpu_us(out["cpu_us_per_request"]["tailord"]);
  out["switches_per_request"] = {
      {"tailord", switches_per_request(tailord_switches0, tailord_switches1, o.requests)},
      {"bench", switches_per_request(bench_switches0, bench_switches1, o.requests)}};
  // Whether tailord's batch loop got the realtime policy it was asked for.
  out["batch_thread_realtime"] =
      engine.metric_sum("tailor_batch_thread_realtime", "device=") > 0;
  // Of the run's wall time, the share the batch loop's thread spent on a
  // core, and ready but kept from one by other threads of the machine.
  out["batch_thread_running"] = (batch_thread("running") - running0) / wall;
  out["batch_thread_runnable"] = (batch_thread("runnable") - runnable0) / wall;
  out["steps_per_s"] = engine.metric("tailor_serving_steps_total") / wall;
  // Of the wall time, the share the batch loop spent in steps (the rest
  // its batch was empty: between waves of requests, for one).
  out["batch_busy"] =
      (engine.metric_sum("tailor_serving_busy_seconds_total", "device=") - busy0) / wall;
  // What the step helper did: chunks it ran, and times the loop waited long
  // for one (then it sat out a while).
  out["helper_chunks"] =
      engine.metric_sum("tailor_step_helper_chunks_total", "device=") - helped0;
  out["helper_late_waits"] = engine.metric_sum("tailor_step_helper_late_total", "device=") - late0;
  out["helper_cores_lent"] = engine.metric_sum("tailor_step_helper_lent_total", "device=") - lent0;
  // Of the steps big enough for the helper, the share it took part in (its
  // trials decide, serving.step_helper auto), and its last trial's cost per
  // token with it over without (one device).
  const double eligible =
      engine.metric_sum("tailor_step_helper_eligible_steps_total", "device=") - eligible0;
  out["helper_steps_share"] =
      eligible > 0
          ? (engine.metric_sum("tailor_step_helper_steps_total", "device=") - helper_steps0) /
                eligible
          : 0.0;
  out["helper_ratio"] = engine.metric_sum("tailor_step_helper_ratio", "device=");
  std::fprintf(stderr,
               "%s: %.0f tokens/s, p50 %.0f ms, p99 %.0f ms, mean batch %.1f, transport p50 %.0f "
               "ms, batch loop on its core %.2f and kept from it %.2f of the time, in steps "
               "%.2f; tailord's CPU %.0f us a request, the batch loop's %.0f; the host stole "
               "%.2f of the CPU time\n",
               label, out["tokens_per_s"].get<double>(), out["p50_ms"].get<double>(),
               out["p99_ms"].get<double>(), out["mean_batch"].get<double>(),
               out["transport_p50_ms"].get<double>(), out["batch_thread_running"].get<double>(),
               out["batch_thread_runnable"].get<double>(), out["batch_busy"].get<double>(),
               out["cpu_us_per_request"]["tailord"].value("total", 0.0),
               out["cpu_us_per_request"]["tailord"].value("tailor.batch.0", 0.0), stolen);
  return out;
}

}  // namespace

json run_serving(const serving_options& given) {
  serving_options o = given;
  if (!o.tailord_config.empty())
    if (auto err = read_tailord_config(o.tailord_config, o.config); !err.empty())
      throw std::runtime_error(err);
  // Before a broker starts: a name no configuration has is the caller's mistake.
  const auto base_cfg = model::named_config(o.base_model);
  if (!base_cfg)
    throw std::runtime_error("--base-model: " + caf::to_string(base_cfg.error()));
  json out;
  // One broker for every run: engine_run would start one for each, and an
  // open loop in the first run on a new broker fell behind in Kafka
  // (docs/measurements.md, 2026-12-03 afternoon), so every run would measure that.
  std::optional<kafka_broker> broker;
  if (o.bootstrap.empty()) {
    broker.emplace((std::filesystem::temp_directory_path() /
                    ("tailor-bench-broker-" + std::to_string(::getpid())))
                       .string());
    o.bootstrap = broker->bootstrap();
  }
  out["zipf"] = o.zipf;
  out["max_tokens"] = o.max_tokens;
  if (o.rate > 0)
    out["rate"] = o.rate;
  else
    out["concurrency"] = o.concurrency;
  out["repeats"] = o.repeats;
  out["partitions"] = o.partitions;
  out["client_linger_ms"] = o.client_linger_ms;
  out["batch_thread"] = o.batch_thread;
  out["kv_cache"] = o.kv_cache;
  out["store_memory_mb"] = o.store_memory_mb;
  out["products"] = o.products;
  out["baseline_products"] = o.baseline_products;
  out["base_model"] = o.base_model;
  // What a one-row step reads for its products, against the core's L2: a
  // base whose weights fit in L2 gains less from batching (bench/README.md).
  out["base_product_params"] = base_cfg->product_params();
  const long l2 = ::sysconf(_SC_LEVEL2_CACHE_SIZE);
  out["l2_cache_bytes"] = l2 > 0 ? l2 : 0;
  // A per-model endpoint serves one request at a time: no cross-user batch.
  const int baseline_n = std::find(o.adapters.begin(), o.adapters.end(), 100) != o.adapters.end()
                             ? 100
                             : o.adapters.front();
  std::vector<std::vector<json>> batched(o.adapters.size());
  std::vector<json> baseline;
  for (int round = 1; round <= o.repeats; ++round) {
    // Also the prefix of the run's request ids.
    const std::string suffix = o.repeats > 1 ? "-round" + std::to_string(round) : "";
    for (std::size_t i = 0; i < o.adapters.size(); ++i)
      batched[i].push_back(
          run_once(o, *base_cfg, o.adapters[i], o.max_batch, o.products,
                   ("batched" + suffix).c_str()));
    if (o.baseline)
      baseline.push_back(
          run_once(o, *base_cfg, baseline_n, 1, o.baseline_products,
                   ("baseline" + suffix).c_str()));
  }
  out["runs"] = json::array();
  for (const auto& runs : batched) out["runs"].push_back(median_run(runs, "tokens_per_s"));
  if (o.baseline) {
    auto b = median_run(baseline, "tokens_per_s");
    out["baseline"] = {{"adapters", baseline_n}, {"tokens_per_s", b["tokens_per_s"]}, {"run", b}};
    for (std::size_t i = 0; i < o.adapters.size(); ++i)
      if (o.adapters[i] == baseline_n) {
        out["batched_over_baseline"] = out["runs"][i]["tokens_per_s"].get<double>() /
                                       b["tokens_per_s"].get<double>();
        // The same ratio within each round (a round runs every configuration
        // back to back), and their median.
        const auto by_round = round_ratios(batched[i], baseline, "tokens_per_s");
        out["batched_over_baseline_by_round"] = by_round;
        out["batched_over_baseline_round_median"] = median(by_round);
        // The baseline's step CPU a request over the batched run's, by
        // round: what batching saves the engine's compute, so the ratio of
        // tokens a second if the batch loop were all the machine ran.
        // Missing where /proc could not be read.
        auto measured = [](const std::vector<json>& rs) {
          return std::all_of(rs.begin(), rs.end(), [](const json& r) {
            return r.value("step_cpu_us_per_request", 0.0) > 0;
          });
        };
        std::string cpu_text;
        if (measured(baseline) && measured(batched[i])) {
          const auto cpu = round_ratios(baseline, batched[i], "step_cpu_us_per_request");
          out["baseline_step_cpu_over_batched_by_round"] = cpu;
          out["baseline_step_cpu_over_batched"] = median(cpu);
          char text[96];
          std::snprintf(text, sizeof text,
                        "; the baseline's step CPU a request was %.2f times theirs", median(cpu));
          cpu_text = text;
        }
        std::fprintf(stderr,
                     "%d adapters: %.2f times the baseline's tokens a second (round median)%s\n",
                     baseline_n, median(by_round), cpu_text.c_str());
        if (l2 > 0)
          std::fprintf(stderr,
                       "%s's products read %.2f MiB of bfloat16 weights a step; this core's "
                       "L2 holds %.2f MiB\n",
                       o.base_model.c_str(), 2.0 * base_cfg->product_params() / (1 << 20),
                       static_cast<double>(l2) / (1 << 20));
      }
  }
  const auto& runs = out["runs"];
  if (runs.size() >= 2) {
    out["last_over_first"] =
        runs.back()["tokens_per_s"].get<double>() / runs.front()["tokens_per_s"].get<double>();
    const auto by_round = round_ratios(batched.back(), batched.front(), "tokens_per_s");
    out["last_over_first_by_round"] = by_round;
    out["last_over_first_round_median"] = median(by_round);
    std::fprintf(stderr, "%d adapters: %.2f times the tokens a second of %d (round median)\n",
                 o.adapters.back(), median(by_round), o.adapters.front());
  }
  return out;
}

}  // namespace tailor::bench
