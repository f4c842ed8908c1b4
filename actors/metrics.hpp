#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <ostream>
#include <set>
#include <string>
#include <vector>

namespace tailor::actors {

// This process's resident memory (/proc/self/statm); 0 when unreadable.
uint64_t resident_memory_bytes();

// Counts by key for at most `limit` keys: a new key past that moves the
// key with the fewest counts into one sum (`other`), so that a million users
// are not a million series on /metrics while the busiest keep theirs. The
// sum over all keys and `other` only grows, as a counter family's should.
class bounded_counts {
 public:
  explicit bounded_counts(std::size_t limit) : limit_(std::max<std::size_t>(1, limit)) {}
  void add(const std::string& key, int64_t d);
  // Moves `key`'s count to other(): its series goes, the total stays.
  void fold(const std::string& key);
  const std::map<std::string, int64_t>& counts() const { return counts_; }
  int64_t other() const { return other_; }

 private:
  std::size_t limit_;
  std::map<std::string, int64_t> counts_;
  std::set<std::pair<int64_t, std::string>> by_count_;  // the same, fewest first
  int64_t other_ = 0;
};

// A Prometheus histogram: counts of samples up to each bound (cumulative),
// their sum and their count.
class histogram {
 public:
  explicit histogram(std::vector<double> bounds)
      : bounds_(std::move(bounds)), counts_(bounds_.size(), 0) {}
  void observe(double v);
  // Its _bucket, _sum and _count lines under `name`; `labels` (`k="v"`, or
  // empty) come first in each.
  void render(std::ostream& out, const std::string& name, const std::string& labels) const;
  int64_t count() const { return count_; }
  // The q-quantile, interpolated within its bucket as Prometheus'
  // histogram_quantile does (the last bound for samples past it); 0 with
  // no samples.
  double quantile(double q) const;

 private:
  std::vector<double> bounds_;
  std::vector<int64_t> counts_;
  double sum_ = 0;
  int64_t count_ = 0;
};

// Process-wide counters and gauges, rendered in Prometheus text format by
// the admin API. Written from actors, read from the HTTP thread.
class metrics {
 public:
  // At most `max_user_series` series each of the per-user and per-model
  // request counts; the rest sum under the label value "(other)".
  explicit metrics(std::size_t max_user_series = 1000);

  void count_in(const std::string& topic) { add(events_in_, topic, 1); }
  void count_out(const std::string& topic) { add(events_out_, topic, 1); }
  void count_error(const std::string& code) { add(errors_, code, 1); }
  void count_dlq() { dlq_.fetch_add(1); }
  void set_lag(const std::string& topic, int64_t lag) { set(lag_, topic, lag); }
  void add_users(int64_t delta) { users_.fetch_add(delta); }
  void set_ready(const std::string& topic) { set(joined_, topic, 1); }
  // How many brokers a watched Kafka client (watch_brokers) is connected to.
  void set_kafka_brokers_up(const std::string& client, int64_t n) {
    set(kafka_brokers_up_, client, n);
  }
  void set_in_flight(const std::string& topic, int64_t n) { set(in_flight_, topic, n); }
  void set_paused(const std::string& topic, bool paused) { set(paused_, topic, paused ? 1 : 0); }

  // Training pool (issue 4).
  void set_training_queue(int64_t waiting) { training_queue_.store(waiting); }
  int64_t training_queue() const { return training_queue_.load(); }
  void set_training_assigned(int64_t n) { training_assigned_.store(n); }
  int64_t training_assigned() const { return training_assigned_.load(); }
  void add_training_seconds(double s) { add_double(training_seconds_, s); }
  void count_job(const std::string& final_status) { add(jobs_, final_status, 1); }
  // A model made ready whose adapter is the untrained one (no step beat the base).
  void count_model_as_base() { models_as_base_.fetch_add(1); }
  void set_first_admission(double unix_s) { first_admission_.store(unix_s); }
  void set_queue_drained(double unix_s) { queue_drained_.store(unix_s); }
  void count_pause(const std::string& topic) { add(pauses_, topic, 1); }

