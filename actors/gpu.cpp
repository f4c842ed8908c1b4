#include "actors/gpu.hpp"

#include <pthread.h>
#include <sched.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <list>
#include <optional>
#include <set>
#include <stdexcept>
#include <unordered_map>

#include "actors/base_models.hpp"
#include "actors/error_text.hpp"
#include "actors/fair_shares.hpp"
#include "actors/fault.hpp"
#include "model/checkpoint.hpp"
#include "model/generate.hpp"
#include "model/huge_pages.hpp"
#include "storage/artifacts.hpp"

namespace tailor::actors {

namespace {

using clock = std::chrono::steady_clock;

double ms_between(clock::time_point a, clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// The calling thread's time on a core and ready but waiting for one, in ns,
// from the kernel's scheduler statistics; false where they are unavailable.
bool thread_sched_times(int64_t& running_ns, int64_t& runnable_ns) {
  std::ifstream in("/proc/thread-self/schedstat");
  return static_cast<bool>(in >> running_ns >> runnable_ns);
}

}  // namespace

// --- host tier ---------------------------------------------------------------

host_tier::host_tier(std::size_t capacity, std::shared_ptr<metrics> stats)
    : capacity_(capacity), stats_(std::move(stats)) {}

host_tier::adapter_ptr host_tier::find(const std::string& model_id) {
  std::lock_guard lock(mutex_);
  auto it = cache_.find(model_id);
  if (it == cache_.end()) return nullptr;
  order_.splice(order_.begin(), order_, it->second.second);
  return it->second.first;
}

void host_tier::insert(const std::string& model_id, adapter_ptr adapter) {
  if (capacity_ == 0) return;
  std::lock_guard lock(mutex_);
  if (auto it = cache_.find(model_id); it != cache_.end()) {
    order_.splice(order_.begin(), order_, it->second.second);
    it->second.first = std::move(adapter);
    return;
  }
  order_.push_front(model_id);
  cache_[model_id] = {std::move(adapter), order_.begin()};
  stats_->count_cache("host", "load");
  while (cache_.size() > capacity_) {
    cache_.erase(order_.back());
    order_.pop_back();
    stats_->count_cache("host", "eviction");
  }
}

bool host_tier::erase(const std::string& model_id) {
  std::lock_guard lock(mutex_);
  auto it = cache_.find(model_id);
  if (it == cache_.end()) return false;
  order_.erase(it->second.second);
  cache_.erase(it);
  return true;
}

namespace {

// The adapter of `m` from the host tier, else read, checked and decoded
// from disk into it.
caf::expected<host_tier::adapter_ptr> read_adapter(loader_state& st, const model_record& m) {
  // Another GPU actor's request, or a prefetch, may have brought it in.
  if (auto ad = st.host->find(m.model_id)) return ad;
  auto base = st.bases->by_name.find(m.base_model);
  if (base == st.bases->by_name.end())
    return caf::make_error(errc::adapter_unavailable, "model " + m.model_id + ": base model " +
                                                          m.base_model + " is not loaded here");
  st.fault_load.throw_if_fires();
  // The bytes must be the registered ones before anything decodes them.
  auto bytes = storage::read_file(m.artifact_path, m.checksum);
  if (!bytes)
    return caf::make_error(errc::adapter_unavailable,
                           "model " + m.model_id + ": " + error_text(bytes.error()));
  auto ad = model::decode_adapter(std::move(*bytes), base->second.cfg, m.artifact_path);
  if (!ad)
    return caf::make_error(errc::adapter_unavailable,
                           "model " + m.model_id + ": " + error_text(ad.error()));
  // Packed here, off the batch loop: placing it then is a copy.
  auto ptr = std::make_shared<const model::packed_adapter>(model::packed_adapter::of(*ad));
  st.stats->count_cache("disk", "load");
  st.host->insert(m.model_id, ptr);
  return ptr;
}

// Packing calls LibTorch, which reports failures (out of memory) by
// exception: this is their edge. The load fails, not the loader, which
// every GPU actor's cold adapters go through.
caf::expected<host_tier::adapter_ptr> load_adapter(loader_state& st, const model_record& m) {
  try {
    return read_adapter(st, m);
  } catch (const std::exception& e) {
    spdlog::error("adapter loader: model {}: {}", m.model_id, e.what());
    return caf::make_error(errc::adapter_unavailable,
                           "model " + m.model_id + ": loading its adapter failed: " + e.what());
  }
}

}  // namespace

loader_actor::behavior_type adapter_loader(loader_actor::stateful_pointer<loader_state> self,
                                           engine_config cfg,
                                           std::shared_ptr<const base_models> bases,
                                           std::shared_ptr<host_tier> host,
                                           std::shared_ptr<metrics> stats) {
  self->set_exception_handler(exit_reason_of_exception);
  auto& st = self->state;
  st.cfg = std::move(cfg);
  st.bases = std::move(bases);
  st.host = std::move(host);
  st.stats = std::move(stats);
  st.fault_load = fault_point("TAILOR_FAULT_LOAD", "adapter loader", "load from disk", false);
  return {
      [self](load_atom, const model_record& m) -> caf::result<loaded_adapter> {
        auto ad = load_adapter(self->state, m);
        if (!ad) return std::move(ad.error());
        return loaded_adapter{*ad};
      },
      [self](prefetch_atom, const model_record& m) {
        if (auto ad = load_adapter(self->state, m); !ad)
          spdlog::debug("prefetch of {}: {}", m.model_id, error_text(ad.error()));
      },
  };
}

// --- device tier and batch loop ------------------------------------------------

struct gpu_core {
  struct resident {
    int64_t index = 0;  // place in the bank; 0 while not placed
    int64_t users = 0;  // requests waiting for or running with it
    uint64_t last_used = 0;
    bool loading = false;
    bool pinned = false;
    uint64_t idle_key = 0;  // its key in `idle` (last_used then), 0 while not in it
  };
  struct request {
    inference_order order;
    caf::typed_response_promise<inference_result> rp;
    model::sampling sampling;
    clock::time_point arrived, loaded, admitted, deadline;
    double adapter_load_ms = 0, prefill_ms = 0;
    bool prefilling = false;  // admitted; its prompt is computed by the next steps
    int64_t gen_id = -1;  // in the batch when >= 0
    int64_t budget = 0;   // tokens it may occupy: prompt + max_tokens, within the context
    int64_t prompt_tokens = 0;
    fair_shares::share* share = nullptr;  // its user's, until it is answered
    // Its adapter's entry in `adapters`, which stays while a request uses
    // it: the loop's scans of the waiting requests read it without hashing
    // model ids (docs/measurements.md, 2026-12-03, late night).
    resident* adapter = nullptr;
  };

