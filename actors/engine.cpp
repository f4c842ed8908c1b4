#include "actors/engine.hpp"

#include <malloc.h>
#include <spdlog/spdlog.h>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/scoped_actor.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "actors/admin_server.hpp"
#include "actors/error_text.hpp"
#include "actors/kafka.hpp"
#include "messages/events.hpp"
#include "messages/ids.hpp"
#include "storage/paths.hpp"

namespace tailor::actors {

namespace {

// This instance's id: configured, else kept in the data directory (made up
// at its first start), so that a restart from it is the same instance.
std::string resolve_instance_id(engine_config& cfg) {
  if (!cfg.instance.id.empty()) return {};
  const auto path = std::filesystem::path(cfg.data_dir) / "instance-id";
  std::ifstream in(path);
  if (in) {
    std::getline(in, cfg.instance.id);
    if (!messages::is_valid_id(cfg.instance.id))
      return path.string() + ": not an instance id; remove it to have a new one made";
    return {};
  }
  std::random_device rd;
  char id[32];
  std::snprintf(id, sizeof(id), "tailord-%08x%08x", rd(), rd());
  const auto tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << id << "\n";
    if (!out.flush()) return "cannot write " + tmp;
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return "cannot write " + path.string() + ": " + ec.message();
  cfg.instance.id = id;
  return {};
}

void start_ingress(supervisor_actor::stateful_pointer<supervisor_state> self) {
  auto& st = self->state;
  st.input =
      self->spawn<caf::detached>(ingress, st.cfg, st.users, st.out, st.stats, st.membership);
  self->monitor(st.input);
  st.ingress_restarts.started = std::chrono::steady_clock::now();
}

// Once the last run's jobs are back in the pool and the state topic has
// been read: before that, a user's events could meet a registry that does
// not yet list the user's models.
void start_ingress_when_ready(supervisor_actor::stateful_pointer<supervisor_state> self) {
  auto& st = self->state;
  if (st.stopping || st.input || !st.recovered || !st.caught_up) return;
  start_ingress(self);
}

void recover_jobs(supervisor_actor::stateful_pointer<supervisor_state> self);

// A state follower, fresh at the start or after one failed. Until its first
// catch-up, the supervisor waits for it (then recovers the last run's jobs
// and starts the ingress); a follower that ends first is restarted and
// asked again.
void start_state_follower(supervisor_actor::stateful_pointer<supervisor_state> self) {
  auto& st = self->state;
  // Only the first catch-up hands over this instance's jobs that another
  // took over while it was gone: later, the pool may be running them.
  st.follower = self->spawn<caf::detached>(state_follower, st.cfg, st.store, st.stats, st.pool,
                                           st.out, st.group, !st.caught_up);
  self->monitor(st.follower);
  st.follower_restarts.started = std::chrono::steady_clock::now();
  if (st.caught_up) return;
  self->request(st.follower, caf::infinite, catch_up_atom_v)
      .then(
          [self](caf::ok_atom) {
            if (self->state.caught_up) return;
            self->state.caught_up = true;
            recover_jobs(self);
          },
          [](caf::error&) {});  // it ended: the down handler restarts it
}

// The previous run's jobs back in the pool, once the state topic said which
// of them another instance took over meanwhile.
void recover_jobs(supervisor_actor::stateful_pointer<supervisor_state> self) {
  self->request(self->state.pool, std::chrono::minutes(5), recover_atom_v)
      .then(
          [self](caf::ok_atom) {
            self->state.recovered = true;
            start_ingress_when_ready(self);
          },
          [self](caf::error& err) {
            spdlog::critical("recovery of unfinished jobs failed: {}", caf::to_string(err));
            self->state.recovered = true;
            start_ingress_when_ready(self);
          });
}

// Says on the state topic that this instance is alive, every heartbeat_ms:
// the other instances take its open jobs over once it falls silent.
void heartbeat(supervisor_actor::stateful_pointer<supervisor_state> self) {
  auto& st = self->state;
  if (st.stopping) return;
  messages::instance_alive alive{st.cfg.instance.id, unix_ms()};
  std::vector<outgoing_message> msgs{
      {channel::state, messages::state_key_of_instance(alive.instance_id), to_json(alive)}};
  self->request(st.out, std::chrono::milliseconds(st.cfg.instance.heartbeat_ms), publish_atom_v,
                std::move(msgs))
      .then([](caf::ok_atom) {},
            [](caf::error& err) {
              spdlog::warn("heartbeat not delivered: {}", caf::to_string(err));
            });
  self->delayed_send(self, std::chrono::milliseconds(st.cfg.instance.heartbeat_ms), tick_atom_v);
}

// After memory_trim_idle_seconds without work, hands the heap that malloc
// holds but no longer uses back to the system, and again each minute while
// idle (idle user actors retire meanwhile). malloc keeps what a spike freed
// otherwise: M_TRIM_THRESHOLD is high so that busy serving never pays for
// trims (model/threads.cpp), and a trim only trims the heap's top.
void trim_when_idle(supervisor_actor::stateful_pointer<supervisor_state> self) {
  auto& st = self->state;
  if (st.stopping) return;
  using clock = std::chrono::steady_clock;
  const auto now = clock::now();
  auto& t = st.trim;
  const auto work = st.stats->work_done();
  if (work != t.work || st.stats->training_queue() > 0 || st.stats->training_assigned() > 0) {
    t.work = work;
    t.active = now;
    t.trimmed = {};
  } else if (now - t.active >= std::chrono::seconds(st.cfg.memory_trim_idle_seconds) &&
             (t.trimmed == clock::time_point{} || now - t.trimmed >= std::chrono::minutes(1))) {
    const auto before = resident_memory_bytes();
    ::malloc_trim(0);
    const auto after = resident_memory_bytes();
    const auto released = before > after ? before - after : 0;
    st.stats->count_memory_trim(released);
    t.trimmed = now;
    if (released >= (16u << 20))
      spdlog::info("memory: {} MB of freed heap went back to the system after {} s idle "
                   "(resident {} MB)",
                   released >> 20,
                   std::chrono::duration_cast<std::chrono::seconds>(now - t.active).count(),
                   after >> 20);
  }
  self->delayed_send(self, std::chrono::seconds(1), trim_atom_v);
}

// Starts the GPU actor of `base_model` on `device`, or a fresh one in the
// place of one that failed; user actors route to it from their next request.
void start_gpu(supervisor_actor::stateful_pointer<supervisor_state> self,
               const std::string& base_model, int device) {
  auto& st = self->state;
  auto g = self->spawn<caf::detached>(gpu, device, base_model, st.cfg, st.bases, st.routes.host,
                                      st.loader, st.stats);
  self->monitor(g);
  st.routes.devices->set(base_model, device, g);
  st.device_restarts[{base_model, device}].started = std::chrono::steady_clock::now();
}

// Logs that `what` failed and starts it again: at once through `start`, or
// after the backoff's delay through the message `later` to the supervisor.
template <class Start, class... Later>
void restart(supervisor_actor::stateful_pointer<supervisor_state> self, restart_backoff& backoff,
             spdlog::level::level_enum level, const std::string& what, const caf::error& reason,
             Start start, Later... later) {
  const auto delay = backoff.next_delay(std::chrono::steady_clock::now());
  spdlog::log(level, "{} failed ({}); restarting it{}", what, error_text(reason),
              delay.count() > 0 ? " in " + std::to_string(delay.count()) + " ms" : "");
  if (delay.count() == 0)
    start();
  else
    self->delayed_send(self, delay, later...);
}

// The actor `source` names, if it is one the supervisor cannot restart in
// place: each holds state, or a handle other actors keep. Empty otherwise.
std::string unrestartable(const supervisor_state& st, const caf::actor_addr& source) {
  if (source == st.db.address()) return "the store actor";
  if (source == st.out.address()) return "the egress";
  if (source == st.pool.address()) return "the training pool";
  if (source == st.loader.address()) return "the adapter loader";
  if (source == st.users.address()) return "the user registry";
  return "";
}

// Stops in order, once: the ingress commits what it handled and leaves the
// group, running jobs stop at their next step and keep their checkpoints,
// then the egress flushes and the rest end. Every `stop` waiting is
// answered when it is done.
void stop_in_order(supervisor_actor::stateful_pointer<supervisor_state> self) {
  auto& st = self->state;
  if (st.stopping) return;
  st.stopping = true;
  auto finish = [self]() {
    auto& st = self->state;
    // Ingresses are gone: nothing new is published; the egress flushes on exit.
    spdlog::info("shutdown: consumers closed; flushing the producer");
    st.health->stopping_at("the producer flushing and the actors ending");
    self->send_exit(st.out, caf::exit_reason::user_shutdown);
    self->send_exit(st.users, caf::exit_reason::user_shutdown);
    self->send_exit(st.pool, caf::exit_reason::user_shutdown);
    for (const auto& g : st.routes.devices->all())
      self->send_exit(g, caf::exit_reason::user_shutdown);
    self->send_exit(st.loader, caf::exit_reason::user_shutdown);
    self->send_exit(st.db, caf::exit_reason::user_shutdown);
    self->send_exit(st.follower, caf::exit_reason::user_shutdown);
    st.stopped = true;
    for (auto& rp : st.stop_waiters) rp.deliver(caf::ok_atom_v);
    st.stop_waiters.clear();
  };
  auto stop_training = [self, finish]() {
    self->state.health->stopping_at("training jobs stopping at their next step");
    self->request(self->state.pool, std::chrono::seconds(60), stop_atom_v)
        .then([finish](caf::ok_atom) { finish(); },
              [finish](caf::error& err) {
                spdlog::error("shutdown: training did not stop cleanly: {}", caf::to_string(err));
                finish();
              });
  };
  if (!st.input) {
    stop_training();
    return;
  }
  st.health->stopping_at("the consumers committing and leaving their group");
  self->request(st.input, std::chrono::seconds(30), stop_atom_v)
      .then([stop_training](caf::ok_atom) { stop_training(); },
            [stop_training](caf::error& err) {
              spdlog::error("shutdown: ingress did not stop cleanly: {}", caf::to_string(err));
              stop_training();
            });
}

}  // namespace

std::chrono::milliseconds restart_backoff::next_delay(std::chrono::steady_clock::time_point now) {
  if (now - started >= stable_after) quick_failures = 0;
  const int n = quick_failures++;
  if (n == 0) return std::chrono::milliseconds(0);
  auto delay = std::chrono::duration_cast<std::chrono::milliseconds>(first_delay);
  for (int i = 1; i < n && delay < max_delay; ++i) delay *= 2;
  return std::min<std::chrono::milliseconds>(delay, max_delay);
}

supervisor_actor::behavior_type supervisor(
    supervisor_actor::stateful_pointer<supervisor_state> self, engine_config cfg,
    std::shared_ptr<metrics> stats, std::shared_ptr<engine_health> health,
    std::shared_ptr<storage::metadata_store> db, std::shared_ptr<const base_models> bases,
    std::shared_ptr<group_view> group) {
  auto& st = self->state;
  st.cfg = std::move(cfg);
  st.stats = std::move(stats);
  st.health = std::move(health);
  st.db = self->spawn<caf::detached>(store, db);
  // One transactional id per instance, the same at every start: the next
  // run aborts what a crashed one left open (kafka.exactly_once).
  const auto transactional_id =
      st.cfg.kafka.exactly_once ? st.cfg.kafka.group_id + "." + st.cfg.instance.id : "";
  st.out = self->spawn<caf::detached>(egress, st.cfg.kafka, st.stats, transactional_id,
                                      st.membership);
  st.pool = self->spawn(training_pool, st.cfg, st.db, st.out, st.stats, bases);
  auto host =
      std::make_shared<host_tier>(static_cast<std::size_t>(st.cfg.serving.host_adapters), st.stats);
  st.loader = self->spawn<caf::detached>(adapter_loader, st.cfg, bases, host, st.stats);
  st.routes.devices = std::make_shared<device_table>();
  st.routes.host = host;
  st.routes.loader = st.loader;
  st.bases = bases;
  for (const auto& base : st.cfg.base_models)
    for (int d = 0; d < st.cfg.serving.devices; ++d) start_gpu(self, base, d);
  st.store = db;
  st.group = std::move(group);
  st.users = self->spawn(registry, st.cfg, metadata_access{st.db, std::move(db)}, st.out, st.pool,
                         st.routes, st.group, st.stats);
  // Jobs of the previous run are back in the pool (recover_jobs, once the
  // state topic is read) before new events arrive.
  start_state_follower(self);
  heartbeat(self);
  if (st.cfg.memory_trim_idle_seconds > 0) trim_when_idle(self);
  // These are not restarted in place: their end fails the engine (unrestartable).
  self->monitor(st.db);
  self->monitor(st.out);
  self->monitor(st.pool);
  self->monitor(st.loader);
  self->monitor(st.users);
  self->set_down_handler([self](caf::down_msg& dm) {
    auto& st = self->state;
    if (st.stopping) return;
    if (const auto what = unrestartable(st, dm.source); !what.empty()) {
      // Kafka keeps every event the ingress has not committed for the next run.
      const auto reason = what + " ended: " + error_text(dm.reason);
      spdlog::critical("{}; it cannot be restarted in place, so the engine stops (the next run "
                       "reads again every event this one did not finish)",
                       reason);
      st.health->fail(reason);
      stop_in_order(self);
      return;
    }
    if (st.input.address() == dm.source) {
      // A fresh consumer rejoins the group; uncommitted events are redelivered.
      st.stats->count_ingress_restart();
      restart(self, st.ingress_restarts, spdlog::level::err, "ingress", dm.reason,
              [self] { start_ingress(self); }, restart_atom_v);
      return;
    }
    if (st.follower.address() == dm.source) {
      // A fresh one reads the state topic again from its beginning.
      st.stats->count_state_follower_restart();
      restart(self, st.follower_restarts, spdlog::level::err, "state follower", dm.reason,
              [self] { start_state_follower(self); }, follow_atom_v);
      return;
    }
    std::string base;
    int device = 0;
    if (!st.routes.devices->find(dm.source, base, device)) return;
    // Its requests were answered with an error as it ended (gpu_state), and
    // the ingress sends them again; until the restart they are refused the
    // same way and sent again a second later.
    const auto label = base + "/" + std::to_string(device);
    st.stats->count_device_restart(label);
    restart(self, st.device_restarts[{base, device}], spdlog::level::critical, "gpu " + label,
            dm.reason, [self, base, device] { start_gpu(self, base, device); }, restart_atom_v,
            base, device);
  });
  return {
      [self](restart_atom) {
        if (!self->state.stopping) start_ingress(self);
      },
      [self](restart_atom, const std::string& base, int device) {
        if (!self->state.stopping) start_gpu(self, base, device);
      },
      [self](follow_atom) {
        if (!self->state.stopping) start_state_follower(self);
      },
      [self](tick_atom) { heartbeat(self); },
      [self](trim_atom) { trim_when_idle(self); },
      [self](stop_atom) -> caf::result<caf::ok_atom> {
        auto& st = self->state;
        if (st.stopped) return caf::ok_atom_v;
        auto rp = self->make_response_promise<caf::ok_atom>();
        st.stop_waiters.push_back(rp);
        stop_in_order(self);
        return rp;
      },
  };
}

void resolve_paths(engine_config& cfg) {
  if (cfg.data_dir.empty()) cfg.data_dir = storage::tailor_home() + "/engine";
  if (cfg.artifact_dir.empty()) cfg.artifact_dir = cfg.data_dir + "/artifacts";
  if (cfg.training.data_dir.empty()) cfg.training.data_dir = cfg.data_dir + "/training-data";
}

std::unique_ptr<engine> engine::start(engine_config cfg, std::string& err,
                                      std::shared_ptr<const base_models> bases) {
  std::unique_ptr<engine> e(new engine);
  resolve_paths(cfg);
  if (err = validate(cfg); !err.empty()) return nullptr;
  std::string token;
  if (!cfg.admin_token_file.empty())
    if (err = read_admin_token(cfg.admin_token_file, token); !err.empty()) {
      err = "admin.token_file: " + err;
      return nullptr;
    }
  for (const auto& [what, dir] : {std::pair{"data_dir", cfg.data_dir},
                                  {"artifact_dir", cfg.artifact_dir},
                                  {"training.data_dir", cfg.training.data_dir}}) {
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) {
      err = std::string(what) + " " + dir + ": " + ec.message();
      return nullptr;
    }
  }
  if (err = resolve_instance_id(cfg); !err.empty()) return nullptr;
  spdlog::info("instance {}", cfg.instance.id);
  if (!bases) bases = load_base_models(cfg, err);
  if (!bases) return nullptr;
  // A bad pass-through property fails the start, not a client later on.
  if (!make_conf(cfg.kafka, {}, err)) return nullptr;
  const auto& t = cfg.kafka.topics;
  std::vector<std::string> topics = {t.onboarding, t.inference, t.control, t.results,
                                     t.events,     t.dlq,       t.state};
  if (cfg.kafka.bootstrap_servers.empty()) {
    e->mock_ = mock_cluster::start(1, err);
    if (!e->mock_) return nullptr;
    cfg.kafka.bootstrap_servers = e->mock_->bootstrap();
    // Its fetches wait this long even when data arrives: a demo's request
    // was read up to 0.5 s late. 50 fetches a second, in process, instead.
    cfg.kafka.fetch_wait_ms = 20;
    for (const auto& topic : topics)
      if (err = e->mock_->create_topic(topic, cfg.kafka.topic_partitions); !err.empty())
        return nullptr;
    spdlog::info("embedded Kafka (librdkafka mock cluster) at {}", cfg.kafka.bootstrap_servers);
  } else if (cfg.kafka.create_topics) {
    if (err = create_topics(cfg.kafka, topics, {t.state}); !err.empty()) return nullptr;
  }
  storage::store_options store_opts;
  store_opts.sync_writes = cfg.sync_writes;
  store_opts.memory_bytes = static_cast<uint64_t>(cfg.store_memory_mb) * 1024 * 1024;
  store_opts.retention = std::chrono::hours(24) * cfg.history_retention_days;
  store_opts.log = [](storage::store_log_level level, const std::string& line) {
    using enum storage::store_log_level;
    spdlog::log(level == error  ? spdlog::level::err
                : level == warn ? spdlog::level::warn
                                : spdlog::level::debug,
                "rocksdb: {}", line);
  };
  auto db = storage::metadata_store::open(cfg.data_dir + "/metadata", store_opts);
  if (!db) {
    err = error_text(db.error());
    return nullptr;
  }
  std::shared_ptr<storage::metadata_store> shared_db(std::move(*db));
  e->cfg_ = cfg;
  e->stats_ = std::make_shared<metrics>(static_cast<std::size_t>(cfg.admin_max_user_series));
  e->sys_cfg_ = std::make_unique<caf::actor_system_config>();
  e->sys_cfg_->add_message_types<caf::id_block::tailor>();
  // Work stealing lets idle workers sleep up to 10 ms before they look for
  // work again, and every request hops through scheduled actors several
  // times; the sharing policy wakes a worker at once (measured: p50 latency
  // and batch occupancy, docs/architecture.md).
  e->sys_cfg_->set("scheduler.policy", caf::atom("sharing"));
  // Measured (docs/measurements.md, 2026-12-02, evening): one thread instead
  // of CAF's four on this 2-core machine left the batch loop waiting for
  // its core 0.15 of the time instead of 0.24, and 100 adapters served
  // 12 % more tokens/s.
  if (cfg.compute.actor_threads > 0)
    e->sys_cfg_->set("scheduler.max-threads", static_cast<size_t>(cfg.compute.actor_threads));
  e->sys_cfg_->add_error_category(
      caf::atom("tailor_msg"), [](uint8_t code, caf::atom_value, const caf::message& ctx) {
        return "tailor_msg: " + messages::to_string(static_cast<messages::errc>(code)) + " " +
               caf::to_string(ctx);
      });
  e->sys_cfg_->add_error_category(
      caf::atom("tailor_db"), [](uint8_t code, caf::atom_value, const caf::message& ctx) {
        return "tailor_db: " + storage::to_string(static_cast<storage::errc>(code)) + " " +
               caf::to_string(ctx);
      });
  e->sys_ = std::make_unique<caf::actor_system>(*e->sys_cfg_);
  auto group = std::make_shared<group_view>();
  e->supervisor_ =
      e->sys_->spawn(supervisor, cfg, e->stats_, e->health_, shared_db, bases, group);
  admin_server::group_info about{group, cfg.instance.id, cfg.instance.takeover_after_ms};
  e->admin_ = std::make_unique<admin_server>(shared_db, e->stats_, e->health_, 3, about);
  if (token.empty() && cfg.admin_host != "127.0.0.1" && cfg.admin_host != "localhost" &&
      cfg.admin_host != "::1")
    spdlog::warn("admin API on {} without admin.token_file: whoever reaches it reads users' "
                 "history",
                 cfg.admin_host);
  e->admin_port_ = e->admin_->start(cfg.admin_host, cfg.admin_port, token);
  if (e->admin_port_ < 0) {
    err = "admin API: cannot listen on " + cfg.admin_host + ":" + std::to_string(cfg.admin_port);
    e->stop();
    return nullptr;
  }
  return e;
}

