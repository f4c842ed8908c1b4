#pragma once
// Each user's service on one device, counted as S-LoRA's virtual token
// counter: admission picks the waiting request of the least-served user, so
// that a heavy user does not starve the others. A user who was idle, or is
// new, starts at the floor (the least service among users with requests
// waiting or running, as last seen; it never falls), so that idling banks no
// credit, and an idle user above the floor keeps what it was served.
//
// The table forgets a user once nothing of theirs is pending and their
// count is at or below the floor: coming back, they would be lifted to the
// floor anyway, so forgetting changes no decision. It so holds the users with
// requests in flight and those served above the floor lately, not everyone
// ever served.

#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>

namespace tailor::actors {

class fair_shares {
 public:
  struct share {
    double served = 0;    // tokens, prompts and generated
    int64_t pending = 0;  // requests waiting or in the batch
    bool fresh = true;    // not yet lifted: its 0 must not pull the floor down
  };

  // A request of `user` arrived: their share, which stays where it is (map
  // nodes do not move) until the request is released.
  share* arrive(const std::string& user);
  // A request of `user` was answered; forgets the user when that was their
  // last and they are at or below the floor, and now and then sweeps the
  // table for others that are.
  void release(const std::string& user);
  // The floor rises to `least`, the least service among users with requests
  // waiting (not fresh) or running now, when that is higher.
  void raise_floor(double least);
  // A waiting request's user, new or below the floor, starts at the floor.
  void lift(share& s) const;

  double floor() const { return floor_; }
  std::size_t users() const { return table_.size(); }

 private:
  void sweep();

  std::unordered_map<std::string, share> table_;
  double floor_ = 0;
  std::size_t sweep_at_ = min_sweep;
  static constexpr std::size_t min_sweep = 256;
};

}  // namespace tailor::actors
