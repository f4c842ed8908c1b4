#pragma once

#include <caf/typed_actor.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <caf/typed_response_promise.hpp>
#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "actors/config.hpp"
#include "actors/egress.hpp"
#include "actors/gpu.hpp"
#include "actors/health.hpp"
#include "actors/ingress.hpp"
#include "actors/metrics.hpp"
#include "actors/state_follower.hpp"
#include "actors/store_actor.hpp"
#include "actors/trainer.hpp"
#include "actors/training_pool.hpp"
#include "actors/user.hpp"

namespace caf {
class actor_system;
class actor_system_config;
}  // namespace caf

namespace tailor::actors {

class admin_server;
class mock_cluster;

// Owns the engine's long-lived actors: resumes the jobs a previous run left
// unfinished before it starts consuming, restarts the ingress and the GPU
// actors when they fail, and on `stop` shuts down in order (the ingress
// commits and leaves the group, running jobs stop at their next step, then
// the egress flushes, then the rest). The other actors it owns hold state
// or handles that other actors keep, so it does not restart them: when one
// ends, the engine fails (engine_health) and stops in the same order.
// `restart` is its own delayed message to itself: for the ingress, or
// (base model, device) for a GPU actor.
using supervisor_actor = caf::typed_actor<caf::replies_to<stop_atom>::with<caf::ok_atom>,
                                          caf::reacts_to<restart_atom>,
                                          caf::reacts_to<restart_atom, std::string, int>,
                                          caf::reacts_to<follow_atom>,
                                          caf::reacts_to<tick_atom>,
                                          caf::reacts_to<trim_atom>>;

// An actor's restarts: one that ran for `stable_after` restarts at once,
// and each failure sooner after its start doubles the delay, up to a cap,
// so that an actor failing as it starts does not spin.
struct restart_backoff {
  static constexpr auto stable_after = std::chrono::seconds(60);
  static constexpr auto first_delay = std::chrono::seconds(1);
  static constexpr auto max_delay = std::chrono::seconds(30);
  std::chrono::steady_clock::time_point started;
  int quick_failures = 0;  // in a row, each before `stable_after`
  // Records a failure at `now` and says how long to wait before the restart.
  std::chrono::milliseconds next_delay(std::chrono::steady_clock::time_point now);
};

struct supervisor_state {
  engine_config cfg;
  std::shared_ptr<metrics> stats;
  store_actor db;
  egress_actor out;
  // The ingress's place in its group, for the egress's transactions.
  std::shared_ptr<group_membership> membership = std::make_shared<group_membership>();
  pool_actor pool;
  loader_actor loader;
  std::shared_ptr<const base_models> bases;
  serving_routes routes;
  std::map<std::pair<std::string, int>, restart_backoff> device_restarts;  // by (base, device)
  registry_actor users;
  ingress_actor input;
  restart_backoff ingress_restarts;
  std::shared_ptr<storage::metadata_store> store;  // for each fresh state follower
  std::shared_ptr<group_view> group;  // the follower's view, for the user actors and admin API
  state_follower_actor follower;
  restart_backoff follower_restarts;
  // The ingress starts once the jobs of the last run are back in the pool
  // and the state topic has been read: not before either.
  bool recovered = false;
  bool caught_up = false;
  std::shared_ptr<engine_health> health;
  bool stopping = false;  // the stop in order has begun
  bool stopped = false;   // ... and is done
  std::vector<caf::typed_response_promise<caf::ok_atom>> stop_waiters;
  // Idle trims of malloc's heap (memory_trim_idle_seconds).
  struct idle_trim {
    int64_t work = -1;  // metrics::work_done() at the last look
    std::chrono::steady_clock::time_point active, trimmed;
  } trim;
  static inline const char* name = "tailor.supervisor";
};

supervisor_actor::behavior_type supervisor(
    supervisor_actor::stateful_pointer<supervisor_state> self, engine_config cfg,
    std::shared_ptr<metrics> stats, std::shared_ptr<engine_health> health,
    std::shared_ptr<storage::metadata_store> db, std::shared_ptr<const base_models> bases,
    std::shared_ptr<group_view> group);

// Fills in the paths that default to places under data_dir.
void resolve_paths(engine_config& cfg);

// tailord's engine: storage, Kafka (embedded mock cluster when no bootstrap
// servers are configured), actors and the admin API.
class engine {
 public:
  // Returns null and sets `err` when anything cannot start. `bases` are the
  // loaded base models (load_base_models); null loads them here.
  static std::unique_ptr<engine> start(engine_config cfg, std::string& err,
                                       std::shared_ptr<const base_models> bases = nullptr);
  ~engine();
  const std::string& bootstrap_servers() const { return cfg_.kafka.bootstrap_servers; }
  int admin_port() const { return admin_port_; }
  bool ready() const;
  // Why the engine failed (engine_health); empty while it works.
  std::string failure() const;
  // Blocks until the engine fails (returns why) or stop() begins (empty).
  std::string wait_for_failure();
  void stop();
  // Which step of stop() runs now (empty before it begins), thread-safe: a
  // stop that does not end is reported with it.
  std::string stop_step() const;

 private:
  engine() = default;
  engine_config cfg_;
  std::unique_ptr<mock_cluster> mock_;
  std::unique_ptr<caf::actor_system_config> sys_cfg_;
  std::unique_ptr<caf::actor_system> sys_;
  std::shared_ptr<metrics> stats_;
  std::shared_ptr<engine_health> health_ = std::make_shared<engine_health>();
  std::unique_ptr<admin_server> admin_;
  supervisor_actor supervisor_;
  int admin_port_ = -1;
  bool stopped_ = false;
};

}  // namespace tailor::actors
