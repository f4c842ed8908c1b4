#pragma once

// A second thread for the batch loop's kernels that only runs on a core
// nothing else wants (SCHED_IDLE). No LibTorch here: dense.cpp and
// row_kernels.cpp split their work with it.
//
// The loop's thread and the helper take chunks of a kernel's work from one
// counter, so the loop never waits for the helper to start: on a busy
// machine the loop does every chunk itself, as before; with a core idle the
// helper takes about half. A chunk computes the same numbers on either
// thread, so a row's text does not depend on who ran it.
//
// The loop does wait for a chunk the helper has begun, and a SCHED_IDLE
// thread that another thread preempts may not run again for milliseconds:
// an open loop at 930 requests/s fell to 530, its loop asleep two thirds of
// the time. So while the loop sleeps for the helper, it lends the helper its
// own core (the helper's CPUs become that one, and return when the wait
// ends): the core that would idle finishes the chunk.
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

namespace tailor::model {

class step_helper {
 public:
  // Starts the thread, named `name` (at most 15 characters show). Null, with
  // the reason in `err`, when it cannot start, cannot run SCHED_IDLE, or
  // the process may use only one CPU (the helper would never run). A wait
  // for the helper's chunk that ends more than `late` after the caller ended
  // its own counts as late (a chunk takes a few us).
  static std::unique_ptr<step_helper> start(
      const std::string& name, std::string& err,
      std::chrono::steady_clock::duration late = std::chrono::microseconds(200));
  ~step_helper();
  step_helper(const step_helper&) = delete;
  step_helper& operator=(const step_helper&) = delete;

  // Calls fn(i) once for every i in [0, n), on the calling thread and the
  // helper; returns when every call has returned. fn must not throw (on the
  // helper it would end the process). One caller thread; parallel_chunks
  // inside fn runs in order on whichever thread calls it.
  template <typename F>
  void run(int64_t n, F& fn) {
    run_chunks(n, [](void* f, int64_t i) { (*static_cast<F*>(f))(i); }, &fn);
  }

  // No more work for a while (the step has ended): the helper sleeps now
  // rather than spin, so that it is not waiting for a core when the loop
  // yields its own between steps. The next run() wakes it.
  void rest() { resting_.store(true); }

  // The helper's thread id (0 until it has started), how many chunks it has
  // run, how many times the loop waited long for one (see start), and how many times the
  // loop lent it its core: tests and the serving metrics read them.
  int thread_id() const { return tid_.load(); }
  int64_t chunks_run() const { return helped_.load(std::memory_order_relaxed); }
  int64_t late_waits() const { return late_.load(std::memory_order_relaxed); }
  int64_t cores_lent() const { return lent_.load(std::memory_order_relaxed); }
  // Blocks until the caller has stopped spinning and sleeps until the helper
  // ends a chunk it took (what a late wait is made of), or until `deadline`;
  // whether it did. For a chunk that must not end before then (tests).
  bool caller_asleep_by(std::chrono::steady_clock::time_point deadline);

 private:
  step_helper() = default;
  using chunk_fn = void (*)(void*, int64_t);
  void run_chunks(int64_t n, chunk_fn fn, void* arg);
  void loop();
  // Claims the current job's next chunk: its index, or -1 when none is left.
  int64_t claim();
  // Restricts the helper to the caller's CPU (whether it did), and gives it
  // its CPUs back.
  bool lend_core();
  void free_helper();

  // The current job's next chunk (low 32 bits) and number of chunks (high
  // 32): one word, so that a claim cannot take a chunk of a job that ended.
  std::atomic<uint64_t> next_{0};
  std::atomic<chunk_fn> fn_{nullptr};
  std::atomic<void*> arg_{nullptr};
  std::atomic<int64_t> done_{0};        // chunks of the current job finished
  std::atomic<uint32_t> posted_{0};     // job numbers: the helper waits on it
  std::atomic<uint32_t> finished_{0};   // bumped when the helper ends a chunk
  std::atomic<bool> helper_asleep_{false}, caller_asleep_{false}, resting_{false}, stop_{false};
  std::atomic<int> tid_{0};
  std::atomic<int64_t> helped_{0}, late_{0}, lent_{0};
  std::atomic<int64_t> last_end_{0};  // when the helper ended its last chunk (steady clock ticks)
  // caller_asleep_ becoming true, for caller_asleep_by (the caller reaches
  // it only on its slow path, after spinning).
  std::mutex asleep_mutex_;
  std::condition_variable asleep_cv_;
  cpu_set_t cpus_{};  // the helper's CPUs when it started
  std::chrono::steady_clock::duration late_after_{};
  std::thread thread_;
};

// The helper the calling thread's kernels split their work with, for as
// long as an object of this type lives on it (null: none); then it rests.
class helping {
 public:
  explicit helping(step_helper* h);
  ~helping();
  helping(const helping&) = delete;
  helping& operator=(const helping&) = delete;

 private:
  step_helper* previous_;
};

// The calling thread's helper (set by `helping`), or null.
step_helper* current_helper();

// fn(i) for every i in [0, n): with the calling thread's helper when it has
// one and there are at least two chunks, else in order on this thread.
template <typename F>
void parallel_chunks(int64_t n, F&& fn) {
  step_helper* h = n > 1 ? current_helper() : nullptr;
  if (h == nullptr) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  h->run(n, fn);
}

}  // namespace tailor::model
