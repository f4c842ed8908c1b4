#include "actors/metrics.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

namespace tailor::actors {

namespace {
// Histogram bounds (ms) of tailor_inference_overhead_ms_hist.
const std::vector<double> overhead_bounds = {0.5, 1,   2,   3,   5,   7.5, 10,  15,   20,   30,  50,
                                             75,  100, 150, 200, 300, 500, 750, 1000, 2000, 5000};
// Of tailor_inference_latency_ms: from a hot answer of a few tokens to a
// long one that waited for a cold adapter (the deadline is 60 s).
const std::vector<double> latency_bounds = {1,    2,    5,    10,    20,    50,    100,  200,
                                            500,  1000, 2000, 5000, 10000, 20000, 60000};
// Of tailor_job_duration_seconds: from a small job on an idle slot to one
// that waited through a spike of sign-ups.
const std::vector<double> job_bounds = {1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600};

histogram& of(std::map<std::string, histogram>& m, const std::string& key,
              const std::vector<double>& bounds) {
  return m.try_emplace(key, bounds).first->second;
}
}  // namespace

void histogram::observe(double v) {
  for (std::size_t i = 0; i < bounds_.size(); ++i)
    if (v <= bounds_[i]) ++counts_[i];
  sum_ += v;
  ++count_;
}

void histogram::render(std::ostream& out, const std::string& name,
                       const std::string& labels) const {
  const auto lead = labels.empty() ? std::string() : labels + ",";
  for (std::size_t i = 0; i < bounds_.size(); ++i)
    out << name << "_bucket{" << lead << "le=\"" << bounds_[i] << "\"} " << counts_[i] << '\n';
  out << name << "_bucket{" << lead << "le=\"+Inf\"} " << count_ << '\n';
  const auto braced = labels.empty() ? std::string() : "{" + labels + "}";
  out << name << "_sum" << braced << ' ' << sum_ << '\n'
      << name << "_count" << braced << ' ' << count_ << '\n';
}

double histogram::quantile(double q) const {
  if (count_ == 0) return 0;
  const double rank = q * static_cast<double>(count_);
  double lower = 0, below = 0;
  for (std::size_t i = 0; i < bounds_.size(); ++i) {
    const auto in = static_cast<double>(counts_[i]);
    if (in >= rank) {
      const double share = in > below ? (rank - below) / (in - below) : 1.0;
      return lower + (bounds_[i] - lower) * share;
    }
    lower = bounds_[i];
    below = in;
  }
  return bounds_.empty() ? 0 : bounds_.back();
}

metrics::metrics(std::size_t max_user_series)
    : model_requests_(max_user_series),
      user_requests_(max_user_series),
      overhead_hist_(overhead_bounds) {}

void bounded_counts::add(const std::string& key, int64_t d) {
  auto it = counts_.find(key);
  if (it == counts_.end()) {
    if (counts_.size() >= limit_) {
      auto fewest = by_count_.begin();
      other_ += fewest->first;
      counts_.erase(fewest->second);
      by_count_.erase(fewest);
    }
    it = counts_.emplace(key, 0).first;
  } else {
    by_count_.erase({it->second, key});
  }
  it->second += d;
  by_count_.emplace(it->second, key);
}

void bounded_counts::fold(const std::string& key) {
  auto it = counts_.find(key);
  if (it == counts_.end()) return;
  other_ += it->second;
  by_count_.erase({it->second, key});
  counts_.erase(it);
}

void metrics::observe_job(const std::string& status, double seconds) {
  std::lock_guard<std::mutex> g(mtx_);
  of(job_duration_, status, job_bounds).observe(seconds);
}

void metrics::observe_inference(double engine_ms, double ms, bool adapter_loaded) {
  std::lock_guard<std::mutex> g(mtx_);
  of(latency_, adapter_loaded ? "loaded" : "resident", latency_bounds).observe(engine_ms);
  overhead_hist_.observe(ms);
  if (overhead_.size() < overhead_window)
    overhead_.push_back(ms);
  else
    overhead_[overhead_next_] = ms;
  overhead_next_ = (overhead_next_ + 1) % overhead_window;
  ++overhead_count_;
  overhead_sum_ += ms;
}

nlohmann::json metrics::summary() const {
  using nlohmann::json;
  std::lock_guard<std::mutex> g(mtx_);
  // To a hundredth: bucket interpolation is no finer than that.
  auto quantiles = [](const histogram& h) {
    auto round = [](double v) { return std::round(v * 100) / 100; };
    return json{{"count", h.count()},
                {"p50", round(h.quantile(0.5))},
                {"p99", round(h.quantile(0.99))}};
  };
  json paused = json::array();
  for (const auto& [topic, on] : paused_)
    if (on != 0) paused.push_back(topic);
  json latency = json::object();
  for (const auto& [adapter, h] : latency_) latency[adapter] = quantiles(h);
  json durations = json::object();
  for (const auto& [status, h] : job_duration_) durations[status] = quantiles(h);
  return {{"consumer_lag", lag_},
          {"kafka_brokers_up", kafka_brokers_up_},
          {"in_flight", in_flight_},
          {"paused", paused},
          {"dlq", dlq_.load()},
          {"errors", errors_},
          {"training",
           {{"queue", training_queue_.load()},
            {"assigned", training_assigned_.load()},
            {"jobs", jobs_},
            {"duration_s", durations}}},
          {"inference",
           {{"latency_ms", latency},
            {"overhead_ms", quantiles(overhead_hist_)},
            {"steps", serving_steps_.load()},
            {"rows", serving_rows_.load()}}},
          {"user_actors", users_.load()},
          {"group",
           {{"instances_live", group_live_.load()},
            {"open_jobs", group_open_jobs_.load()},
            {"orphaned_jobs", group_orphaned_jobs_.load()}}}};
}

uint64_t resident_memory_bytes() {
  long pages = 0, resident = 0;
  if (std::ifstream statm("/proc/self/statm"); statm >> pages >> resident)
    return static_cast<uint64_t>(resident) * static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  return 0;
}

int64_t metrics::work_done() const {
  std::lock_guard<std::mutex> g(mtx_);
  int64_t n = serving_steps_.load();
  for (const auto& [topic, count] : events_in_) n += count;
  return n;
}

std::string metrics::not_ready(std::size_t expected) const {
  std::lock_guard<std::mutex> g(mtx_);
  if (joined_.size() < expected) return "consumers have not joined their group yet";
  std::string away;
  for (const auto& [client, up] : kafka_brokers_up_)
    if (up == 0) away += (away.empty() ? "" : ", ") + client;
  if (!away.empty()) return "no Kafka broker reachable (" + away + ")";
  return {};
}

std::string metrics::render() const {
  std::ostringstream out;
  std::lock_guard<std::mutex> g(mtx_);
  auto family = [&](const char* name, const char* type, const char* help, const char* label,
                    const std::map<std::string, int64_t>& m) {
    out << "# HELP " << name << ' ' << help << "\n# TYPE " << name << ' ' << type << '\n';
    for (const auto& [k, v] : m) out << name << '{' << label << "=\"" << k << "\"} " << v << '\n';
  };
  family("tailor_events_in_total", "counter", "Events read per input topic.", "topic", events_in_);
  family("tailor_events_out_total", "counter", "Events delivered per output topic.", "topic",
         events_out_);
  family("tailor_errors_total", "counter", "Answers carrying an error, by code.", "code", errors_);
  family("tailor_consumer_lag", "gauge", "Messages behind the end of the input topic.", "topic",
         lag_);
  family("tailor_ingress_in_flight", "gauge", "Events read but not yet answered.", "topic",
         in_flight_);
  family("tailor_kafka_brokers_up", "gauge",
         "Kafka brokers a consumer of tailord is connected to (librdkafka's statistics, each "
         "second); 0: it reaches none.",
         "client", kafka_brokers_up_);
  family("tailor_ingress_paused", "gauge", "1 while consumption is paused by backpressure.",
         "topic", paused_);
  family("tailor_ingress_pauses_total", "counter", "Times consumption was paused.", "topic",
         pauses_);
  family("tailor_jobs_total", "counter", "Fine-tuning jobs ended, by final status.", "status",
         jobs_);
  if (!overhead_.empty()) {
    auto sorted = overhead_;
    std::sort(sorted.begin(), sorted.end());
    out << "# HELP tailor_inference_overhead_ms Time in the engine outside batch steps and "
           "adapter loads (last "
        << overhead_window << " requests).\n# TYPE tailor_inference_overhead_ms summary\n";
    for (double q : {0.5, 0.9, 0.99}) {
      auto i = std::min(sorted.size() - 1, static_cast<std::size_t>(q * sorted.size()));
      out << "tailor_inference_overhead_ms{quantile=\"" << q << "\"} " << sorted[i] << '\n';
    }
    out << "tailor_inference_overhead_ms_sum " << overhead_sum_ << '\n'
        << "tailor_inference_overhead_ms_count " << overhead_count_ << '\n';
    // The same samples as a histogram (all of them, not a window), so that a
    // load test can take the quantiles of its own interval from two scrapes.
    out << "# HELP tailor_inference_overhead_ms_hist Time in the engine outside batch steps and "
           "adapter loads.\n# TYPE tailor_inference_overhead_ms_hist histogram\n";
    overhead_hist_.render(out, "tailor_inference_overhead_ms_hist", "");
  }
  if (!latency_.empty()) {
    out << "# HELP tailor_inference_latency_ms Time in the engine from reading an inference "
           "request to its result's delivery report; adapter: resident, or loaded (the request "
           "waited for it).\n# TYPE tailor_inference_latency_ms histogram\n";
    for (const auto& [adapter, h] : latency_)
      h.render(out, "tailor_inference_latency_ms", "adapter=\"" + adapter + "\"");
  }
  if (!job_duration_.empty()) {
    out << "# HELP tailor_job_duration_seconds Time from an onboarding request to its job's "
           "end, by final status.\n# TYPE tailor_job_duration_seconds histogram\n";
    for (const auto& [status, h] : job_duration_)
      h.render(out, "tailor_job_duration_seconds", "status=\"" + status + "\"");
  }
  struct cache_family {
    const char* event;
    const char* name;
    const char* help;
  };
  static const cache_family cache_families[] = {
      {"hit", "tailor_adapter_cache_hits_total", "Adapter lookups found in the tier."},
      {"miss", "tailor_adapter_cache_misses_total", "Adapter lookups not found in the tier."},
      {"load", "tailor_adapter_cache_loads_total", "Adapters loaded from the tier."},
      {"eviction", "tailor_adapter_cache_evictions_total", "Adapters evicted from the tier."}};
  for (const auto& f : cache_families) {
    auto it = cache_.find(f.event);
    family(f.name, "counter", f.help, "tier",
           it == cache_.end() ? std::map<std::string, int64_t>{} : it->second);
  }
  // The busiest models and users by name, the rest as one "(other)": no id
  // has parentheses (messages/ids.hpp), so no user's series is mistaken
  // for it.
  auto bounded = [&](const char* name, const char* help, const char* label,
                     const bounded_counts& c) {
    auto m = c.counts();
    if (c.other() > 0) m["(other)"] += c.other();
    family(name, "counter", help, label, m);
  };
  bounded("tailor_model_requests_total", "Inference requests served, per model.", "model",
          model_requests_);
  bounded("tailor_user_requests_total", "Inference requests served, per user.", "user",
          user_requests_);
  family("tailor_serving_waiting", "gauge", "Requests waiting to join a batch.", "device",
         serving_waiting_);
  family("tailor_serving_active", "gauge", "Sequences in the batch.", "device", serving_active_);
  family("tailor_prefix_cache_bytes", "gauge",
         "Memory the prefix cache holds (keys and values of cached prompts).", "device",
         prefix_bytes_);
  family("tailor_serving_users", "gauge",
         "Users whose service a device keeps count of for fair admission.", "device",
         serving_users_);
  family("tailor_bank_places_used", "gauge",
         "Places of a device's adapter bank holding an adapter or reserved for one loading.",
         "device", bank_used_);
  family("tailor_bank_adapters_unplaced", "gauge",
         "Adapters requested on a device that have no place in its bank yet.", "device",
         bank_unplaced_);
  family("tailor_batch_thread_realtime", "gauge",
         "1 while a batch loop runs SCHED_FIFO (serving.batch_thread realtime).", "device",
         batch_realtime_);
  family("tailor_step_helper_chunks_total", "counter",
         "Chunks of batch steps a device's helper thread ran on an otherwise idle core "
         "(serving.step_helper).",
         "device", helper_chunks_);
  family("tailor_step_helper_late_total", "counter",
         "Times a batch loop waited over 200 us for a chunk its helper had begun (the "
         "machine's other cores were busy).",
         "device", helper_late_);
  family("tailor_serving_step_failures_total", "counter",
         "Batch steps that failed (an exception, such as out of memory): their requests got "
         "error results and the device went on with a fresh batch.",
         "device", step_failures_);
  family("tailor_kafka_producer_replacements_total", "counter",
         "Kafka producers replaced after a fatal error (by client id): the batches they held "
         "were sent again.",
         "producer", producer_replacements_);
  family("tailor_state_records_total", "counter",
         "Records read from the state topic: imported (a model another instance made ready), "
         "known (here already), followed (a job's or an instance's state) or rejected "
         "(unreadable, in the log).",
         "outcome", state_records_);
  family("tailor_job_cancels_passed_on_total", "counter",
         "Cancels of jobs that run on another instance, passed on through the state topic: "
         "sent (read here) or received (acted on here).",
         "way", cancels_passed_on_);
  family("tailor_users_deleted_total", "counter",
         "Users deleted (user.delete): here, or by another instance, whose erasure this one "
         "applied.",
         "by", users_deleted_);
  family("tailor_transactions_total", "counter",
         "Transactions of exactly-once output by outcome: committed, or aborted (their answers "
         "unseen by read_committed consumers, their events read again).",
         "outcome", transactions_);
  family("tailor_serving_device_restarts_total", "counter",
         "GPU actors that failed outside a batch step and were started afresh: the requests they "
         "held were sent again.",
         "device", device_restarts_);
  family("tailor_step_helper_lent_total", "counter",
         "Times a batch loop lent its core to its helper while it waited for the helper's chunk.",
         "device", helper_lent_);
  family("tailor_step_helper_eligible_steps_total", "counter",
         "Batch steps big enough for the step helper (16 tokens or more).", "device",
         helper_eligible_);
  family("tailor_step_helper_steps_total", "counter",
         "Batch steps the step helper took part in (serving.step_helper auto: half of each "
         "trial's, and those after a trial that found it faster).",
         "device", helper_steps_);
  if (!serving_products_.empty()) {
    out << "# HELP tailor_serving_products 1 for the kind of matrix products a device computes "
           "(serving.products as this CPU runs it: amx, bfloat16 or float32).\n"
           "# TYPE tailor_serving_products gauge\n";
    for (const auto& [device, kind] : serving_products_)
      out << "tailor_serving_products{device=\"" << device << "\",products=\"" << kind
          << "\"} 1\n";
  }
  out.precision(15);
  if (!serving_busy_.empty()) {
    out << "# HELP tailor_serving_busy_seconds_total Time a device's batch loop spent in steps; "
           "the rest of the time it had no sequence to step.\n"
           "# TYPE tailor_serving_busy_seconds_total counter\n";
    for (const auto& [device, s] : serving_busy_)
      out << "tailor_serving_busy_seconds_total{device=\"" << device << "\"} " << s << '\n';
  }
  if (!helper_ratio_.empty()) {
    out << "# HELP tailor_step_helper_ratio A device's batch step cost per token with its helper "
           "over without, in the last trial (serving.step_helper auto; 0: no trial yet). Under "
           "0.95 the helper takes part.\n"
           "# TYPE tailor_step_helper_ratio gauge\n";
    for (const auto& [device, r] : helper_ratio_)
      out << "tailor_step_helper_ratio{device=\"" << device << "\"} " << r << '\n';
  }
  if (!batch_thread_.empty()) {
    out << "# HELP tailor_batch_thread_seconds_total Time a batch loop's thread spent on a core "
           "(running) and ready but waiting for one (runnable).\n"
           "# TYPE tailor_batch_thread_seconds_total counter\n";
    for (const auto& [device, t] : batch_thread_)
      out << "tailor_batch_thread_seconds_total{device=\"" << device << "\",state=\"running\"} "
          << t.first << "\ntailor_batch_thread_seconds_total{device=\"" << device
          << "\",state=\"runnable\"} " << t.second << '\n';
  }
  auto gauge = [&](const char* name, const char* type, const char* help, auto value) {
    out << "# HELP " << name << ' ' << help << "\n# TYPE " << name << ' ' << type << '\n'
        << name << ' ' << value << '\n';
  };
  gauge("tailor_job_actor_failures_total", "counter",
        "Times a job's actor failed (not the job): the job started again from its last "
        "persisted state, or failed at its third.",
        job_actor_failures_.load());
  gauge("tailor_memory_trims_total", "counter",
        "Times an idle tailord handed the heap malloc held but no longer used back to the "
        "system (memory_trim_idle_seconds).",
        memory_trims_.load());
  gauge("tailor_memory_trimmed_bytes_total", "counter",
        "Resident memory those trims gave back.", memory_trimmed_bytes_.load());
  gauge("tailor_ingress_restarts_total", "counter",
        "Times the ingress failed and a fresh consumer rejoined the group: events not yet "
        "answered were read again.",
        ingress_restarts_.load());
  gauge("tailor_state_follower_restarts_total", "counter",
        "Times the reader of the state topic failed and a fresh one read it again.",
        state_follower_restarts_.load());
  gauge("tailor_jobs_taken_over_total", "counter",
        "Jobs of an instance not heard from for instance.takeover_after_ms that this instance "
        "took over and ran.",
        jobs_taken_over_.load());
  gauge("tailor_group_instances_live", "gauge",
        "Other instances of the group heard from on the state topic within "
        "instance.takeover_after_ms.",
        group_live_.load());
  gauge("tailor_group_open_jobs", "gauge",
        "Onboarding jobs of the whole group not ended yet, as the state topic shows them.",
        group_open_jobs_.load());
  gauge("tailor_group_orphaned_jobs", "gauge",
        "Open jobs whose instance has been silent for instance.takeover_after_ms: taken over "
        "within a second, unless they cannot be (the log says why).",
        group_orphaned_jobs_.load());
  gauge("tailor_jobs_handed_over_total", "counter",
        "Jobs of this instance that another took over while this one was gone: moved, not run "
        "here again.",
        jobs_handed_over_.load());
  gauge("tailor_serving_steps_total", "counter", "Batch steps run (all devices).",
        serving_steps_.load());
  gauge("tailor_serving_rows_total", "counter",
        "Sequences decoded, summed over steps (÷ steps = mean batch size).", serving_rows_.load());
  gauge("tailor_serving_batch_max", "gauge", "Largest batch a step has run.",
        serving_max_rows_.load());
  out << "# HELP tailor_prompt_tokens_total Prompt tokens of admitted requests: taken from the "
         "prefix cache (reused) or prefilled (computed).\n# TYPE tailor_prompt_tokens_total "
         "counter\n"
      << "tailor_prompt_tokens_total{source=\"reused\"} " << prompt_reused_.load() << '\n'
      << "tailor_prompt_tokens_total{source=\"computed\"} " << prompt_computed_.load() << '\n';
  gauge("tailor_training_queue", "gauge", "Jobs waiting for a training slot.",
        training_queue_.load());
  gauge("tailor_training_assigned", "gauge", "Jobs running or next in line on a training slot.",
        training_assigned_.load());
  gauge("tailor_training_seconds_total", "counter",
        "Time training slots spent executing training (all slots).", training_seconds_.load());
  gauge("tailor_models_as_base_total", "counter",
        "Models made ready as the base: no training step beat the base on the user's held-out "
        "texts (model.ready's best_step 0), so the untrained adapter was kept.",
        models_as_base_.load());
  gauge("tailor_training_first_admission_seconds", "gauge",
        "Unix time of the first admission to a training slot (0: none yet).",
        first_admission_.load());
  gauge("tailor_training_queue_drained_seconds", "gauge",
        "Unix time the admission queue last became empty (0: never).", queue_drained_.load());
  out << "# HELP tailor_dlq_total Unreadable events sent to the DLQ.\n# TYPE tailor_dlq_total "
         "counter\n"
      << "tailor_dlq_total " << dlq_.load() << '\n';
  out << "# HELP tailor_user_actors Live user actors.\n# TYPE tailor_user_actors gauge\n"
      << "tailor_user_actors " << users_.load() << '\n';
  return out.str();
}

}  // namespace tailor::actors