  // Serving (issue 5). `event` of the adapter cache: hit, miss, load, eviction.
  void count_cache(const std::string& tier, const std::string& event) {
    add(cache_[event], tier, 1);
  }
  void count_request(const std::string& model_id, const std::string& user_id) {
    std::lock_guard<std::mutex> g(mtx_);
    model_requests_.add(model_id, 1);
    user_requests_.add(user_id, 1);
  }
  // A deleted user's series (their id, their models') go; their counts
  // stay in the totals, under `other`.
  void forget_user(const std::string& user_id, const std::vector<std::string>& model_ids) {
    std::lock_guard<std::mutex> g(mtx_);
    user_requests_.fold(user_id);
    for (const auto& m : model_ids) model_requests_.fold(m);
  }
  void count_step(int64_t rows) {
    serving_steps_.fetch_add(1);
    serving_rows_.fetch_add(rows);
    int64_t cur = serving_max_rows_.load();
    while (rows > cur && !serving_max_rows_.compare_exchange_weak(cur, rows)) {
    }
  }
  // A batch step that threw (its requests got error results).
  void count_step_failure(const std::string& device) { add(step_failures_, device, 1); }
  // A device's GPU actor failed and a fresh one takes its place: the fresh
  // one's loop counters (busy seconds, thread times, step helper) start
  // from zero and are published on top of what the failed one left, so
  // that they never go back.
  void count_device_restart(const std::string& device) {
    std::lock_guard<std::mutex> g(mtx_);
    ++device_restarts_[device];
    auto& b = device_base_[device];
    b.busy = serving_busy_[device];
    b.running = batch_thread_[device].first;
    b.runnable = batch_thread_[device].second;
    b.helper = {helper_chunks_[device], helper_late_[device],   helper_lent_[device],
                helper_eligible_[device], helper_steps_[device], 0};
  }
  // A Kafka producer (by client id) had a fatal error and was replaced.
  void count_producer_replacement(const std::string& producer) {
    add(producer_replacements_, producer, 1);
  }
  // A record read from tailor.state: imported (a model another instance
  // made ready), known (here already), followed (a job's or an instance's
  // state) or rejected (unreadable).
  void count_state_record(const std::string& outcome) { add(state_records_, outcome, 1); }
  // The state follower failed and a fresh one reads tailor.state again.
  void count_state_follower_restart() { state_follower_restarts_.fetch_add(1); }
  // A job of an instance that is gone, run here now.
  void count_job_taken_over() { jobs_taken_over_.fetch_add(1); }
  // A job of this instance that another took over while this one was gone.
  void count_job_handed_over() { jobs_handed_over_.fetch_add(1); }
  // A job.cancel of a job that runs on another instance: `sent` there
  // through the state topic by this one, or `received` here from another.
  void count_cancel_passed_on(const std::string& way) { add(cancels_passed_on_, way, 1); }
  // A user deleted (user.delete): `here`, or by `another` instance, whose
  // erasure this one applied (read from the state topic).
  void count_user_deleted(const std::string& by) { add(users_deleted_, by, 1); }
  // Exactly-once output: "committed" or "aborted".
  void count_transaction(const char* outcome) { add(transactions_, outcome, 1); }
  // The group as the state topic shows it: other instances heard from
  // within instance.takeover_after_ms, its open jobs, and those of them
  // whose instance is silent.
  void set_group(int64_t live, int64_t open_jobs, int64_t orphaned_jobs) {
    group_live_.store(live);
    group_open_jobs_.store(open_jobs);
    group_orphaned_jobs_.store(orphaned_jobs);
  }
  // A job's actor failed (its job starts again, or fails at the third).
  void count_job_actor_failure() { job_actor_failures_.fetch_add(1); }
  // The ingress failed and a fresh one rejoins the group.
  void count_ingress_restart() { ingress_restarts_.fetch_add(1); }
  // Idle trims of malloc's heap, and what resident memory they gave back.
  void count_memory_trim(uint64_t released_bytes) {
    memory_trims_.fetch_add(1);
    memory_trimmed_bytes_.fetch_add(static_cast<int64_t>(released_bytes));
  }
  // Grows with every event read and every batch step: unchanged, nothing
  // was done in between (training is told by training_queue/assigned).
  int64_t work_done() const;
  // Prompt tokens a prefill took from the prefix cache, and computed.
  void count_prompt_tokens(int64_t reused, int64_t computed) {
    prompt_reused_.fetch_add(reused);
    prompt_computed_.fetch_add(computed);
  }
  // A GPU actor's gauges: requests waiting for a row, rows in the batch,
  // bytes its prefix cache holds, users whose service it keeps count of,
  // places of its bank in use and adapters asked for that have none yet.
  void set_serving(const std::string& device, int64_t waiting, int64_t active,
                   int64_t prefix_bytes, int64_t users, int64_t places_used,
                   int64_t unplaced) {
    std::lock_guard<std::mutex> g(mtx_);
    serving_waiting_[device] = waiting;
    serving_active_[device] = active;
    prefix_bytes_[device] = prefix_bytes;
    serving_users_[device] = users;
    bank_used_[device] = places_used;
    bank_unplaced_[device] = unplaced;
  }

