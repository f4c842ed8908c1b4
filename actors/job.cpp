#include "actors/job.hpp"

#include <spdlog/spdlog.h>

#include <chrono>
#include <filesystem>

#include "actors/error_text.hpp"
#include "actors/fault.hpp"
#include "actors/log_limit.hpp"

namespace tailor::actors {

namespace {

using answers = std::vector<outgoing_message>;
using job_ptr = job_actor::stateful_pointer<job_state>;

constexpr auto store_timeout = std::chrono::seconds(30);

// Publishes in order (the egress keeps one producer, so a job's events reach
// tailor.events in the order sent), then runs `delivered`. A failed delivery
// is tried again: the events are idempotent for consumers. The egress is
// gone only when the engine stops: then the job ends where it is, persisted,
// and the next start resumes it or announces its outcome again.
void publish(job_ptr self, answers msgs, std::function<void()> delivered = {}) {
  self->request(self->state.out, caf::infinite, publish_atom_v, msgs)
      .then(
          [=](caf::ok_atom) {
            if (delivered) delivered();
          },
          [=](caf::error& err) {
            if (err == caf::sec::request_receiver_down) {
              spdlog::info("job {}: the engine is stopping; its events go out at the next start",
                           self->state.job.job_id);
              self->quit(caf::exit_reason::user_shutdown);
              return;
            }
            spdlog::error("job {}: events not delivered, retrying: {}", self->state.job.job_id,
                          caf::to_string(err));
            publish(self, msgs, delivered);
          });
}

void announce(job_ptr self, const std::string& type) {
  publish(self, {job_event_message(self->state.job, type)});
}

// Gives the slot back and waits for a slot again after `delay`.
void park(job_ptr self, std::chrono::milliseconds delay) {
  auto& st = self->state;
  if (st.in_slot) self->send(st.pool, release_atom_v, st.job.job_id);
  st.in_slot = false;
  self->delayed_send(self, delay, requeue_atom_v);
}

// Persists the move to `to` (with the error/attempts of `update`), then runs
// `next`. A store failure parks the job: it runs again from its persisted
// state after the backoff.
void advance(job_ptr self, const std::string& to, job_record update, std::function<void()> next) {
  // The process's Nth transition (N+: and every later one) throws, which
  // ends the job's actor.
  static fault_point fault("TAILOR_FAULT_JOB", "job actors", "job transition", true);
  fault.throw_if_fires();
  auto& st = self->state;
  self->request(st.db, store_timeout, transit_atom_v, st.job.job_id, st.job.status, to, update)
      .await(
          [=](job_record& j) {
            // The store answers without the request, which this actor holds.
            j.request = std::move(self->state.job.request);
            self->state.job = std::move(j);
            next();
          },
          [=](caf::error& err) {
            auto& st = self->state;
            // Every job retries each backoff while the store cannot write.
            static log_limit lines(std::chrono::seconds(10));
            if (uint64_t held = 0; lines.allow(held))
              spdlog::error("job {}: cannot persist {}: {}{}", st.job.job_id, to,
                            caf::to_string(err),
                            held > 0 ? fmt::format(" ({} more since the last line)", held) : "");
            if (!st.running)
              return park(self, std::chrono::milliseconds(st.cfg.training.retry_backoff_ms));
            // Its slot still runs it: parked now, the job would be admitted
            // again and run twice at once.
            st.park_after_run = true;
            st.abandon->store(true);
          });
}

// The final events, then the job's closed state for the other instances.
answers final_messages(const job_record& j, const std::string& instance) {
  answers out;
  if (j.status == "ready")
    out = j.outcome;
  else
    out.push_back(job_event_message(j, j.status == "failed" ? "job.failed" : "job.cancelled"));
  out.push_back(job_state_message(j, instance));
  return out;
}

// Publishes the final events, records that they were delivered, answers any
// cancel waiting, and ends.
void finish(job_ptr self) {
  publish(self, final_messages(self->state.job, self->state.cfg.instance.id), [self] {
    auto& st = self->state;
    self->request(st.db, store_timeout, announce_atom_v, st.job.job_id, st.job.status)
        .then([](caf::ok_atom) {},
              [self](caf::error& err) {
                // The events went out; at the next start they go out again.
                spdlog::warn("job {}: cannot record the announcement: {}", self->state.job.job_id,
                             caf::to_string(err));
              });
    for (auto& rp : st.cancel_waiters) {
      if (st.job.status == "cancelled") {
        rp.deliver(answers{});  // job.cancelled was just published
        continue;
      }
      rp.deliver(answers{cancel_rejected(
          st.job.job_id, st.job.request_id, st.job.user_id, errc::job_not_cancellable,
          "job " + st.job.job_id + " ended " + st.job.status + " before the cancel took effect")});
    }
    st.cancel_waiters.clear();
    st.stats->count_job(st.job.status);
    st.stats->observe_job(st.job.status,
                          static_cast<double>(unix_ms() - st.job.created_ms) / 1000.0);
    self->send(st.pool, done_atom_v, st.job.job_id);
    self->quit();
  });
}

// The job ended on another instance: it becomes `moved` here, with no event
// (the other instance announced its end), and the actor ends. A store that
// cannot take it leaves the job as it is: the next start moves it.
void hand_over(job_ptr self) {
  auto& st = self->state;
  self->request(st.db, store_timeout, moved_atom_v, st.job.job_id, st.moved_to)
      .then(
          [self](bool moved) {
            auto& st = self->state;
            if (moved) {
              st.stats->count_job_handed_over();
              spdlog::warn("job {}: instance {} ran it to its end; stopped and moved here",
                           st.job.job_id, st.moved_to);
            }
            for (auto& rp : st.cancel_waiters)
              rp.deliver(answers{cancel_rejected(
                  st.job.job_id, st.job.request_id, st.job.user_id, errc::job_not_cancellable,
                  "job " + st.job.job_id + " ended on instance " + st.moved_to)});
            st.cancel_waiters.clear();
            self->send(st.pool, done_atom_v, st.job.job_id);
            self->quit();
          },
          [self](caf::error& err) {
            spdlog::error("job {}: cannot move it: {}; the next start does", self->state.job.job_id,
                          caf::to_string(err));
            self->send(self->state.pool, done_atom_v, self->state.job.job_id);
            self->quit();
          });
}

void on_outcome(job_ptr self, training_outcome& o) {
  auto& st = self->state;
  self->send(st.pool, release_atom_v, st.job.job_id);
  st.in_slot = false;
  st.running = false;
  const bool park_now = st.park_after_run;
  if (park_now) {
    // The run is back: the next may run (a cancelled job's next run, too,
    // should its cancel fail to be stored).
    st.park_after_run = false;
    st.abandon->store(false);
  }
  // Stopped (or done) while the store could not record it: again from its
  // persisted state and checkpoint after the backoff.
  if (park_now && o.status != "cancelled")
    return park(self, std::chrono::milliseconds(st.cfg.training.retry_backoff_ms));
  // Ended on another instance while its run here went on (it was saving,
  // which a cancel does not stop): that end was announced there, and this
  // run's (the same model id) is not announced again.
  if (!st.moved_to.empty() && o.status != "interrupted") {
    hand_over(self);
    return;
  }
  if (o.status == "interrupted") {
    // Shutdown: the job stays where it is and resumes at the next start.
    self->send(st.pool, done_atom_v, st.job.job_id);
    self->quit();
    return;
  }
  if (o.status == "cancelled") {
    advance(self, "cancelled", {}, [self] { finish(self); });
    return;
  }
  if (o.status == "done") {
    model_record m;
    m.model_id = model_id_for(st.job.job_id);
    m.user_id = st.job.user_id;
    m.base_model = st.job.base_model;
    m.artifact_path = o.artifact_path;
    m.checksum = o.checksum;
    m.status = "ready";
    m.created_ms = unix_ms();
    m.job_id = st.job.job_id;
    m.training = o.training;
    auto ready = st.job;
    ready.model_id = m.model_id;
    // The state record first: an instance that takes the user over knows
    // the model before anyone is told that it is ready.
    answers outcome{model_state_message(m, st.job, st.cfg.artifact_dir),
                    job_event_message(ready, "model.ready", o.training)};
    for (auto& r : o.results) outcome.push_back(std::move(r));
    const bool as_base = o.training.validation_texts > 0 && o.training.best_step == 0;
    self->request(st.db, store_timeout, register_atom_v, m, st.job.job_id, outcome)
        .await(
            [=](caf::ok_atom) {
              auto& st = self->state;
              if (as_base) st.stats->count_model_as_base();
              st.job.status = "ready";
              st.job.model_id = m.model_id;
              st.job.outcome = outcome;
              finish(self);
            },
            [=](caf::error& err) {
              spdlog::error("job {}: cannot register model {}: {}", self->state.job.job_id,
                            m.model_id, caf::to_string(err));
              park(self, std::chrono::milliseconds(self->state.cfg.training.retry_backoff_ms));
            });
    return;
  }
  // Failed: transient failures retry with exponential backoff, up to the limit.
  job_record update;
  update.attempts = st.job.attempts + 1;
  update.error_code = to_string(o.code);
  update.error_message = o.message;
  const auto& tc = st.cfg.training;
  if (o.code == errc::storage_full) {
    // The engine's failure, not the job's: it waits for room without using
    // an attempt, the backoff doubling up to a minute.
    update.attempts = st.job.attempts;
    const auto delay = std::min<std::chrono::milliseconds>(
        std::chrono::milliseconds(static_cast<int64_t>(tc.retry_backoff_ms)
                                  << std::min(st.full_disk_waits++, 6)),
        std::chrono::minutes(1));
    spdlog::warn("job {}: the disk is full ({}); trying again in {} ms", st.job.job_id, o.message,
                 delay.count());
    advance(self, "retrying", update, [self, delay] {
      announce(self, "job.retrying");
      park(self, delay);
    });
    return;
  }
  if (o.transient && update.attempts < tc.max_attempts) {
    auto delay = std::chrono::milliseconds(static_cast<int64_t>(tc.retry_backoff_ms)
                                           << std::min<int64_t>(update.attempts - 1, 16));
    spdlog::warn("job {}: attempt {} failed ({}); retrying in {} ms", st.job.job_id,
                 update.attempts, o.message, delay.count());
    advance(self, "retrying", update, [self, delay] {
      announce(self, "job.retrying");
      park(self, delay);
    });
    return;
  }
  if (o.transient) update.error_code = to_string(errc::training_failed);
  advance(self, "failed", update, [self] { finish(self); });
}

// Hands the job to its slot, resolved from the stored request.
void run(job_ptr self, trainer_actor slot) {
  auto& st = self->state;
  auto parsed = parse_event(input_topic::onboarding, st.job.request, st.cfg.limits);
  auto* pr = std::get_if<parsed_request>(&parsed);
  if (!pr || !std::holds_alternative<onboarding_request>(pr->value)) {
    training_outcome o;
    o.status = "failed";
    o.code = errc::internal;
    o.message = "the stored onboarding request no longer parses";
    on_outcome(self, o);
    return;
  }
  const auto& req = std::get<onboarding_request>(pr->value);
  training_order order;
  order.job_id = st.job.job_id;
  order.request_id = st.job.request_id;
  order.user_id = st.job.user_id;
  order.model_id = model_id_for(st.job.job_id);
  order.base_model = st.job.base_model;
  order.texts = req.texts;
  order.data_ref = req.data_ref.value_or("");
  order.hp = resolve(req.hparams, st.cfg.training.defaults);
  order.prompts = req.prompts;
  order.cancel = st.cancel;
  order.abandon = st.abandon;
  st.running = true;
  self->request(slot, caf::infinite, train_atom_v, std::move(order))
      .then([self](training_outcome& o) { on_outcome(self, o); },
            [self](caf::error& err) {
              training_outcome o;
              o.status = "failed";
              o.code = errc::training_failed;
              o.message = "training slot failed: " + caf::to_string(err);
              o.transient = true;
              on_outcome(self, o);
            });
}

}  // namespace

std::string model_id_for(const std::string& job_id) {
  auto tail = job_id.rfind("job-", 0) == 0 ? job_id.substr(4) : job_id;
  return "model-" + tail;
}

outgoing_message cancel_rejected(const std::string& job_id, const std::string& request_id,
                                 const std::string& user_id, errc code, std::string message) {
  job_event ev{"job.cancel_rejected",
               job_id,
               request_id,
               user_id,
               std::nullopt,
               std::nullopt,
               error_info{code, std::move(message)}};
  return to_message(ev);
}

outgoing_message job_event_message(const job_record& j, const std::string& type,
                                   std::optional<training_summary> training) {
  job_event ev{type,         j.job_id,     j.request_id, j.user_id,
               std::nullopt, std::nullopt, std::nullopt, std::move(training)};
  if (type == "model.ready") ev.model_id = j.model_id;
  if ((type == "job.failed" || type == "job.retrying") && !j.error_code.empty())
    ev.error = error_info{errc_of(j.error_code), j.error_message};
  return to_message(ev);
}

outgoing_message model_state_message(const model_record& model, const job_record& job,
                                     const std::string& artifact_dir) {
  model_state s{model, job.request_id, job.payload_hash};
  s.model.artifact_path =
      std::filesystem::path(model.artifact_path).lexically_relative(artifact_dir).string();
  return {channel::state, model.model_id, to_json(s)};
}

outgoing_message job_state_message(const job_record& job, const std::string& owner) {
  job_state_record s;
  s.owner = owner;
  s.status = is_final_job_status(job.status) ? job.status : "queued";
  s.job_id = job.job_id;
  s.request_id = job.request_id;
  s.user_id = job.user_id;
  s.base_model = job.base_model;
  // Within what any broker takes in one record (message.max.bytes,
  // 1,000,000 by default), with room for the rest.
  constexpr std::size_t max_request_bytes = 900 * 1000;
  if (s.status == "queued" && job.request.size() <= max_request_bytes) s.request = job.request;
  s.payload_hash = job.payload_hash;
  s.created_ms = job.created_ms;
  return {channel::state, state_key_of_job(job.job_id), to_json(s)};
}

outgoing_message cancelling_message(messages::job_state_record open) {
  open.status = "cancelling";
  open.request.clear();  // a cancelled job is not run: whoever takes it over closes it
  return {channel::state, state_key_of_job(open.job_id), to_json(open)};
}

job_actor::behavior_type job(job_actor::stateful_pointer<job_state> self, job_record rec,
                             engine_config cfg, store_actor db, egress_actor out, job_owner pool,
                             std::shared_ptr<metrics> stats,
                             std::shared_ptr<std::atomic<bool>> abandon) {
  self->set_exception_handler(exit_reason_of_exception);
  auto& st = self->state;
  st.job = std::move(rec);
  st.cfg = std::move(cfg);
  st.db = std::move(db);
  st.out = std::move(out);
  st.pool = std::move(pool);
  st.stats = std::move(stats);
  st.abandon = std::move(abandon);
  return {
      [self](admit_atom, caf::actor slot) {
        auto& st = self->state;
        st.in_slot = true;
        auto t = caf::actor_cast<trainer_actor>(slot);
        // A job found admitted at recovery was admitted already; one found
        // training or saving starts over from its checkpoint.
        if (st.job.status == "admitted") return run(self, t);
        advance(self, "admitted", {}, [self, t] {
          announce(self, "job.admitted");
          run(self, t);
        });
      },
      [self](started_atom) {
        if (self->state.job.status != "admitted") return;
        advance(self, "training", {}, [self] { announce(self, "job.training"); });
      },
      [self](progress_atom, int64_t step, int64_t steps, double loss) {
        auto& j = self->state.job;
        job_event ev{"job.progress", j.job_id,     j.request_id,
                     j.user_id,      std::nullopt, progress_info{step, steps, loss},
                     std::nullopt};
        publish(self, {to_message(ev)});
      },
      [self](saving_atom) {
        if (self->state.job.status != "training") return;
        advance(self, "saving", {}, [self] { announce(self, "job.saving"); });
      },
      [self](cancel_atom) -> caf::result<answers> {
        auto& st = self->state;
        const auto& s = st.job.status;
        if (!st.in_slot && (s == "queued" || s == "retrying")) {
          auto rp = self->make_response_promise<answers>();
          st.cancel_waiters.push_back(rp);
          advance(self, "cancelled", {}, [self] { finish(self); });
          return rp;
        }
        if (st.in_slot && s != "saving") {
          st.cancel->store(true);  // the slot stops before its next step
          auto rp = self->make_response_promise<answers>();
          st.cancel_waiters.push_back(rp);
          return rp;
        }
        return answers{cancel_rejected(st.job.job_id, st.job.request_id, st.job.user_id,
                                       errc::job_not_cancellable,
                                       "job " + st.job.job_id + " is " + s)};
      },
      [self](requeue_atom) {
        self->send(self->state.pool, requeue_atom_v, self->state.job.job_id);
      },
      [self](done_atom) {
        if (is_final_job_status(self->state.job.status)) finish(self);
      },
      [self](moved_atom, const std::string& owner) {
        auto& st = self->state;
        if (is_final_job_status(st.job.status) || !st.moved_to.empty()) return;
        st.moved_to = owner;
        if (!st.in_slot) return hand_over(self);
        // A save is not interrupted; its outcome hands the job over.
        if (st.job.status != "saving") st.cancel->store(true);
      },
  };
}

}  // namespace tailor::actors
