#include "actors/reply_watch.hpp"

namespace tailor::actors {

reply_watch::call_ptr reply_watch::watch(clock::time_point now, std::function<void()> on_expiry) {
  auto c = std::make_shared<call>(call{now + timeout_, std::move(on_expiry), false});
  calls_.push_back(c);
  return c;
}

bool reply_watch::settle(call& c) {
  if (c.settled) return false;
  c.settled = true;
  c.on_expiry = nullptr;  // what it holds (the event) goes now, not at expiry
  return true;
}

std::vector<std::function<void()>> reply_watch::expire(clock::time_point now) {
  std::vector<std::function<void()>> due;
  while (!calls_.empty()) {
    auto& c = *calls_.front();
    if (!c.settled) {
      if (c.due > now) break;
      c.settled = true;
      due.push_back(std::move(c.on_expiry));
      c.on_expiry = nullptr;
    }
    calls_.pop_front();
  }
  return due;
}

}  // namespace tailor::actors