  // A batch loop's thread since it started, in seconds: on a core, and ready
  // but waiting for one (taken by other threads of this machine).
  void set_batch_thread(const std::string& device, double running_s, double runnable_s) {
    std::lock_guard<std::mutex> g(mtx_);
    const auto& b = device_base_[device];
    batch_thread_[device] = {b.running + running_s, b.runnable + runnable_s};
  }
  // A device's batch loop: wall time it has spent in steps since it
  // started, in seconds (the rest it had no row to step).
  void set_serving_busy(const std::string& device, double busy_s) {
    std::lock_guard<std::mutex> g(mtx_);
    serving_busy_[device] = device_base_[device].busy + busy_s;
  }
  void set_batch_realtime(const std::string& device, bool realtime) {
    set(batch_realtime_, device, realtime ? 1 : 0);
  }
  // How a device computes its matrix products ("amx", "bfloat16",
  // "float32": serving.products as this CPU runs it).
  void set_serving_products(const std::string& device, const std::string& products) {
    std::lock_guard<std::mutex> g(mtx_);
    serving_products_[device] = products;
  }
  // What a device's step helper did (serving.step_helper): chunks of steps it
  // ran, the times the loop waited long for one and lent the helper its core
  // meanwhile, the steps it could have taken part in and those it did, and
  // its last trial's cost per token with it over without (0: none yet).
  struct helper_figures {
    int64_t chunks = 0, late = 0, lent = 0, eligible_steps = 0, helped_steps = 0;
    double ratio = 0;
  };
  void set_helper(const std::string& device, const helper_figures& f) {
    std::lock_guard<std::mutex> g(mtx_);
    const auto& b = device_base_[device].helper;
    helper_chunks_[device] = b.chunks + f.chunks;
    helper_late_[device] = b.late + f.late;
    helper_lent_[device] = b.lent + f.lent;
    helper_eligible_[device] = b.eligible_steps + f.eligible_steps;
    helper_steps_[device] = b.helped_steps + f.helped_steps;
    helper_ratio_[device] = f.ratio;  // a gauge: the fresh actor's own trials
  }

  // An inference request's time in the engine, from reading its event to
  // its result's delivery report (`engine_ms`), by whether it waited for its
  // adapter to be loaded (a cold adapter) or found it resident; and the
  // part of it outside batch steps and adapter loads (`overhead_ms`:
  // parsing, routing, bookkeeping, serialization, producing until the
  // delivery report), of which the last `overhead_window` samples are kept.
  void observe_inference(double engine_ms, double overhead_ms, bool adapter_loaded);
  // An onboarding job ended with `status` this long after its request came.
  void observe_job(const std::string& status, double seconds);

