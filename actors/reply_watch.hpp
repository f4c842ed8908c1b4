#pragma once

#include <chrono>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <vector>

namespace tailor::actors {

// The ingress's own timeout for the replies it waits on, one per event.
// CAF 0.17 never cancels a request's timeout: each one stays on the clock
// thread until it expires, the reply long come, and then sends the requester
// a stale message. At thousands of events a second and 120 s, that was
// ~300,000 timers (docs/measurements.md, 2026-12-04, fourth session). Here a
// reply only marks its call, and expiry looks at the oldest calls: all have
// the same timeout, so they expire in the order they were made.
class reply_watch {
 public:
  using clock = std::chrono::steady_clock;

  struct call {
    clock::time_point due;
    std::function<void()> on_expiry;  // released once settled
    bool settled = false;
  };
  using call_ptr = std::shared_ptr<call>;

  explicit reply_watch(clock::duration timeout) : timeout_(timeout) {}

  // Watches a call made at `now`; `on_expiry` runs if it is not settled in time.
  call_ptr watch(clock::time_point now, std::function<void()> on_expiry);

  // True the first time: the reply is the one to act on. False once the call
  // expired (its `on_expiry` has taken over) or was settled before.
  static bool settle(call& c);

  // Takes the calls past due and not settled, oldest first, and returns what
  // each is to run; settled calls ahead of the first one still due leave.
  std::vector<std::function<void()>> expire(clock::time_point now);

  // Calls kept: those not settled, and settled ones behind an older pending one.
  std::size_t size() const { return calls_.size(); }

 private:
  clock::duration timeout_;
  std::deque<call_ptr> calls_;
};

}  // namespace tailor::actors
