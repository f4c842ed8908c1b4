#include "actors/fair_shares.hpp"

#include <algorithm>

namespace tailor::actors {

fair_shares::share* fair_shares::arrive(const std::string& user) {
  auto& s = table_[user];
  ++s.pending;
  return &s;
}

void fair_shares::release(const std::string& user) {
  auto it = table_.find(user);
  if (it == table_.end()) return;
  auto& s = it->second;
  if (--s.pending <= 0 && s.served <= floor_) table_.erase(it);
  // Users who ended above the floor are forgotten once it passes them: a
  // sweep whenever the table doubled since the last, so each user costs
  // O(1) of sweeping.
  if (table_.size() >= sweep_at_) sweep();
}

void fair_shares::raise_floor(double least) { floor_ = std::max(floor_, least); }

void fair_shares::lift(share& s) const {
  s.served = std::max(s.served, floor_);
  s.fresh = false;
}

void fair_shares::sweep() {
  std::erase_if(table_, [this](const auto& kv) {
    return kv.second.pending <= 0 && kv.second.served <= floor_;
  });
  sweep_at_ = std::max(min_sweep, 2 * table_.size());
}

}  // namespace tailor::actors