  // The figures an operator looks at first, as JSON (/v1/status): the
  // input topics' lag and backpressure, training, inference latency by
  // adapter, errors by code, the group.
  nlohmann::json summary() const;

  // Why the engine cannot take work now, empty when it can: every one of
  // `expected` input topics has joined its group, and every watched Kafka
  // client reaches a broker.
  std::string not_ready(std::size_t expected) const;
  bool ready(std::size_t expected) const { return not_ready(expected).empty(); }
  std::string render() const;

 private:
  void add(std::map<std::string, int64_t>& m, const std::string& k, int64_t d) {
    std::lock_guard<std::mutex> g(mtx_);
    m[k] += d;
  }
  void set(std::map<std::string, int64_t>& m, const std::string& k, int64_t v) {
    std::lock_guard<std::mutex> g(mtx_);
    m[k] = v;
  }

  static void add_double(std::atomic<double>& a, double d) {
    double cur = a.load();
    while (!a.compare_exchange_weak(cur, cur + d)) {
    }
  }

  mutable std::mutex mtx_;
  std::map<std::string, int64_t> events_in_, events_out_, errors_, lag_, joined_, in_flight_,
      paused_, jobs_, pauses_, serving_waiting_, serving_active_, prefix_bytes_, serving_users_,
      bank_used_, bank_unplaced_, batch_realtime_, helper_chunks_, helper_late_, helper_lent_,
      helper_eligible_, helper_steps_, step_failures_, device_restarts_, producer_replacements_,
      state_records_, cancels_passed_on_, users_deleted_,
      transactions_, kafka_brokers_up_;
  bounded_counts model_requests_, user_requests_;
  std::map<std::string, std::map<std::string, int64_t>> cache_;  // event -> tier -> count
  std::map<std::string, std::pair<double, double>> batch_thread_;  // device -> running, runnable
  std::map<std::string, double> serving_busy_;                      // device -> seconds
  std::map<std::string, std::string> serving_products_;             // device -> kernel
  struct device_base {
    double busy = 0, running = 0, runnable = 0;
    helper_figures helper;
  };
  std::map<std::string, device_base> device_base_;  // device -> what failed actors left
  std::map<std::string, double> helper_ratio_;                      // device -> last trial's
  static constexpr std::size_t overhead_window = 8192;
  std::vector<double> overhead_;  // ring buffer of the last samples
  std::size_t overhead_next_ = 0;
  int64_t overhead_count_ = 0;
  double overhead_sum_ = 0;
  histogram overhead_hist_;                         // the same samples, all of them
  std::map<std::string, histogram> latency_;        // adapter (resident, loaded) -> ms
  std::map<std::string, histogram> job_duration_;  // final status -> seconds
  std::atomic<int64_t> serving_steps_{0}, serving_rows_{0}, serving_max_rows_{0};
  std::atomic<int64_t> prompt_reused_{0}, prompt_computed_{0};
  std::atomic<int64_t> training_queue_{0}, training_assigned_{0};
  std::atomic<double> training_seconds_{0}, first_admission_{0}, queue_drained_{0};
  std::atomic<int64_t> dlq_{0};
  std::atomic<int64_t> users_{0};
  std::atomic<int64_t> ingress_restarts_{0};
  std::atomic<int64_t> memory_trims_{0}, memory_trimmed_bytes_{0};
  std::atomic<int64_t> state_follower_restarts_{0};
  std::atomic<int64_t> jobs_taken_over_{0};
  std::atomic<int64_t> jobs_handed_over_{0};
  std::atomic<int64_t> models_as_base_{0};
  std::atomic<int64_t> group_live_{0}, group_open_jobs_{0}, group_orphaned_jobs_{0};
  std::atomic<int64_t> job_actor_failures_{0};
};

}  // namespace tailor::actors