bool engine::ready() const {
  return stats_ && stats_->ready(3) && health_->failure().empty();
}

std::string engine::failure() const {
  return health_->failure();
}

std::string engine::wait_for_failure() {
  return health_->wait();
}

void engine::stop() {
  health_->release();
  if (stopped_ || !sys_) return;
  stopped_ = true;
  health_->stopping_at("the admin API closing");
  if (admin_) admin_->stop();
  {
    health_->stopping_at("the actors stopping in order");
    caf::scoped_actor self{*sys_};
    self->request(supervisor_, std::chrono::seconds(60), stop_atom_v)
        .receive([](caf::ok_atom) {},
                 [](caf::error& err) { spdlog::error("shutdown: {}", caf::to_string(err)); });
    self->send_exit(supervisor_, caf::exit_reason::user_shutdown);
  }
  admin_.reset();
  // A detached actor's thread ends only once no handle refers to it.
  supervisor_ = nullptr;
  health_->stopping_at("the actors' threads ending (the producer flushes, Kafka clients close)");
  sys_.reset();  // waits for every actor: the egress flushes in its destructor
  health_->stopping_at("the embedded Kafka cluster closing");
  mock_.reset();
  health_->stopping_at("stopped");
}

std::string engine::stop_step() const {
  return health_->stop_step();
}

engine::~engine() {
  stop();
}

}  // namespace tailor::actors
