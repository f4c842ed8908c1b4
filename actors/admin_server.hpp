#pragma once

#include <memory>
#include <string>
#include <thread>

#include "actors/group_view.hpp"
#include "actors/health.hpp"
#include "actors/metrics.hpp"
#include "storage/metadata_store.hpp"

namespace httplib {
class Server;
}

namespace tailor::actors {

// The operators' HTTP API on localhost: /healthz, /readyz, /metrics and
// read-only JSON views of jobs, of a user's models and history, and of the
// group as the state topic shows it. It reads
// the engine's metadata store (thread-safe) on its own threads, outside
// CAF: no actor stands between an operator and the data, so none can be
// lost and take the API with it, and reads never queue behind events.
class admin_server {
 public:
  // The group for /v1/group: what the state follower saw, this instance's
  // id, and after how long an instance counts as gone.
  struct group_info {
    std::shared_ptr<const group_view> view;
    std::string instance_id;
    int64_t takeover_after_ms = 0;
  };
  admin_server(std::shared_ptr<storage::metadata_store> db, std::shared_ptr<metrics> stats,
               std::shared_ptr<const engine_health> health, std::size_t input_topics,
               group_info group);
  ~admin_server();
  // Binds host:port (port 0: any free one); returns the bound port or -1.
  // `token` set: every path but the probes needs it as a bearer token.
  int start(const std::string& host, int port, const std::string& token = "");
  void stop();

 private:
  std::shared_ptr<storage::metadata_store> db_;
  std::shared_ptr<metrics> stats_;
  std::shared_ptr<const engine_health> health_;
  std::size_t input_topics_;
  group_info group_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
};

}  // namespace tailor::actors
