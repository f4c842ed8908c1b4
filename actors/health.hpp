#pragma once

#include <condition_variable>
#include <mutex>
#include <string>

namespace tailor::actors {

// Whether the engine still works as a whole. The supervisor records a
// failure when an actor it cannot restart in place ends (the store, the
// egress, the training pool, the adapter loader, the user registry): the
// engine then stops in order, /healthz and /readyz report why, and tailord
// exits with status 1, so that a process manager starts a fresh one, which
// reads again every event this one did not finish. Thread-safe.
class engine_health {
 public:
  // Records `reason`; the first failure is the one kept.
  void fail(const std::string& reason);
  // Empty while nothing failed.
  std::string failure() const;
  // Blocks until a failure, which it returns, or release(): then empty.
  std::string wait();
  // Ends every wait, now and later: the engine is stopping.
  void release();
  // Which step of the stop runs now, for a log that says where a stop that
  // does not end is stuck (tailord's stop_timeout_seconds). Empty before.
  void stopping_at(std::string step);
  std::string stop_step() const;

 private:
  mutable std::mutex mtx_;
  std::condition_variable cv_;
  std::string failure_;
  bool released_ = false;
  std::string stop_step_;
};

}  // namespace tailor::actors