  const model::base_weights* base = nullptr;
  model::adapter_bank bank;
  std::unique_ptr<model::batch_generator> gen;
  // By model id; references stay valid as entries come and go.
  std::unordered_map<std::string, resident> adapters;
  std::vector<std::string> owner;  // bank index -> model id ("" free)
  // Where a miss finds its place: a free one, else the least recently used
  // placed adapter that no request uses and is not pinned, the first of
  // `idle` (last use, place). Scanning the bank instead cost the loop 2-3 us
  // a request at 1,000 adapters and 256 places, and grew with the bank;
  // these cost O(log places).
  std::vector<int64_t> free_places;
  std::set<std::pair<uint64_t, int64_t>> idle;
  std::list<std::shared_ptr<request>> waiting;
  std::unordered_map<int64_t, std::shared_ptr<request>> active;  // by generator id
  fair_shares shares;
  int64_t tokens_in_flight = 0;
  uint64_t tick = 0;
  bool stepping = false;
  clock::time_point sched_read;  // when the thread's scheduler times were last published
  clock::duration busy{};        // in steps since the start (tailor_serving_busy_seconds_total)
  bool thread_set = false;       // serving.batch_thread applied to this thread
  bool realtime = false;         // the loop's thread runs SCHED_FIFO
  // TAILOR_FAULT_STEP (actors/fault.hpp): this device's Nth step with rows
  // throws. TAILOR_FAULT_PLACE, counted over the process, is in place().
  fault_point fault_step;
  // What the helpers of generators replaced after a failed step counted, so
  // that the helper's counters never go back.
  metrics::helper_figures helper_before;
  // The helper's trials (serving.step_helper auto) seen so far by this
  // generator's loop, and the last choice logged.
  int64_t helper_trials = 0;
  std::optional<bool> helper_logged;
};

gpu_state::gpu_state() = default;

// An actor that ends (shutdown, or an exception outside a batch step)
// answers the requests it holds with an error, so that their user actors
// let go of them and the ingress sends them again: CAF 0.17 sends nothing
// for a promise dropped with its actor. Runs in CAF's on_exit, while the
// actor can still send.
gpu_state::~gpu_state() {
  if (!core) return;
  const auto err = caf::make_error(errc::unavailable, "the serving device " + label + " stopped");
  for (auto& r : core->waiting) r->rp.deliver(err);
  for (auto& [id, r] : core->active) r->rp.deliver(err);
}

namespace {

using gpu_ptr = gpu_actor::stateful_pointer<gpu_state>;
using request_ptr = std::shared_ptr<gpu_core::request>;

void kick(gpu_ptr self) {
  auto& c = *self->state.core;
  if (c.stepping) return;
  c.stepping = true;
  self->send(self, step_atom_v);
}

// The helper's counters since the device started, across generators.
metrics::helper_figures helper_figures_of(const gpu_core& c) {
  const auto& g = *c.gen;
  const auto& b = c.helper_before;
  const auto* p = g.helper_choice();
  return {b.chunks + g.helper_chunks(),
          b.late + g.helper_late_waits(),
          b.lent + g.helper_cores_lent(),
          b.eligible_steps + g.helper_eligible_steps(),
          b.helped_steps + g.helper_steps(),
          p && p->trials() > 0 ? p->ratio() : b.ratio};
}

// Says when a trial of the step helper changed its choice (each trial at
// debug level).
void log_helper_choice(gpu_state& st) {
  auto& c = *st.core;
  const auto* p = c.gen->helper_choice();
  if (!p || p->trials() == c.helper_trials) return;
  c.helper_trials = p->trials();
  spdlog::debug("gpu {}: step helper trial {}: cost per token with it {:.2f} of without",
                st.label, p->trials(), p->ratio());
  if (c.helper_logged == p->chosen()) return;
  c.helper_logged = p->chosen();
  spdlog::info("gpu {}: step helper {} (a big step's cost per token with it: {:.2f} of without)",
               st.label, p->chosen() ? "on" : "off", p->ratio());
}

void publish_gauges(gpu_ptr self) {
  auto& st = self->state;
  log_helper_choice(st);
  // Every place not free holds an entry (placed or loading); the other
  // entries are adapters that wait for a place.
  const auto& c = *st.core;
  const auto used = static_cast<int64_t>(c.owner.size() - 1 - c.free_places.size());
  st.stats->set_serving(st.label, static_cast<int64_t>(c.waiting.size()),
                        static_cast<int64_t>(c.active.size()), c.gen->prefix_cache_bytes(),
                        static_cast<int64_t>(c.shares.users()), used,
                        static_cast<int64_t>(c.adapters.size()) - used);
  st.stats->set_helper(st.label, helper_figures_of(*st.core));
}

// On a machine whose cores the loop shares with Kafka's and the actors'
// threads, each of them woken preempts it; with 1000 users the loop waited
// a fifth of its time for its core (docs/measurements.md). Realtime gives the
// loop its core whenever it has a step to run; it sleeps, and yields the
// core, when it has none. Applied on the first step: that is this thread.
void apply_batch_thread(gpu_ptr self) {
  auto& st = self->state;
  st.core->thread_set = true;
  // So that top -H, perf and ps -L show which thread is the loop.
  const auto name = ("tailor.batch." + std::to_string(st.device)).substr(0, 15);
  pthread_setname_np(pthread_self(), name.c_str());
  bool realtime = false;
  if (st.cfg.serving.batch_thread == "realtime") {
    sched_param param{};
    param.sched_priority = 1;
    // Reset on fork: nothing this thread might start inherits the policy.
    int rc = pthread_setschedparam(pthread_self(), SCHED_FIFO | SCHED_RESET_ON_FORK, &param);
    realtime = rc == 0;
    if (realtime)
      spdlog::info("batch loop {}: realtime (SCHED_FIFO)", st.label);
    else
      spdlog::warn("batch loop {}: cannot run realtime ({}); it runs as an ordinary thread",
                   st.label, std::strerror(rc));
  }
  st.core->realtime = realtime;
  st.stats->set_batch_realtime(st.label, realtime);
}

// This actor runs on a thread of its own (detached), so the thread's times
// are the batch loop's: how much of a core it got, and how long other
// threads kept it from one. A few times a second: reading costs a syscall.
void publish_thread_times(gpu_ptr self, clock::time_point now) {
  auto& c = *self->state.core;
  if (now - c.sched_read < std::chrono::milliseconds(200)) return;
  c.sched_read = now;
  int64_t running = 0, runnable = 0;
  if (thread_sched_times(running, runnable))
    self->state.stats->set_batch_thread(self->state.label, running * 1e-9, runnable * 1e-9);
}

// Puts an adapter's entry in `idle` or takes it out, as its users, place
// and pin say: after any of them changes, and (`leaving`) before the entry
// is erased.
void sync_idle(gpu_core& c, gpu_core::resident& r, bool leaving = false) {
  const bool idle = !leaving && r.index > 0 && r.users == 0 && !r.pinned;
  if (r.idle_key != 0 && (!idle || r.idle_key != r.last_used)) {
    c.idle.erase({r.idle_key, r.index});
    r.idle_key = 0;
  }
  if (idle && r.idle_key == 0) {
    c.idle.emplace(r.last_used, r.index);
    r.idle_key = r.last_used;
  }
}

// The adapter's weights, by name and checksum: what is cached for them
// (prompts' keys and values) stays valid when they leave the bank and
// come back.
uint64_t adapter_key(const model_record& m) {
  return fnv1a64(m.checksum, fnv1a64(m.model_id));
}

// Erases an adapter that never got its place (or lost it): its entry, and
// the place it held or had reserved (`index`) is free again.
void forget_adapter(gpu_core& c, const std::string& model_id, int64_t index) {
  if (auto it = c.adapters.find(model_id); it != c.adapters.end()) {
    sync_idle(c, it->second, true);
    c.adapters.erase(it);
  }
  c.owner[static_cast<std::size_t>(index)].clear();
  c.free_places.push_back(index);
}

// A request that leaves (answered) no longer holds its adapter's place. An
// adapter that never got a place and that no request wants any more leaves
// the map: each user whose request expired or was cancelled while the bank
// was full stayed in it for good.
void release_adapter(gpu_core& c, gpu_core::request& r) {
  auto& a = *r.adapter;
  r.adapter = nullptr;
  if (a.users > 0) --a.users;
  if (a.users == 0 && a.index == 0 && !a.loading) {
    c.adapters.erase(r.order.model.model_id);
    return;
  }
  sync_idle(c, a);
}

// serving.products as the model names it: by the model's own names, and
// "amx" for "auto" (the model runs the best of it the CPU has).
model::product_kind wanted_products(const std::string& products) {
  for (auto k : {model::product_kind::float32, model::product_kind::bfloat16})
    if (products == model::product_name(k)) return k;
  return model::product_kind::amx;
}

// The device's batch: rows, key/value and prefix caches, step helper. Made
// at start, and again when a step failed.
std::unique_ptr<model::batch_generator> make_generator(gpu_state& st) {
  auto& c = *st.core;
  const auto& sc = st.cfg.serving;
  auto gen = std::make_unique<model::batch_generator>(
      *c.base, c.bank, sc.max_batch, sc.prefix_cache_entries,
      static_cast<int64_t>(sc.prefix_cache_mb) << 20,
      model::serving_precision{sc.kv_cache == "float16" ? torch::kHalf : torch::kFloat32,
                               wanted_products(sc.products)});
  gen->set_prefill_chunk(sc.prefill_chunk);
  // Steps of fewer tokens gained nothing from it (tailor-micro,
  // bm_decode_step_bf16_helped): they end before it has woken.
  constexpr int64_t helper_min_tokens = 16;
  std::string helper_err;
  std::optional<model::helper_policy::options> adaptive;
  if (sc.step_helper == "auto") adaptive.emplace();
  if (sc.step_helper != "off" && !gen->start_helper("tailor.help." + std::to_string(st.device),
                                                    helper_min_tokens, helper_err, adaptive))
    spdlog::warn("gpu {}: no step helper ({}): steps run on the batch loop's thread alone",
                 st.label, helper_err);
  return gen;
}

// Answers a request; `error` set makes it an error result.
void answer(gpu_ptr self, const request_ptr& r, const model::generation& g,
            std::optional<error_info> error = std::nullopt) {
  auto& st = self->state;
  const auto now = clock::now();
  inference_result res;
  res.request_id = r->order.request.request_id;
  res.user_id = r->order.request.user_id;
  res.model_id = r->order.model.model_id;
  if (error) {
    res.error = std::move(error);
  } else {
    res.text = g.text;
    res.finish_reason = g.finish_reason;
    res.usage.prompt_tokens = r->prompt_tokens;
    res.usage.completion_tokens = static_cast<int64_t>(g.tokens.size());
  }
  res.timings.adapter_load = r->adapter_load_ms;
  if (r->gen_id >= 0)
    res.timings.queue =
        std::max(0.0, ms_between(r->order.dispatched, r->admitted) - r->adapter_load_ms);
  else
    res.timings.queue = std::max(0.0, ms_between(r->order.dispatched, now) - r->adapter_load_ms);
  res.timings.prefill = r->prefill_ms;
  // In the batch after its prefill until it ended: the loop's steps, which
  // include the prefills of rows joining meanwhile.
  if (r->gen_id >= 0)
    res.timings.decode = std::max(0.0, ms_between(r->admitted, now) - r->prefill_ms);
  res.timings.total = ms_between(r->order.received, now);
  // Waiting in the GPU actor's mailbox while a step runs is waiting for the
  // batch loop, as waiting for a row is: queue. Route is the user actor's part.
  res.timings.route = ms_between(r->order.received, r->order.dispatched);
  // The per-model and per-user request counts are the user actor's to keep
  // (user.cpp, serve): at 1,000 users their trees cost the loop ~5 us a request.
  st.core->shares.release(res.user_id);
  r->share = nullptr;
  // Serialized by the user actor, on a worker: the JSON cost the loop
  // ~3 % of its time a request at 1,000 adapters (docs/measurements.md).
  r->rp.deliver(std::move(res));
}

void fail_waiting(gpu_ptr self, const std::string& model_id, const std::string& message) {
  auto& c = *self->state.core;
  for (auto it = c.waiting.begin(); it != c.waiting.end();) {
    if ((*it)->order.model.model_id != model_id) {
      ++it;
      continue;
    }
    release_adapter(c, **it);
    answer(self, *it, {}, error_info{errc::adapter_unavailable, message});
    it = c.waiting.erase(it);
  }
}

// A free place in the bank, evicting the least recently used adapter that no
// request is using; 0 when every place is in use.
int64_t free_index(gpu_ptr self) {
  auto& c = *self->state.core;
  if (!c.free_places.empty()) {
    const auto index = c.free_places.back();
    c.free_places.pop_back();
    return index;
  }
  if (c.idle.empty()) return 0;
  const auto index = c.idle.begin()->second;
  auto& victim = c.owner[static_cast<std::size_t>(index)];
  auto it = c.adapters.find(victim);
  sync_idle(c, it->second, true);
  c.adapters.erase(it);
  victim.clear();
  self->state.stats->count_cache("device", "eviction");
  return index;
}

// Copies a decoded adapter into its reserved place in the bank and marks the
// requests waiting for it as loaded; false (and those requests failed) when
// it does not fit the bank.
bool place(gpu_ptr self, const std::string& model_id, uint64_t key, int64_t index,
           const model::packed_adapter& ad) {
  auto& c = *self->state.core;
  auto it = c.adapters.find(model_id);
  if (it == c.adapters.end()) return false;
  // Outside any batch step, as running out of memory there would; counted
  // over the process's devices, so a restarted device goes on from the count.
  static fault_point fault("TAILOR_FAULT_PLACE", "gpu actors", "adapter placement", true);
  fault.throw_if_fires();
  if (!c.bank.set(index, ad, key)) {
    // Its requests go first: they point at the entry.
    fail_waiting(self, model_id,
                 "model " + model_id + ": its adapter (rank " + std::to_string(ad.cfg.rank) +
                     ") does not fit a bank of rank " + std::to_string(c.bank.rank));
    forget_adapter(c, model_id, index);
    return false;
  }
  it->second.index = index;
  it->second.loading = false;
  it->second.last_used = ++c.tick;
  for (const auto& p : self->state.cfg.serving.pinned_models)
    if (p == model_id) it->second.pinned = true;
  sync_idle(c, it->second);  // placed for requests that may all have gone
  self->state.stats->count_cache("device", "load");
  auto now = clock::now();
  for (auto& r : c.waiting)
    if (r->order.model.model_id == model_id && r->loaded == clock::time_point{}) {
      r->loaded = now;
      r->adapter_load_ms = ms_between(r->arrived, now);
    }
  return true;
}

// Places every adapter that waiting requests need and that has no place yet,
// as long as the bank has room: at once from the host tier, else through
// the loader (disk), whose answer places it later.
void fetch_adapters(gpu_ptr self) {
  auto& st = self->state;
  auto& c = *st.core;
  for (const auto& r : c.waiting) {
    const auto& m = r->order.model;
    auto& res = *r->adapter;
    if (res.index > 0 || res.loading) continue;
    auto index = free_index(self);
    if (index == 0) return;  // every place is in use: retried when one frees
    res.index = -index;      // reserved while loading
    res.loading = true;
    c.owner[static_cast<std::size_t>(index)] = m.model_id;
    auto model_id = m.model_id;
    const auto key = adapter_key(m);
    if (auto ad = st.host->find(model_id)) {
      st.stats->count_cache("host", "hit");
      // Failing its requests may erase from `waiting`: start over then.
      if (!place(self, model_id, key, index, *ad)) return fetch_adapters(self);
      continue;
    }
    st.stats->count_cache("host", "miss");
    self->request(st.loader, std::chrono::minutes(2), load_atom_v, m)
        .then(
            [self, model_id, key, index](loaded_adapter& la) {
              auto ad = std::static_pointer_cast<const model::packed_adapter>(la.adapter);
              if (place(self, model_id, key, index, *ad)) kick(self);
            },
            [self, model_id, index](caf::error& err) {
              auto& c = *self->state.core;
              spdlog::warn("gpu {}: cannot load {}: {}", self->state.device, model_id,
                           error_text(err));
              // Its requests go first: they point at the entry.
              fail_waiting(self, model_id, error_text(err));
              forget_adapter(c, model_id, index);
              fetch_adapters(self);
              kick(self);
            });
  }
}

// A request of a step that threw: an `internal` error result.
void fail_request(gpu_ptr self, const request_ptr& r, const std::string& what) {
  auto& st = self->state;
  release_adapter(*st.core, *r);
  answer(self, r, {},
         error_info{errc::internal, "batch step failed on " + st.label + ": " + what +
                                        "; send the request again with a new request_id"});
}

// LibTorch reports failures (out of memory, ...) by exception. The step's
// requests get an error result and the device goes on with a fresh batch:
// the rows' state may be half updated, and requests still waiting are not
// lost.
void step_failed(gpu_ptr self, const std::string& what) {
  auto& st = self->state;
  auto& c = *st.core;
  spdlog::critical("gpu {}: a batch step failed ({}); its {} requests get an error result, and "
                   "the device goes on with a fresh batch",
                   st.label, what, c.active.size());
  st.stats->count_step_failure(st.label);
  for (auto& [id, r] : c.active) fail_request(self, r, what);
  c.active.clear();
  c.tokens_in_flight = 0;
  c.helper_before = helper_figures_of(c);
  c.helper_trials = 0;
  c.gen.reset();  // its step helper stops before the next one starts
  c.gen = make_generator(st);
  publish_gauges(self);
}

// Moves waiting requests into the batch: only those whose adapter is placed,
// least-served user first, within the batch's row and token limits.
void admit(gpu_ptr self) {
  auto& st = self->state;
  auto& c = *st.core;
  const auto& sc = st.cfg.serving;
  // A user who was idle, or is new, starts at the least service among users
  // with requests waiting or running, so that idling does not bank credit
  // (S-LoRA's virtual token counter; fair_shares).
  double least = std::numeric_limits<double>::infinity();
  for (const auto& r : c.waiting)
    if (!r->share->fresh) least = std::min(least, r->share->served);
  for (const auto& [id, r] : c.active) least = std::min(least, r->share->served);
  if (std::isfinite(least)) c.shares.raise_floor(least);
  for (const auto& r : c.waiting) c.shares.lift(*r->share);
  // Pick first, then add everything picked: the next step computes their prompts.
  std::vector<request_ptr> chosen;
  int64_t tokens = c.tokens_in_flight;
  while (static_cast<int>(c.active.size() + chosen.size()) < sc.max_batch) {
    auto best = c.waiting.end();
    for (auto it = c.waiting.begin(); it != c.waiting.end(); ++it) {
      if ((*it)->adapter->index <= 0) continue;
      if ((!c.active.empty() || !chosen.empty()) &&
          tokens + (*it)->budget > sc.max_tokens_in_flight)
        continue;
      if (best == c.waiting.end() || (*it)->share->served < (*best)->share->served) best = it;
    }
    if (best == c.waiting.end()) break;
    auto r = *best;
    c.waiting.erase(best);
    tokens += r->budget;
    // Counted now, so that the next pick already sees this user's share.
    r->share->served += static_cast<double>(r->prompt_tokens);
    chosen.push_back(r);
  }
  if (chosen.empty()) return;
  std::vector<model::batch_generator::new_sequence> seqs;
  for (const auto& r : chosen) {
    auto& res = *r->adapter;
    res.last_used = ++c.tick;
    seqs.push_back({r->order.request.prompt, res.index, r->sampling});
  }
  const auto t0 = clock::now();
  const auto reused = c.gen->prompt_tokens_reused(), computed = c.gen->prompt_tokens_computed();
  std::vector<int64_t> ids;
  try {
    ids = c.gen->add_batch(seqs);
  } catch (const std::exception& e) {
    // Part of the failed step (step_failed): answered, not requeued, so
    // that a request that fails every time cannot fail every batch.
    for (const auto& r : chosen) fail_request(self, r, e.what());
    throw;
  }
  st.stats->count_prompt_tokens(c.gen->prompt_tokens_reused() - reused,
                                c.gen->prompt_tokens_computed() - computed);
  if (ids.size() != chosen.size()) {  // not enough rows: cannot happen below max_batch
    for (auto it = chosen.rbegin(); it != chosen.rend(); ++it) c.waiting.push_front(*it);
    return;
  }
  for (std::size_t k = 0; k < chosen.size(); ++k) {
    auto& r = chosen[k];
    r->admitted = t0;
    r->prefilling = true;
    r->gen_id = ids[k];
    c.active[ids[k]] = r;
    c.tokens_in_flight += r->budget;
  }
}

void expire(gpu_ptr self) {
  auto& c = *self->state.core;
  const auto now = clock::now();
  for (auto it = c.waiting.begin(); it != c.waiting.end();) {
    if ((*it)->deadline > now) {
      ++it;
      continue;
    }
    release_adapter(c, **it);
    answer(self, *it, model::generation{"", "deadline", {}});
    it = c.waiting.erase(it);
  }
  for (auto& [id, r] : c.active)
    if (r->deadline <= now) c.gen->finish(id, "deadline");
}

void step(gpu_ptr self) {
  auto& st = self->state;
  auto& c = *st.core;
  const auto began = clock::now();
  if (!c.thread_set) apply_batch_thread(self);
  expire(self);
  int64_t rows = 0;
  std::vector<int64_t> finished;
  try {
    admit(self);
    rows = static_cast<int64_t>(c.active.size());
    if (!c.active.empty()) c.fault_step.throw_if_fires();
    finished = c.gen->step();
  } catch (const std::exception& e) {
    step_failed(self, e.what());
    rows = 0;
  }
  // Prefill: from admission to the end of the step that computed the prompt
  // (with every other row's next token) and the first token.
  const auto stepped = clock::now();
  for (auto id : c.gen->started()) {
    auto it = c.active.find(id);
    if (it == c.active.end() || !it->second->prefilling) continue;
    it->second->prefill_ms = ms_between(it->second->admitted, stepped);
    it->second->prefilling = false;
  }
  if (rows > 0) st.stats->count_step(rows);
  // Published before the answers go, so that an answer's step is in it.
  c.busy += stepped - began;
  st.stats->set_serving_busy(st.label, std::chrono::duration<double>(c.busy).count());
  publish_thread_times(self, stepped);
  for (auto& [id, r] : c.active) r->share->served += 1.0;
  for (auto id : finished) {
    auto it = c.active.find(id);
    if (it == c.active.end()) continue;
    auto r = it->second;
    c.active.erase(it);
    c.tokens_in_flight -= r->budget;
    release_adapter(c, *r);
    answer(self, r, c.gen->take(id));
  }
  // Places freed by the requests that just finished go to those still
  // waiting for one, even when nothing else would wake the loop.
  fetch_adapters(self);
  publish_gauges(self);
  const bool admissible = std::any_of(c.waiting.begin(), c.waiting.end(),
                                      [](const request_ptr& r) { return r->adapter->index > 0; });
  c.stepping = false;
  // A thread woken onto this core (the user actor taking an answer, Kafka's)
  // would wait for the loop's time slice to end, up to a few ms on this
  // kernel, while the loop goes on stepping; yielding at the step's end
  // lets it run now. A realtime loop keeps its core (docs/measurements.md).
  if (!c.realtime) sched_yield();
  if (!c.active.empty() || admissible) kick(self);
}

}  // namespace

gpu_actor::behavior_type gpu(gpu_actor::stateful_pointer<gpu_state> self, int device,
                             std::string base_model, engine_config cfg,
                             std::shared_ptr<const base_models> bases,
                             std::shared_ptr<host_tier> host, loader_actor loader,
                             std::shared_ptr<metrics> stats) {
  self->set_exception_handler(exit_reason_of_exception);
  auto& st = self->state;
  st.device = device;
  st.base_model = std::move(base_model);
  st.label = st.base_model + "/" + std::to_string(device);
  st.cfg = std::move(cfg);
  st.loader = std::move(loader);
  st.host = std::move(host);
  st.stats = std::move(stats);
  st.bases = std::move(bases);
  st.core = std::make_unique<gpu_core>();
  auto& c = *st.core;
  const auto& sc = st.cfg.serving;
  c.base = &st.bases->by_name.at(st.base_model);
  c.bank = model::adapter_bank::make(c.base->cfg, sc.device_adapters, sc.max_rank, false);
  c.owner.assign(static_cast<std::size_t>(sc.device_adapters) + 1, "");
  // Taken from the back: place 1 first, as before.
  for (auto i = sc.device_adapters; i >= 1; --i) c.free_places.push_back(i);
  c.gen = make_generator(st);
  st.stats->set_serving_busy(st.label, 0.0);  // the series exists before the first step
  c.fault_step = fault_point("TAILOR_FAULT_STEP", "gpu " + st.label, "step with rows", false);
  const auto products = c.gen->products();
  st.stats->set_serving_products(st.label, model::product_name(products));
  if (sc.products != "auto" && sc.products != model::product_name(products))
    spdlog::warn("gpu {}: this CPU cannot run {} products (AMX needs AMX-BF16 and Linux 5.16+, "
                 "bfloat16 AVX-512 BF16): they run in {}",
                 st.label, sc.products, model::product_name(products));
  const bool half = c.gen->kv_type() == torch::kHalf;
  if (sc.kv_cache == "float16" && !half)
    spdlog::warn("gpu {}: this CPU has no AVX-512: the key/value cache is float32", st.label);
  // Where the kernel gives no transparent huge pages (mode "never"), a
  // step with many adapters is ~10% slower (docs/measurements.md).
  const bool huge = model::backed_by_huge_pages(c.bank.b.front().front());
  spdlog::info("gpu {}: batches of up to {}, {} products, {} key/value cache, adapter bank {}",
               st.label, sc.max_batch, model::product_name(products),
               half ? "float16" : "float32", huge ? "on huge pages" : "on 4 KiB pages");
  return {
      [self](infer_atom, inference_order& o) -> caf::result<inference_result> {
        auto& st = self->state;
        auto& c = *st.core;
        const auto& sc = st.cfg.serving;
        // No row could hold it: refused at once, before a promise takes over
        // the answer (the handler's result is it) and before it takes a
        // share or an adapter.
        if (auto why = model::prompt_misfit(c.base->cfg, o.request.prompt); !why.empty()) {
          inference_result res;
          res.request_id = o.request.request_id;
          res.user_id = o.request.user_id;
          res.model_id = o.model.model_id;
          res.error = error_info{errc::prompt_too_long,
                                 "prompt: " + why + " (base model " + st.base_model + ")"};
          res.timings.total = ms_between(o.received, clock::now());
          res.timings.route = ms_between(o.received, o.dispatched);
          return res;
        }
        auto r = std::make_shared<gpu_core::request>();
        r->rp = self->make_response_promise<inference_result>();
        r->arrived = clock::now();
        r->deadline = r->arrived + std::chrono::milliseconds(sc.deadline_ms);
        const auto& q = o.request;
        auto& s = r->sampling;
        s.max_tokens = q.max_tokens.value_or(sc.default_max_tokens);
        s.temperature = q.temperature.value_or(sc.default_temperature);
        s.top_k = q.top_k.value_or(0);
        s.top_p = q.top_p.value_or(1.0);
        // Without a seed, one derived from the request: a repeat samples alike.
        s.seed = q.seed.value_or(fnv1a64(q.user_id + '\0' + q.request_id));
        s.stop = q.stop;
        s.ignore_end_of_text = q.ignore_end_of_text.value_or(false);
        s.min_tokens = q.min_tokens.value_or(sc.default_min_tokens);
        r->prompt_tokens = model::prompt_tokens(q.prompt);
        // A row ends at the context, whatever max_tokens allows.
        r->budget = std::min(r->prompt_tokens + s.max_tokens, c.base->cfg.context);
        r->order = std::move(o);
        r->share = c.shares.arrive(r->order.request.user_id);
        auto& res = c.adapters[r->order.model.model_id];
        ++res.users;
        sync_idle(c, res);
        r->adapter = &res;
        st.stats->count_cache("device", res.index > 0 ? "hit" : "miss");
        c.waiting.push_back(r);
        fetch_adapters(self);
        kick(self);
        publish_gauges(self);
        return r->rp;
      },
      [self](cancel_atom, const std::string& user_id, const std::string& request_id) {
        auto& c = *self->state.core;
        auto match = [&](const request_ptr& r) {
          return r->order.request.user_id == user_id && r->order.request.request_id == request_id;
        };
        for (auto it = c.waiting.begin(); it != c.waiting.end(); ++it) {
          if (!match(*it)) continue;
          release_adapter(c, **it);
          answer(self, *it, model::generation{"", "cancelled", {}});
          c.waiting.erase(it);
          publish_gauges(self);
          return;
        }
        for (auto& [id, r] : c.active)
          if (match(r)) {
            c.gen->finish(id, "cancelled");
            kick(self);
            return;
          }
      },
      [self](forget_atom, const model_record& m) {
        auto& c = *self->state.core;
        // Its prompts may be cached while it is out of the bank.
        if (c.gen) c.gen->forget_prefixes(model::adapter_bank::identity_of_key(adapter_key(m)));
        auto it = c.adapters.find(m.model_id);
        // A request still using it (none: its user waited for theirs to
        // end) keeps it; the bank's LRU takes it afterwards.
        if (it == c.adapters.end() || it->second.users > 0 || it->second.loading) return;
        if (const auto index = it->second.index; index > 0) {
          c.bank.clear(index);
          forget_adapter(c, m.model_id, index);
        } else {
          c.adapters.erase(it);
        }
        publish_gauges(self);
      },
      [self](step_atom) { step(self); },
  };
}

void device_table::set(const std::string& base_model, int device, gpu_actor gpu) {
  std::unique_lock lock(mutex_);
  auto& gpus = by_base_[base_model];
  if (static_cast<std::size_t>(device) >= gpus.size())
    gpus.resize(static_cast<std::size_t>(device) + 1);
  gpus[static_cast<std::size_t>(device)] = std::move(gpu);
}

gpu_actor device_table::route(const std::string& base_model, const std::string& user_id) const {
  std::shared_lock lock(mutex_);
  auto it = by_base_.find(base_model);
  if (it == by_base_.end() || it->second.empty()) return {};
  return it->second[fnv1a64(user_id) % it->second.size()];
}

bool device_table::find(const caf::actor_addr& gpu, std::string& base_model, int& device) const {
  std::shared_lock lock(mutex_);
  for (const auto& [base, gpus] : by_base_)
    for (std::size_t d = 0; d < gpus.size(); ++d)
      if (gpus[d] && gpus[d].address() == gpu) {
        base_model = base;
        device = static_cast<int>(d);
        return true;
      }
  return false;
}

std::vector<gpu_actor> device_table::all() const {
  std::shared_lock lock(mutex_);
  std::vector<gpu_actor> out;
  for (const auto& [base, gpus] : by_base_) out.insert(out.end(), gpus.begin(), gpus.end());
  return out;
}

}  // namespace tailor::actors
