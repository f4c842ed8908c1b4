#include "actors/group_view.hpp"

namespace tailor::actors {

void group_view::update(const messages::job_state_record& record) {
  std::lock_guard<std::mutex> guard(mutex_);
  if (messages::is_open_job_state(record.status))
    open_[record.job_id] = record;
  else
    open_.erase(record.job_id);
}

void group_view::erase(const std::string& job_id) {
  std::lock_guard<std::mutex> guard(mutex_);
  open_.erase(job_id);
}

void group_view::heard(const std::string& instance_id, clock::time_point at) {
  std::lock_guard<std::mutex> guard(mutex_);
  heard_[instance_id] = at;
}

void group_view::replace_with(group_view&& fresh) {
  std::scoped_lock guard(mutex_, fresh.mutex_);
  open_ = std::move(fresh.open_);
  heard_ = std::move(fresh.heard_);
}

std::optional<messages::job_state_record> group_view::find(const std::string& job_id) const {
  std::lock_guard<std::mutex> guard(mutex_);
  auto it = open_.find(job_id);
  if (it == open_.end()) return std::nullopt;
  return it->second;
}

std::size_t group_view::size() const {
  std::lock_guard<std::mutex> guard(mutex_);
  return open_.size();
}

std::map<std::string, group_view::clock::time_point> group_view::instances() const {
  std::lock_guard<std::mutex> guard(mutex_);
  return heard_;
}

}  // namespace tailor::actors
