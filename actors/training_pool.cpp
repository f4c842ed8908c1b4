#include "actors/training_pool.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>

#include "actors/error_text.hpp"

namespace tailor::actors {

namespace {

using answers = std::vector<outgoing_message>;
using pool_ptr = pool_actor::stateful_pointer<pool_state>;

// A slot holds the job it runs and the one after it.
constexpr std::size_t slot_depth = 2;

double unix_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void update_gauges(pool_state& st) {
  st.stats->set_training_queue(static_cast<int64_t>(st.queue.size()));
  int64_t assigned = 0;
  for (const auto& s : st.slots) assigned += static_cast<int64_t>(s.assigned.size());
  st.stats->set_training_assigned(assigned);
}

void admit(pool_ptr self) {
  auto& st = self->state;
  while (!st.queue.empty() && !st.shutdown->load()) {
    auto best = std::min_element(
        st.slots.begin(), st.slots.end(),
        [](const auto& a, const auto& b) { return a.assigned.size() < b.assigned.size(); });
    if (best == st.slots.end() || best->assigned.size() >= slot_depth) break;
    auto id = st.queue.front();
    st.queue.pop_front();
    if (st.queue.empty()) st.stats->set_queue_drained(unix_now());
    auto it = st.jobs.find(id);
    if (it == st.jobs.end()) continue;
    if (!st.admitted_any) {
      st.admitted_any = true;
      st.stats->set_first_admission(unix_now());
    }
    it->second.slot = static_cast<int>(best - st.slots.begin());
    best->assigned.push_back(id);
    self->send(it->second.actor, admit_atom_v, caf::actor_cast<caf::actor>(best->trainer));
  }
  update_gauges(st);
}

// Out of the admission queue, so that it is never admitted afterwards.
void unqueue(pool_state& st, const std::string& id) {
  st.queue.erase(std::remove(st.queue.begin(), st.queue.end(), id), st.queue.end());
}

void unassign(pool_state& st, pool_state::entry& e, const std::string& id) {
  if (e.slot < 0) return;
  auto& a = st.slots[static_cast<std::size_t>(e.slot)].assigned;
  a.erase(std::remove(a.begin(), a.end(), id), a.end());
  e.slot = -1;
}

void maybe_stopped(pool_ptr self) {
  auto& st = self->state;
  if (st.stop_waiters.empty()) return;
  for (const auto& [id, e] : st.jobs)
    if (e.slot >= 0) return;
  for (auto& rp : st.stop_waiters) rp.deliver(caf::ok_atom_v);
  st.stop_waiters.clear();
}

void add_job(pool_ptr self, job_record rec, bool front) {
  auto& st = self->state;
  if (st.jobs.count(rec.job_id)) return;
  auto id = rec.job_id;
  auto user = rec.user_id;
  const bool final = is_final_job_status(rec.status);
  auto abandon = std::make_shared<std::atomic<bool>>(false);
  auto a = self->spawn(job, std::move(rec), st.cfg, st.db, st.out, caf::actor_cast<job_owner>(self),
                       st.stats, abandon);
  self->monitor(a);
  st.jobs[id] = {a, user, -1, abandon};
  ++st.per_user[user];
  if (final) {
    self->send(a, done_atom_v);  // only its final events are left to announce
    return;
  }
  if (front)
    st.queue.push_front(id);
  else
    st.queue.push_back(id);
}

void forget(pool_ptr self, const std::string& id) {
  auto& st = self->state;
  auto it = st.jobs.find(id);
  if (it == st.jobs.end()) return;
  unassign(st, it->second, id);
  unqueue(st, id);
  if (--st.per_user[it->second.user_id] <= 0) st.per_user.erase(it->second.user_id);
  st.jobs.erase(it);
}

// A job whose actor failed is persisted as the actor left it. It starts
// again from there with a fresh actor, as a job found at recovery does,
// after 1, 2 ... s; at its actor's third failure it fails with `internal`
// instead, so that a job that takes its actor down every time ends.
void restart_job(pool_ptr self, const std::string& id, const std::string& why) {
  auto& st = self->state;
  auto& f = st.job_actor_failures[id];
  f.last = why;
  const int n = ++f.count;
  st.stats->count_job_actor_failure();
  const auto delay = std::chrono::seconds(1) * (1 << std::min(n - 1, 4));
  spdlog::error("job {}: its actor failed ({}); the job {} in {} s", id, why,
                n >= pool_state::max_job_actor_failures ? "fails" : "starts again",
                delay.count());
  self->delayed_send(self, delay, restart_atom_v, id);
}

// Fails a job whose actors failed too often, then hands it to a fresh actor,
// which announces job.failed.
void fail_job(pool_ptr self, const job_record& j, const pool_state::actor_failures& f) {
  job_record update;
  update.error_code = to_string(errc::internal);
  update.error_message = "the job's actor failed " + std::to_string(f.count) +
                         " times, last: " + f.last;
  self->request(self->state.db, std::chrono::seconds(30), transit_atom_v, j.job_id, j.status,
                std::string("failed"), update)
      .then(
          [self](job_record& failed) {
            add_job(self, std::move(failed), false);
            admit(self);
          },
          [id = j.job_id](caf::error& err) {
            spdlog::error("job {}: cannot fail it: {}; the next start resumes it", id,
                          error_text(err));
          });
}

}  // namespace

pool_actor::behavior_type training_pool(pool_actor::stateful_pointer<pool_state> self,
                                        engine_config cfg, store_actor db, egress_actor out,
                                        std::shared_ptr<metrics> stats,
                                        std::shared_ptr<const base_models> bases) {
  self->set_exception_handler(exit_reason_of_exception);
  auto& st = self->state;
  st.cfg = std::move(cfg);
  st.db = std::move(db);
  st.out = std::move(out);
  st.stats = std::move(stats);
  for (int i = 0; i < st.cfg.training.slots; ++i) {
    auto t =
        self->spawn<caf::detached + caf::linked>(trainer, i, st.cfg, bases, st.stats, st.shutdown);
    st.slots.push_back({t, {}});
  }
  // A job actor that dies without `done` (a bug, not a job failure) leaves
  // its job persisted as it was: it starts again (restart_job).
  self->set_down_handler([self](caf::down_msg& dm) {
    auto& st = self->state;
    for (auto& [job_id, e] : st.jobs) {
      if (e.actor.address() != dm.source) continue;
      // A run it ordered stops at its next step, keeping its checkpoint:
      // its slot is free for the job's fresh actor, which resumes from it.
      e.abandon->store(true);
      const auto id = job_id;  // forget() erases the entry
      forget(self, id);
      if (dm.reason && dm.reason != caf::exit_reason::normal &&
          dm.reason != caf::exit_reason::user_shutdown && !st.shutdown->load())
        restart_job(self, id, error_text(dm.reason));
      break;
    }
    admit(self);
    maybe_stopped(self);
  });
  // Job actors are monitored, not linked (a job's bug must not end the
  // pool), so the pool's end is passed on to them by hand: a job left behind
  // would keep the actor system, and so the process, from stopping.
  self->set_exit_handler([self](caf::exit_msg& em) {
    if (!em.reason || em.reason == caf::exit_reason::normal) return;
    for (const auto& [id, e] : self->state.jobs) self->send_exit(e.actor, em.reason);
    self->quit(em.reason);
  });
  update_gauges(st);
  return {
      [self](submit_atom, job_record& rec) -> caf::ok_atom {
        add_job(self, std::move(rec), false);
        admit(self);
        return caf::ok_atom_v;
      },
      [self](count_atom, const std::string& user) -> int64_t {
        auto it = self->state.per_user.find(user);
        return it == self->state.per_user.end() ? 0 : it->second;
      },
      [self](cancel_atom, const std::string& id) -> caf::result<answers> {
        auto& st = self->state;
        auto it = st.jobs.find(id);
        if (it == st.jobs.end())
          return caf::make_error(errc::job_not_found, "job " + id + " is not in flight");
        unqueue(st, id);  // first: never admitted afterwards
        update_gauges(st);
        return self->delegate(it->second.actor, cancel_atom_v);
      },
      [self](moved_atom, const std::string& id, const std::string& owner) {
        auto& st = self->state;
        auto it = st.jobs.find(id);
        if (it == st.jobs.end()) return;
        unqueue(st, id);
        update_gauges(st);
        self->send(it->second.actor, moved_atom_v, owner);
      },
      [self](release_atom, const std::string& id) {
        auto& st = self->state;
        if (auto it = st.jobs.find(id); it != st.jobs.end()) unassign(st, it->second, id);
        admit(self);
        maybe_stopped(self);
      },
      [self](requeue_atom, const std::string& id) {
        auto& st = self->state;
        if (!st.jobs.count(id) || st.shutdown->load()) return;
        st.queue.push_back(id);
        admit(self);
      },
      [self](restart_atom, const std::string& id) {
        auto& st = self->state;
        if (st.shutdown->load() || st.jobs.count(id)) return;
        self->request(st.db, std::chrono::seconds(30), job_atom_v, id)
            .then(
                [self, id](std::vector<job_record>& found) {
                  auto& st = self->state;
                  auto f = st.job_actor_failures[id];
                  if (found.empty() || st.shutdown->load() || st.jobs.count(id)) return;
                  auto& j = found.front();
                  const bool final = is_final_job_status(j.status);
                  if (!final && f.count >= pool_state::max_job_actor_failures) {
                    st.job_actor_failures.erase(id);
                    return fail_job(self, j, f);
                  }
                  const bool running =
                      j.status == "admitted" || j.status == "training" || j.status == "saving";
                  add_job(self, std::move(j), running);
                  admit(self);
                },
                [id](caf::error& err) {
                  spdlog::error("job {}: cannot read it to start it again: {}; the next start "
                                "resumes it",
                                id, error_text(err));
                });
      },
      [self](done_atom, const std::string& id) {
        self->state.job_actor_failures.erase(id);
        forget(self, id);
        admit(self);
        maybe_stopped(self);
      },
      [self](recover_atom) -> caf::result<caf::ok_atom> {
        auto rp = self->make_response_promise<caf::ok_atom>();
        self->request(self->state.db, std::chrono::seconds(120), recover_atom_v)
            .then(
                [self, rp](std::vector<job_record>& found) mutable {
                  // Jobs that were running go first, then the queue in arrival order.
                  std::stable_sort(found.begin(), found.end(), [](const auto& a, const auto& b) {
                    return a.created_ms < b.created_ms;
                  });
                  std::size_t resumed = 0, waiting = 0;
                  std::vector<job_record> running;
                  for (auto& j : found) {
                    if (j.status == "admitted" || j.status == "training" || j.status == "saving")
                      running.push_back(std::move(j));
                    else {
                      waiting += j.status == "queued" || j.status == "retrying";
                      add_job(self, std::move(j), false);
                    }
                  }
                  for (auto it = running.rbegin(); it != running.rend(); ++it, ++resumed)
                    add_job(self, std::move(*it), true);
                  if (resumed + waiting > 0)
                    spdlog::info("recovery: {} interrupted jobs resume, {} queued jobs wait",
                                 resumed, waiting);
                  admit(self);
                  rp.deliver(caf::ok_atom_v);
                },
                [rp](caf::error& err) mutable { rp.deliver(std::move(err)); });
        return rp;
      },
      [self](stop_atom) -> caf::result<caf::ok_atom> {
        auto& st = self->state;
        st.shutdown->store(true);  // slots stop at their next step
        st.queue.clear();
        update_gauges(st);
        auto rp = self->make_response_promise<caf::ok_atom>();
        st.stop_waiters.push_back(rp);
        maybe_stopped(self);
        return rp;
      },
  };
}

}  // namespace tailor::actors
