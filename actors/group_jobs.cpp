#include "actors/group_jobs.hpp"

namespace tailor::actors {

void group_jobs::update(const messages::job_state_record& record) {
  std::lock_guard<std::mutex> guard(mutex_);
  if (messages::is_open_job_state(record.status))
    open_[record.job_id] = record;
  else
    open_.erase(record.job_id);
}

void group_jobs::erase(const std::string& job_id) {
  std::lock_guard<std::mutex> guard(mutex_);
  open_.erase(job_id);
}

void group_jobs::clear() {
  std::lock_guard<std::mutex> guard(mutex_);
  open_.clear();
}

std::optional<messages::job_state_record> group_jobs::find(const std::string& job_id) const {
  std::lock_guard<std::mutex> guard(mutex_);
  auto it = open_.find(job_id);
  if (it == open_.end()) return std::nullopt;
  return it->second;
}

std::size_t group_jobs::size() const {
  std::lock_guard<std::mutex> guard(mutex_);
  return open_.size();
}

}  // namespace tailor::actors
