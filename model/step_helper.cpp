#include "model/step_helper.hpp"

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>

namespace tailor::model {

namespace {

using clock = std::chrono::steady_clock;

// How long the helper spins for the next job before it sleeps (a step's
// kernels come a few us apart; steps, tens of us), and how long the caller
// spins for the helper's last chunk (a chunk is a few us) before it sleeps.
constexpr auto helper_spin = std::chrono::microseconds(50);
constexpr auto caller_spin = std::chrono::microseconds(20);

// Spins until `ready()` or `limit` has passed; whether it became ready.
template <typename Ready>
bool spin_until(Ready&& ready, clock::duration limit) {
  const auto until = clock::now() + limit;
  while (true) {
    for (int i = 0; i < 64; ++i) {
      if (ready()) return true;
      _mm_pause();
    }
    if (clock::now() >= until) return ready();
  }
}

// A job word: the next chunk in the low 32 bits, the number of chunks in
// the high 32.
constexpr uint64_t word(int64_t next, int64_t size) {
  return (static_cast<uint64_t>(size) << 32) | static_cast<uint64_t>(next);
}
constexpr int64_t next_of(uint64_t w) { return static_cast<int64_t>(w & 0xFFFFFFFFu); }
constexpr int64_t size_of(uint64_t w) { return static_cast<int64_t>(w >> 32); }

thread_local step_helper* current = nullptr;

}  // namespace

std::unique_ptr<step_helper> step_helper::start(const std::string& name, std::string& err,
                                                clock::duration late) {
  std::unique_ptr<step_helper> h(new step_helper());
  h->late_after_ = late;
  // The helper starts with the CPUs of the thread that starts it.
  if (sched_getaffinity(0, sizeof(h->cpus_), &h->cpus_) != 0) {
    err = std::string("sched_getaffinity: ") + std::strerror(errno);
    return nullptr;
  }
  if (CPU_COUNT(&h->cpus_) < 2) {
    err = "only one CPU to run on: a helper would never run";
    return nullptr;
  }
  // 0 while starting, 1 running, -errno when it could not take SCHED_IDLE.
  std::atomic<int> status{0};
  h->thread_ = std::thread([self = h.get(), &status] {
    sched_param param{};
    if (sched_setscheduler(0, SCHED_IDLE, &param) != 0) {
      status = -errno;
      status.notify_one();
      return;
    }
    self->tid_ = static_cast<int>(::syscall(SYS_gettid));
    status = 1;
    status.notify_one();
    self->loop();
  });
  pthread_setname_np(h->thread_.native_handle(), name.substr(0, 15).c_str());
  status.wait(0);
  if (status < 0) {
    err = std::string("SCHED_IDLE: ") + std::strerror(-status.load());
    h->thread_.join();
    return nullptr;
  }
  return h;
}

step_helper::~step_helper() {
  if (!thread_.joinable()) return;
  stop_ = true;
  posted_.fetch_add(1);
  posted_.notify_one();
  thread_.join();
}

int64_t step_helper::claim() {
  // Any claim that succeeds takes a chunk of the job the word describes:
  // the caller starts the next job only when every chunk of this one is
  // done, and writes its fields before its word.
  uint64_t w = next_.load(std::memory_order_acquire);
  while (next_of(w) < size_of(w))
    if (next_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel,
                                    std::memory_order_acquire))
      return next_of(w);
  return -1;
}

void step_helper::run_chunks(int64_t n, chunk_fn fn, void* arg) {
  fn_.store(fn, std::memory_order_relaxed);
  arg_.store(arg, std::memory_order_relaxed);
  done_.store(0, std::memory_order_relaxed);
  resting_.store(false, std::memory_order_relaxed);
  next_.store(word(0, n), std::memory_order_release);
  posted_.fetch_add(1);
  if (helper_asleep_.load()) posted_.notify_one();
  int64_t mine = 0;
  {
    // A kernel that splits its work inside a chunk runs it in order.
    step_helper* const outer = current;
    current = nullptr;
    for (int64_t i = claim(); i >= 0; i = claim()) {
      fn(arg, i);
      ++mine;
    }
    current = outer;
  }
  // The chunks the helper took: wait for them to end.
  auto all_done = [&] { return done_.load(std::memory_order_acquire) + mine >= n; };
  const auto waiting = clock::now();
  if (spin_until(all_done, caller_spin)) return;
  // The helper was kept from its core (or its chunk is long): it gets this
  // one while the caller sleeps, then may run anywhere again.
  const bool moved = lend_core();
  {
    // Before the check below: a helper that ends its chunk after it sees
    // caller_asleep_ and bumps finished_, which ends the wait.
    std::lock_guard<std::mutex> lock(asleep_mutex_);
    caller_asleep_ = true;
  }
  asleep_cv_.notify_all();
  while (true) {
    const auto seen = finished_.load();
    if (all_done()) break;
    finished_.wait(seen);
  }
  caller_asleep_ = false;
  if (moved) free_helper();
  // Late is when the helper ended its last chunk, not when this thread got
  // its core back: a loop kept from its core is not the helper's doing.
  const auto ended = clock::time_point(clock::duration(last_end_.load()));
  if (ended - waiting > late_after_) late_.fetch_add(1, std::memory_order_relaxed);
}

bool step_helper::caller_asleep_by(clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(asleep_mutex_);
  return asleep_cv_.wait_until(lock, deadline, [this] { return caller_asleep_.load(); });
}

bool step_helper::lend_core() {
  const int tid = tid_.load();
  const int cpu = sched_getcpu();
  if (tid == 0 || cpu < 0 || !CPU_ISSET(cpu, &cpus_)) return false;
  cpu_set_t here;
  CPU_ZERO(&here);
  CPU_SET(cpu, &here);
  // Fails only if the helper's CPUs were changed from outside (cpusets);
  // then the caller just waits.
  if (sched_setaffinity(tid, sizeof(here), &here) != 0) return false;
  lent_.fetch_add(1, std::memory_order_relaxed);
  return true;
}

void step_helper::free_helper() {
  // If this fails (cpusets changed from outside), the helper stays on the
  // loop's CPU: it then runs only while the loop waits, which is safe.
  sched_setaffinity(tid_.load(), sizeof(cpus_), &cpus_);
}

void step_helper::loop() {
  // No job before start() returned, so none before 0: reading posted_ here
  // could miss the first.
  uint32_t seen = 0;
  while (!stop_) {
    auto posted = [&] { return posted_.load(std::memory_order_acquire) != seen; };
    auto posted_or_resting = [&] { return posted() || resting_.load(); };
    if (!spin_until(posted_or_resting, helper_spin) || !posted()) {
      helper_asleep_ = true;
      posted_.wait(seen);
      helper_asleep_ = false;
    }
    seen = posted_.load();
    if (stop_) return;
    for (int64_t i = claim(); i >= 0; i = claim()) {
      fn_.load(std::memory_order_relaxed)(arg_.load(std::memory_order_relaxed), i);
      helped_.fetch_add(1, std::memory_order_relaxed);
      last_end_.store(clock::now().time_since_epoch().count(), std::memory_order_relaxed);
      done_.fetch_add(1);
      if (caller_asleep_.load()) {
        finished_.fetch_add(1);
        finished_.notify_one();
      }
    }
  }
}

helping::helping(step_helper* h) : previous_(current) { current = h; }
helping::~helping() {
  if (current != nullptr) current->rest();
  current = previous_;
}

step_helper* current_helper() { return current; }

}  // namespace tailor::model
