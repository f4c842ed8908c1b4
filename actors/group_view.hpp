#pragma once

#include <chrono>
#include <map>
#include <mutex>
#include <optional>
#include <string>

#include "messages/events.hpp"

namespace tailor::actors {

// The group as the state topic last showed it: its open jobs (queued,
// running or cancelling on some instance) by job id, and when each instance
// was last heard from. The state follower writes it; user actors read the
// jobs to answer an event about a job that runs on another instance (a
// cancel, a repeat of its onboarding), and the admin API shows it all
// (/v1/group). Thread-safe.
class group_view {
 public:
  using clock = std::chrono::steady_clock;
  // Keeps an open record and forgets the job at a closed one.
  void update(const messages::job_state_record& record);
  void erase(const std::string& job_id);
  // When `instance_id` was last heard from, by this process's clock (so
  // that the instances' clocks need not agree).
  void heard(const std::string& instance_id, clock::time_point at);
  // Takes `fresh`'s jobs and instances in place of its own, in one step:
  // a state follower that reads the topic again fills a view of its own
  // and swaps it in once it has read it all, so that readers of this one
  // never see it empty or half read.
  void replace_with(group_view&& fresh);
  std::optional<messages::job_state_record> find(const std::string& job_id) const;
  std::size_t size() const;
  std::map<std::string, clock::time_point> instances() const;
  // Calls `f` with each open job, by job id, under the lock: `f` must not
  // call back; it returns false to stop.
  template <class F>
  void for_each(F&& f) const {
    std::lock_guard<std::mutex> guard(mutex_);
    for (const auto& [id, record] : open_)
      if (!f(record)) return;
  }

 private:
  mutable std::mutex mutex_;
  std::map<std::string, messages::job_state_record> open_;
  std::map<std::string, clock::time_point> heard_;
};

}  // namespace tailor::actors
