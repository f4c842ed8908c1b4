#pragma once

#include <map>
#include <mutex>
#include <optional>
#include <string>

#include "messages/events.hpp"

namespace tailor::actors {

// The group's open jobs (queued, running or cancelling on some instance) as
// the state topic last showed them, by job id. The state follower writes
// it; user actors read it to answer an event about a job that runs on
// another instance (a cancel, a repeat of its onboarding). Thread-safe.
class group_jobs {
 public:
  // Keeps an open record and forgets the job at a closed one.
  void update(const messages::job_state_record& record);
  void erase(const std::string& job_id);
  void clear();
  std::optional<messages::job_state_record> find(const std::string& job_id) const;
  std::size_t size() const;
  // Calls `f` with each open job, under the lock: `f` must not call back.
  template <class F>
  void for_each(F&& f) const {
    std::lock_guard<std::mutex> guard(mutex_);
    for (const auto& [id, record] : open_) f(record);
  }

 private:
  mutable std::mutex mutex_;
  std::map<std::string, messages::job_state_record> open_;
};

}  // namespace tailor::actors
