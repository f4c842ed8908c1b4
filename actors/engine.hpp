#pragma once

#include <caf/typed_actor.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <memory>
#include <string>

#include "actors/config.hpp"
#include "actors/egress.hpp"
#include "actors/ingress.hpp"
#include "actors/metrics.hpp"
#include "actors/store_actor.hpp"
#include "actors/user.hpp"

namespace caf {
class actor_system;
class actor_system_config;
}  // namespace caf

namespace tailor::actors {

class admin_server;
class mock_cluster;

// Owns the engine's long-lived actors: restarts the ingress when it fails, and
// on `stop` shuts down in order (the ingress commits and leaves the group,
// then the egress flushes, then the rest).
using supervisor_actor = caf::typed_actor<caf::replies_to<stop_atom>::with<caf::ok_atom>>;

struct supervisor_state {
  engine_config cfg;
  std::shared_ptr<metrics> stats;
  store_actor db;
  egress_actor out;
  registry_actor users;
  ingress_actor input;
  bool stopping = false;
  static inline const char* name = "tailor.supervisor";
};

supervisor_actor::behavior_type supervisor(
    supervisor_actor::stateful_pointer<supervisor_state> self, engine_config cfg,
    std::shared_ptr<metrics> stats, std::shared_ptr<storage::metadata_store> db);

// tailord's engine: storage, Kafka (embedded mock cluster when no bootstrap
// servers are configured), actors and the admin API.
class engine {
 public:
  // Returns null and sets `err` when anything cannot start.
  static std::unique_ptr<engine> start(engine_config cfg, std::string& err);
  ~engine();
  const std::string& bootstrap_servers() const { return cfg_.kafka.bootstrap_servers; }
  int admin_port() const { return admin_port_; }
  bool ready() const;
  void stop();

 private:
  engine() = default;
  engine_config cfg_;
  std::unique_ptr<mock_cluster> mock_;
  std::unique_ptr<caf::actor_system_config> sys_cfg_;
  std::unique_ptr<caf::actor_system> sys_;
  std::shared_ptr<metrics> stats_;
  std::unique_ptr<admin_server> admin_;
  supervisor_actor supervisor_;
  store_actor admin_db_;
  int admin_port_ = -1;
  bool stopped_ = false;
};

}  // namespace tailor::actors
