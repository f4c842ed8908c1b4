#pragma once

#include <caf/actor_system.hpp>
#include <memory>
#include <string>
#include <thread>

#include "actors/health.hpp"
#include "actors/metrics.hpp"
#include "actors/store_actor.hpp"

namespace httplib {
class Server;
}

namespace tailor::actors {

// The operators' HTTP API on localhost: /healthz, /readyz, /metrics and
// read-only JSON views of jobs and of a user's models. It asks the store actor
// and never opens RocksDB itself. Runs on its own thread, outside CAF.
class admin_server {
 public:
  admin_server(caf::actor_system& sys, store_actor db, std::shared_ptr<metrics> stats,
               std::shared_ptr<const engine_health> health, std::size_t input_topics);
  ~admin_server();
  // Binds host:port (port 0: any free one); returns the bound port or -1.
  int start(const std::string& host, int port);
  void stop();

 private:
  caf::actor_system& sys_;
  store_actor db_;
  std::shared_ptr<metrics> stats_;
  std::shared_ptr<const engine_health> health_;
  std::size_t input_topics_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
};

}  // namespace tailor::actors
