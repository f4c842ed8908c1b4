#include "actors/user.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>

#include "actors/error_text.hpp"
#include "actors/fault.hpp"
#include "actors/trainer.hpp"
#include "actors/training_data.hpp"
#include "messages/ids.hpp"
#include "storage/artifacts.hpp"

namespace tailor::actors {

namespace {

using answers = std::vector<outgoing_message>;
using user_ptr = user_actor::stateful_pointer<user_state>;
using promise_t = caf::typed_response_promise<answers>;

constexpr auto store_timeout = std::chrono::seconds(30);

// The cancel kept for `request_id`, or end().
std::deque<user_state::early_cancel>::iterator find_early_cancel(user_state& st,
                                                                 const std::string& request_id) {
  return std::find_if(st.early_cancels.begin(), st.early_cancels.end(),
                      [&](const auto& c) { return c.request_id == request_id; });
}

outgoing_message error_answer(const std::string& type, const std::string& user_id,
                              const std::string& request_id, errc code, std::string message) {
  if (type == "user.delete") {
    user_deletion d;
    d.user_id = user_id;
    d.request_id = request_id;
    d.error = error_info{code, std::move(message)};
    return to_message(d);
  }
  if (type == "onboarding.request") {
    // No job exists; the event names the id the job would have had.
    return to_message(job_event{"job.failed", job_id_for(user_id, request_id), request_id, user_id,
                                std::nullopt, std::nullopt, error_info{code, std::move(message)}});
  }
  inference_result r;
  r.request_id = request_id;
  r.user_id = user_id;
  r.error = error_info{code, std::move(message)};
  return {channel::results, user_id, to_json(r)};
}

// The answer to a request_id used again for a different request.
outgoing_message reused_request_id(const std::string& type, const std::string& user_id,
                                   const std::string& request_id) {
  return error_answer(type, user_id, request_id, errc::duplicate_request_id,
                      "request_id: " + request_id + " was already used by user " + user_id +
                          " for a different request");
}

request_record make_record(const user_state& st, const std::string& request_id,
                           const std::string& type, uint64_t hash, answers out) {
  request_record rec;
  rec.user_id = st.user_id;
  rec.request_id = request_id;
  rec.kind = type == "onboarding.request" ? "onboarding"
             : type == "user.delete"      ? "deletion"
                                          : "inference";
  rec.payload_hash = hash;
  rec.answers = std::move(out);
  rec.created_ms = unix_ms();
  return rec;
}

// Persists the request with its answers, then replies with them: an answer
// is never published before it could be replayed.
void record_and_reply(user_ptr self, promise_t rp, request_record rec) {
  self->request(self->state.db.actor, store_timeout, record_atom_v, rec)
      .await([=](caf::ok_atom) mutable { rp.deliver(rec.answers); },
             [=](caf::error& err) mutable { rp.deliver(std::move(err)); });
}

// Replays the stored answer of a known (user_id, request_id) (through
// `replay`, which delivers it), refuses a reused id with another payload, or
// hands a new request to `fresh`.
template <class Replay, class Fresh>
void with_dedup(user_ptr self, promise_t rp, std::string request_id, uint64_t hash,
                std::string type, Replay replay, Fresh fresh) {
  auto user_id = self->state.user_id;
  auto found = self->state.db.direct->find_request(user_id, request_id);
  if (!found) {
    rp.deliver(std::move(found.error()));
    return;
  }
  if (!*found) return fresh();
  auto& rec = **found;
  if (rec.payload_hash == hash) return replay(std::move(rec));
  rp.deliver(answers{reused_request_id(type, user_id, request_id)});
}

template <class Fresh>
void with_dedup(user_ptr self, promise_t rp, std::string request_id, uint64_t hash,
                std::string type, Fresh fresh) {
  with_dedup(
      self, rp, std::move(request_id), hash, std::move(type),
      [rp](request_record rec) mutable { rp.deliver(std::move(rec.answers)); }, std::move(fresh));
}

// Where the event `ev` is in Kafka: "topic/partition/offset".
std::string position_of(const incoming_event& ev) {
  return ev.topic + "/" + std::to_string(ev.partition) + "/" + std::to_string(ev.offset);
}

// Hands an announced job to the pool (which ignores a job it has); the
// ingress then has nothing left to publish for the request.
void hand_to_pool(user_ptr self, promise_t rp, const job_record& job) {
  self->request(self->state.pool, store_timeout, submit_atom_v, job)
      .await([=](caf::ok_atom) mutable { rp.deliver(answers{}); },
             [=](caf::error& err) mutable { rp.deliver(std::move(err)); });
}

// Exactly-once output: records that job.queued, published and committed,
// answered the event at `at`, then goes on with `next`. The event's offset
// commits in a later transaction: read again before that (after a crash),
// the event finds the record and publishes nothing (replay_onboarding).
template <class Next>
void mark_announced(user_ptr self, promise_t rp, request_record rec, std::string at, Next next) {
  if (!self->state.cfg.kafka.exactly_once) return next();
  rec.announced_by = std::move(at);
  self->request(self->state.db.actor, store_timeout, record_atom_v, rec)
      .await([=](caf::ok_atom) mutable { next(); },
             [=](caf::error& err) mutable { rp.deliver(std::move(err)); });
}

// The stored answer of a repeated onboarding request. Its job was persisted
// before job.queued was published, and handed to the pool only after: if
// that publish failed, the job waits in the store and the pool never got it.
// Such a job (still queued in the store) is announced again, then handed to
// the pool (which ignores a job it has), so job.queued still comes first;
// the ingress then has nothing left to publish. The event that announced
// it, read again, has nothing to publish either (mark_announced).
void replay_onboarding(user_ptr self, promise_t rp, request_record rec, std::string at) {
  auto& st = self->state;
  if (rec.job_id.empty()) {  // answered with an error: no job
    rp.deliver(std::move(rec.answers));
    return;
  }
  if (st.cfg.kafka.exactly_once && rec.announced_by == at) {
    rp.deliver(answers{});
    return;
  }
  auto job = st.db.direct->get_job(rec.job_id);
  if (!job || job->status != "queued") {
    rp.deliver(std::move(rec.answers));
    return;
  }
  auto fail = [=](caf::error& err) mutable { rp.deliver(std::move(err)); };
  auto announced = rec.answers;
  announced.push_back(job_state_message(*job, st.cfg.instance.id));
  self->request(st.out, store_timeout, publish_atom_v, announced)
      .await(
          [=](caf::ok_atom) mutable {
            mark_announced(self, rp, rec, at, [=] { hand_to_pool(self, rp, *job); });
          },
          fail);
}

void handle_rejection(user_ptr self, promise_t rp, rejection rej) {
  with_dedup(self, rp, rej.request_id, rej.payload_hash, rej.type, [=]() mutable {
    answers out{error_answer(rej.type, rej.user_id, rej.request_id, rej.code, rej.message)};
    record_and_reply(self, rp,
                     make_record(self->state, rej.request_id, rej.type, rej.payload_hash, out));
  });
}

void handle_onboarding(user_ptr self, promise_t rp, onboarding_request x, uint64_t hash,
                       std::string at) {
  const std::string type = "onboarding.request";
  auto replay = [=](request_record rec) mutable {
    replay_onboarding(self, rp, std::move(rec), at);
  };
  with_dedup(self, rp, x.request_id, hash, type, replay, [=]() mutable {
    auto& st = self->state;
    auto refuse = [=](errc code, std::string msg) mutable {
      answers out{error_answer(type, self->state.user_id, x.request_id, code, std::move(msg))};
      record_and_reply(self, rp, make_record(self->state, x.request_id, type, hash, out));
    };
    // A repeat of a request whose job runs on another instance (the user's
    // partition moved here meanwhile) is answered as that instance answered
    // it, and not trained here too.
    if (auto open = st.group->find(job_id_for(st.user_id, x.request_id));
        open && open->owner != st.cfg.instance.id) {
      if (open->payload_hash != hash) {
        rp.deliver(answers{reused_request_id(type, st.user_id, x.request_id)});
        return;
      }
      auto rec = queued_record(st.user_id, x.request_id, hash, open->job_id, open->created_ms);
      return record_and_reply(self, rp, std::move(rec));
    }
    auto base = x.base_model.value_or(st.cfg.default_base_model);
    if (std::find(st.cfg.base_models.begin(), st.cfg.base_models.end(), base) ==
        st.cfg.base_models.end())
      return refuse(errc::unknown_base_model, "base_model: '" + base + "' is not served here");
    if (x.data_ref) {
      // Checked here so the requester hears at once; the slot checks again
      // when it reads the file.
      auto path = resolve_data_ref(st.cfg.training.data_dir, *x.data_ref);
      if (!path) return refuse(static_cast<errc>(path.error().code()), error_text(path.error()));
    }
    self->request(st.pool, store_timeout, count_atom_v, st.user_id)
        .await(
            [=](int64_t in_flight) mutable {
              auto& st = self->state;
              const auto limit = st.cfg.training.max_jobs_per_user;
              if (in_flight >= limit)
                return refuse(errc::quota_exceeded,
                              "user " + st.user_id + " has " + std::to_string(in_flight) +
                                  " jobs in flight (limit " + std::to_string(limit) +
                                  "); send the request again with a new request_id later");
              job_record job;
              job.job_id = job_id_for(st.user_id, x.request_id);
              job.request_id = x.request_id;
              job.user_id = st.user_id;
              job.base_model = base;
              job.status = "queued";
              job.request = to_json(x);
              job.payload_hash = hash;
              job.created_ms = job.updated_ms = unix_ms();
              // The same answer (job.queued) any instance gives a repeat.
              const auto rec =
                  queued_record(st.user_id, x.request_id, hash, job.job_id, job.created_ms);
              auto fail = [=](caf::error& err) mutable { rp.deliver(std::move(err)); };
              // Persisted, then announced, then handed to the pool: job.queued
              // always reaches tailor.events before the job's next event. The
              // job's open state goes to the other instances with it, so that
              // one of them takes the job over if this instance is gone.
              auto announced = rec.answers;
              announced.push_back(job_state_message(job, st.cfg.instance.id));
              self->request(st.db.actor, store_timeout, create_atom_v, job, rec)
                  .await(
                      [=](caf::ok_atom) mutable {
                        self->request(self->state.out, store_timeout, publish_atom_v, announced)
                            .await(
                                [=](caf::ok_atom) mutable {
                                  mark_announced(self, rp, rec, at,
                                                 [=] { hand_to_pool(self, rp, job); });
                                },
                                fail);
                      },
                      fail);
            },
            [=](caf::error& err) mutable { rp.deliver(std::move(err)); });
  });
}

// Fails every copy of an in-flight request that waits for its answer.
void fail_waiters(user_ptr self, const std::string& request_id, const caf::error& err) {
  auto& st = self->state;
  auto it = st.inflight.find(request_id);
  if (it == st.inflight.end()) return;
  for (auto& w : it->second.waiters) w.deliver(err);
  st.inflight.erase(it);
}

// Stores the result as the request's answer with its history entry (input
// and output), then answers every copy of the request that waited for it.
// The output is the record's answer, stored once: the entry's is left empty
// and read from the record (metadata_store::page_history).
void finish_inference(user_ptr self, inference_request x, uint64_t hash, outgoing_message result) {
  auto& st = self->state;
  auto rec = make_record(st, x.request_id, "inference.request", hash, {result});
  history_entry entry{st.user_id, unix_ms(), x.request_id, to_json(x), ""};
  auto answer_waiters = [=] {
    auto& st = self->state;
    auto it = st.inflight.find(x.request_id);
    if (it == st.inflight.end()) return;
    for (auto& rp : it->second.waiters) rp.deliver(answers{result});
    st.inflight.erase(it);
    st.device_failures.erase(x.request_id);
    st.unstored.erase(x.request_id);
    // Stored: a repeat is answered from the store, before any cancel check.
    if (auto c = find_early_cancel(st, x.request_id); c != st.early_cancels.end())
      st.early_cancels.erase(c);
  };
  // Not recorded: every waiter's event is retried by the ingress, and the
  // retry stores this answer (user_state::unstored).
  auto failed = [=](const caf::error& err) {
    self->state.unstored[x.request_id] = {hash, result};
    fail_waiters(self, x.request_id, err);
  };
  if (!st.cfg.sync_writes) {
    // One write for both: a second (the history's, on the store actor) cost
    // as much again in WAL appends and memtable inserts.
    if (auto err = st.db.direct->put_request(rec, &entry))
      failed(err);
    else
      answer_waiters();
    return;
  }
  // A synced write waits on the disk: on the store actor's thread, and the
  // history after it, off the answer's path.
  self->request(st.db.actor, store_timeout, record_atom_v, rec)
      .then(
          [=](caf::ok_atom) {
            answer_waiters();
            self->send(self->state.db.actor, history_atom_v, entry);
          },
          [=](caf::error& err) { failed(err); });
}

// Sends the request to the GPU actor of the model's base; the answer comes
// back without holding up the user's other events.
void serve(user_ptr self, promise_t rp, inference_request x, uint64_t hash, model_record m,
           std::chrono::steady_clock::time_point received) {
  auto& st = self->state;
  auto gpu = st.routes.route(m.base_model, st.user_id);
  if (!gpu) {
    answers out{
        error_answer("inference.request", st.user_id, x.request_id, errc::unavailable,
                     "model " + m.model_id + ": no GPU actor serves base model " + m.base_model)};
    return record_and_reply(self, rp,
                            make_record(st, x.request_id, "inference.request", hash, out));
  }
  // A request each of whose last tries ended with its device failing (as a
  // request that makes the device run out of memory would) is not sent
  // again: each try costs the device's other requests their progress.
  if (auto it = st.device_failures.find(x.request_id);
      it != st.device_failures.end() && it->second >= user_state::max_device_failures) {
    st.device_failures.erase(it);
    answers out{error_answer("inference.request", st.user_id, x.request_id, errc::internal,
                             "the serving device of base model " + m.base_model + " failed " +
                                 std::to_string(user_state::max_device_failures) +
                                 " times while it held this request; send the request again "
                                 "with a new request_id")};
    return record_and_reply(self, rp,
                            make_record(st, x.request_id, "inference.request", hash, out));
  }
  // Cancelled before it came: it ends so without running, with its model.
  // The kept cancel stays until the answer is stored (a failed store write
  // retries this request).
  if (find_early_cancel(st, x.request_id) != st.early_cancels.end()) {
    inference_result res;
    res.request_id = x.request_id;
    res.user_id = st.user_id;
    res.model_id = m.model_id;
    res.finish_reason = "cancelled";
    res.timings.total = res.timings.route =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - received)
            .count();
    // Stored with its history entry, as a request that ran; no device holds it.
    st.inflight[x.request_id] = user_state::pending{hash, {}, {rp}};
    return finish_inference(self, x, hash,
                            outgoing_message{channel::results, st.user_id, to_json(res)});
  }
  const auto limit = static_cast<std::size_t>(st.cfg.serving.max_requests_per_user);
  if (st.inflight.size() >= limit) {
    answers out{error_answer("inference.request", st.user_id, x.request_id, errc::quota_exceeded,
                             "user " + st.user_id + " has " + std::to_string(st.inflight.size()) +
                                 " requests in flight (limit " + std::to_string(limit) +
                                 "); send it again with a new request_id later")};
    return record_and_reply(self, rp,
                            make_record(st, x.request_id, "inference.request", hash, out));
  }
  st.inflight[x.request_id] = user_state::pending{hash, gpu, {rp}};
  // A cold adapter starts loading now, not when the GPU actor, perhaps in
  // the middle of a batch step, gets to the request. Without a host tier
  // there is nothing to prefetch into: the file would be read twice.
  if (st.routes.loader && st.routes.host->capacity() > 0 && !st.routes.host->find(m.model_id))
    self->send(st.routes.loader, prefetch_atom_v, m);
  const auto model_id = m.model_id;
  self->request(gpu, caf::infinite, infer_atom_v,
                inference_order{x, std::move(m), received, std::chrono::steady_clock::now()})
      .then(
          [=](inference_result& result) {
            // Counted and serialized here, on a worker, not on the batch loop
            // that answered (docs/measurements.md, 2026-12-04 (later)).
            self->state.stats->count_request(model_id, self->state.user_id);
            const auto& t = result.timings;
            finish_inference(self, x, hash,
                             outgoing_message{channel::results, result.user_id, to_json(result),
                                              t.queue + t.adapter_load + t.prefill + t.decode,
                                              t.adapter_load});
          },
          [=](caf::error& err) {
            // The GPU actor is gone (shutdown, or it failed): not an answer.
            // The waiters fail, the ingress retries, and nothing is recorded.
            // It ended holding the request (gpu_state): a strike against it.
            if (err == errc::unavailable) ++self->state.device_failures[x.request_id];
            fail_waiters(self, x.request_id, err);
          });
}

void handle_inference(user_ptr self, promise_t rp, inference_request x, uint64_t hash) {
  const std::string type = "inference.request";
  const auto received = std::chrono::steady_clock::now();
  with_dedup(self, rp, x.request_id, hash, type, [=]() mutable {
    auto& st = self->state;
    auto answer = [=](errc code, std::string msg) mutable {
      answers out{error_answer(type, self->state.user_id, x.request_id, code, std::move(msg))};
      record_and_reply(self, rp, make_record(self->state, x.request_id, type, hash, out));
    };
    // The same request still being generated: this copy gets the same answer.
    if (auto it = st.inflight.find(x.request_id); it != st.inflight.end()) {
      if (it->second.payload_hash == hash) {
        it->second.waiters.push_back(rp);
        return;
      }
      return answer(errc::duplicate_request_id, "request_id: " + x.request_id +
                                                    " was already used by user " + st.user_id +
                                                    " for a different request");
    }
    // Generated before, and its storing failed: stored now, not generated again.
    if (auto it = st.unstored.find(x.request_id);
        it != st.unstored.end() && it->second.payload_hash == hash) {
      st.inflight[x.request_id] = user_state::pending{hash, {}, {rp}};
      return finish_inference(self, x, hash, it->second.result);
    }
    if (x.model_id) {
      const auto& model_id = *x.model_id;
      auto m = st.db.direct->get_model(model_id);
      if (!m && m.error() == storage::errc::not_found)
        return answer(errc::model_not_found, "model_id: " + model_id + " does not exist");
      if (!m) {
        rp.deliver(std::move(m.error()));
        return;
      }
      if (m->user_id != st.user_id)
        return answer(errc::model_not_owned,
                      "model_id: " + model_id + " does not belong to user " + st.user_id);
      if (m->status != "ready")
        return answer(errc::model_not_ready, "model_id: " + model_id + " is " + m->status);
      return serve(self, rp, x, hash, std::move(*m), received);
    }
    const auto generation = st.db.direct->models_generation();  // before the list
    if (!st.newest || st.newest->generation != generation) {
      auto models = st.db.direct->list_models(st.user_id);
      if (!models) {
        rp.deliver(std::move(models.error()));
        return;
      }
      st.newest = user_state::newest_ready{generation, std::nullopt};
      for (auto& m : *models)  // newest first
        if (m.status == "ready") {
          st.newest->model = std::move(m);
          break;
        }
    }
    if (st.newest->model) return serve(self, rp, x, hash, *st.newest->model, received);
    answer(errc::no_ready_model, "user " + st.user_id + " has no ready model");
  });
}

// A cancel of a job that runs on another instance (the user's partition
// moved here, or another instance took the job over) is passed on to that
// instance through the state topic, as the job's record marked
// `cancelling`: that instance cancels it and answers. False when the group
// has no such open job of the user.
bool pass_cancel_on(user_ptr self, promise_t& rp, const job_cancel& x) {
  auto& st = self->state;
  auto open = st.group->find(x.job_id);
  if (!open || open->user_id != x.user_id || open->owner == st.cfg.instance.id) return false;
  spdlog::info("job {} of user {} runs on instance {}: its cancel is passed on there", x.job_id,
               x.user_id, open->owner);
  st.stats->count_cancel_passed_on("sent");
  rp.deliver(answers{cancelling_message(std::move(*open))});
  return true;
}

void handle_job_cancel(user_ptr self, promise_t rp, job_cancel x) {
  auto& st = self->state;
  auto reject = [=](const job_record* job, errc code, std::string msg) mutable {
    rp.deliver(answers{
        cancel_rejected(x.job_id, job ? job->request_id : "", x.user_id, code, std::move(msg))});
  };
  self->request(st.db.actor, store_timeout, job_atom_v, x.job_id)
      .await(
          [=](std::vector<job_record>& found) mutable {
            if (found.empty() || found.front().user_id != x.user_id) {
              if (pass_cancel_on(self, rp, x)) return;
              // Ended on another instance, which made the user's model.
              if (auto m = self->state.db.direct->get_model(model_id_for(x.job_id));
                  m && m->user_id == x.user_id)
                return reject(nullptr, errc::job_not_cancellable,
                              "job " + x.job_id + " is ready (model " + m->model_id + ")");
              return reject(nullptr, errc::job_not_found,
                            "job_id: " + x.job_id + " is not a job of user " + x.user_id);
            }
            auto job = found.front();
            if (job.status == "moved") {
              if (pass_cancel_on(self, rp, x)) return;
              return reject(&job, errc::job_not_cancellable,
                            "job " + x.job_id + " was " + job.error_message +
                                ", and has ended there");
            }
            // A redelivered cancel is answered as the first one was.
            if (job.status == "cancelled") {
              rp.deliver(answers{
                  to_message(job_event{"job.cancelled", job.job_id, job.request_id, job.user_id,
                                       std::nullopt, std::nullopt, std::nullopt})});
              return;
            }
            if (job.status == "ready" || job.status == "failed")
              return reject(&job, errc::job_not_cancellable,
                            "job " + x.job_id + " is " + job.status);
            // In flight: the pool's job actor answers once the job has stopped.
            self->request(self->state.pool, std::chrono::minutes(10), cancel_atom_v, x.job_id)
                .await([=](answers& out) mutable { rp.deliver(std::move(out)); },
                       [=](caf::error& err) mutable {
                         reject(
                             &job, errc::job_not_cancellable,
                             "job " + x.job_id + " is " + job.status + ": " + caf::to_string(err));
                       });
          },
          [=](caf::error& err) mutable { rp.deliver(std::move(err)); });
}

// A running request ends with finish_reason cancelled; that result is its
// answer. The cancel itself has no answer of its own (architecture.md). A
// cancel of a request that has not come yet (or waits to be sent again) is
// kept, and the request ends as cancelled when it comes; a cancel of an
// answered request does nothing.
void handle_inference_cancel(user_ptr self, promise_t rp, inference_cancel x) {
  auto& st = self->state;
  if (auto it = st.inflight.find(x.request_id); it != st.inflight.end()) {
    if (it->second.gpu) self->send(it->second.gpu, cancel_atom_v, st.user_id, x.request_id);
    rp.deliver(answers{});
    return;
  }
  auto found = st.db.direct->find_request(st.user_id, x.request_id);
  if (!found) {
    rp.deliver(std::move(found.error()));  // the ingress tries again
    return;
  }
  auto& early = st.early_cancels;
  if (!*found && find_early_cancel(st, x.request_id) == early.end()) {
    early.push_back({x.request_id, std::chrono::steady_clock::now()});
    if (early.size() > user_state::max_early_cancels) early.pop_front();
  }
  rp.deliver(answers{});
}

// --- deleting the user ------------------------------------------------------

// Drops the models' adapters from the host tier and every device, and
// removes their files and the jobs' checkpoints; what could not be removed,
// empty when all went.
std::string forget_files(user_ptr self, const std::vector<model_record>& models,
                         const std::vector<std::string>& job_ids) {
  namespace fs = std::filesystem;
  auto& st = self->state;
  std::string failed;
  auto remove = [&](const std::string& path) {
    std::error_code ec;
    if (!fs::remove(path, ec) && ec && ec != std::errc::no_such_file_or_directory)
      failed += (failed.empty() ? "" : "; ") + path + ": " + ec.message();
  };
  for (const auto& m : models) {
    if (st.routes.host) st.routes.host->erase(m.model_id);
    if (st.routes.devices)
      for (auto& gpu : st.routes.devices->all()) self->send(gpu, forget_atom_v, m);
    remove(m.artifact_path);
  }
  for (const auto& id : job_ids) remove(checkpoint_path(st.cfg, id));
  // The user's folder, once empty (a model made meanwhile keeps it).
  std::error_code ec;
  fs::remove(
      fs::path(storage::adapter_artifact_path(st.cfg.artifact_dir, st.user_id, "-")).parent_path(),
      ec);
  return failed;
}

// Handles the events held while the deletion ran, in order, until one of
// them is a deletion again.
void release_held(user_ptr self);

void end_erasure(user_ptr self) {
  self->state.erasing.reset();
  release_held(self);
}

// Answers the deletion with an error; stored (a repeat gets it too) unless
// the cause may pass.
void reject_erasure(user_ptr self, errc code, std::string message, bool store) {
  auto& st = self->state;
  auto& e = *st.erasing;
  answers out{error_answer("user.delete", st.user_id, e.request.request_id, code,
                           std::move(message))};
  if (store)
    record_and_reply(self, e.rp,
                     make_record(st, e.request.request_id, "user.delete", e.payload_hash, out));
  else
    e.rp.deliver(std::move(out));
  end_erasure(self);
}

// Deletes what is kept of the user, none of whose requests and jobs runs:
// adapters, files, then the store's records in one batch, which records the
// deletion's answer with them. A crash before that batch leaves the store
// as it was (the files may be gone), and the deletion, read again, runs again.
// On this actor's thread even with synced writes: deletions are rare, and
// the user's events wait for it anyway.
void erase_now(user_ptr self) {
  auto& st = self->state;
  auto& e = *st.erasing;
  auto models = st.db.direct->list_models(st.user_id);
  auto jobs = st.db.direct->jobs_of(st.user_id);
  if (!models || !jobs) {
    e.rp.deliver(models ? jobs.error() : models.error());  // the ingress tries again
    return end_erasure(self);
  }
  std::vector<std::string> job_ids;
  for (const auto& j : *jobs) job_ids.push_back(j.job_id);
  if (auto failed = forget_files(self, *models, job_ids); !failed.empty())
    return reject_erasure(self, errc::internal, "files of user " + st.user_id +
                                                    " could not be removed: " + failed,
                          false);
  // TAILOR_FAULT_ERASE=N: the process's Nth deletion kills it here, with
  // the files gone and the records not, as a crash there would.
  static fault_point crash("TAILOR_FAULT_ERASE", "user actors", "deletion", false);
  crash.kill_if_fires("between user " + st.user_id + "'s deletion's files and its records");
  answers out;
  const auto erased = st.db.direct->delete_user(
      st.user_id, e.at_ms, [&](const storage::user_erasure& what) {
        // Tombstones: the compacted state topic keeps none of the user's
        // models and jobs; the erasure keeps other instances from taking
        // back what they read of them before.
        for (const auto& m : what.models) out.push_back({channel::state, m.model_id, ""});
        for (const auto& id : what.job_ids)
          out.push_back({channel::state, state_key_of_job(id), ""});
        out.push_back({channel::state, state_key_of_user(st.user_id),
                       to_json(user_erasure_record{st.user_id, st.cfg.instance.id, e.at_ms})});
        user_deletion d;
        d.user_id = st.user_id;
        d.request_id = e.request.request_id;
        d.models = what.models.size();
        d.jobs = what.job_ids.size();
        d.requests = what.requests;
        d.history = what.history;
        out.push_back(to_message(d));
        return make_record(st, e.request.request_id, "user.delete", e.payload_hash, out);
      });
  if (!erased) {
    e.rp.deliver(erased.error());
    return end_erasure(self);
  }
  // A model imported between the list and the batch (from another instance).
  std::vector<model_record> late;
  for (const auto& m : erased->models)
    if (std::none_of(models->begin(), models->end(),
                     [&](const model_record& x) { return x.model_id == m.model_id; }))
      late.push_back(m);
  if (!late.empty()) (void)forget_files(self, late, {});
  spdlog::info("user {} deleted: {} model(s), {} job(s), {} request record(s), {} history "
               "entries",
               st.user_id, erased->models.size(), erased->job_ids.size(), erased->requests,
               erased->history);
  st.stats->count_user_deleted("here");
  std::vector<std::string> model_ids;
  for (const auto& m : erased->models) model_ids.push_back(m.model_id);
  st.stats->forget_user(st.user_id, model_ids);
  st.erased_at = e.at_ms;
  st.newest.reset();
  st.device_failures.clear();
  st.unstored.clear();
  e.rp.deliver(std::move(out));
  end_erasure(self);
}

// Goes on with the deletion once none of the user's requests and jobs runs
// here; checks again shortly otherwise, for up to `erasure_wait`.
void continue_erasure(user_ptr self) {
  auto& st = self->state;
  if (!st.erasing) return;
  auto wait_more = [self](const std::string& what) {
    auto& st = self->state;
    if (std::chrono::steady_clock::now() < st.erasing->deadline) {
      self->delayed_send(self, std::chrono::milliseconds(50), erase_atom_v);
      return;
    }
    const auto minutes =
        std::chrono::duration_cast<std::chrono::minutes>(user_state::erasure_wait).count();
    reject_erasure(self, errc::unavailable,
                   what + " of user " + st.user_id + " did not end within " +
                       std::to_string(minutes) +
                       " minutes of their deletion; send user.delete again with a new "
                       "request_id",
                   true);
  };
  if (!st.inflight.empty())
    return wait_more(std::to_string(st.inflight.size()) + " request(s)");
  self->request(st.pool, store_timeout, count_atom_v, st.user_id)
      .then(
          [self, wait_more](int64_t running) {
            if (!self->state.erasing) return;
            if (running > 0) return wait_more(std::to_string(running) + " job(s)");
            erase_now(self);
          },
          [self](caf::error& err) {
            if (!self->state.erasing) return;
            self->state.erasing->rp.deliver(std::move(err));
            end_erasure(self);
          });
}

// Deletes the user: their requests in flight end (cancelled) and their jobs
// stop; once none runs, everything kept of them goes (erase_now). Refused
// while a job of theirs runs on another instance, which a cancel passed on
// must end first.
void handle_user_delete(user_ptr self, promise_t rp, user_delete x, uint64_t hash,
                        int64_t sent_ms) {
  with_dedup(self, rp, x.request_id, hash, "user.delete", [=]() mutable {
    auto& st = self->state;
    const auto now = std::chrono::steady_clock::now();
    st.erasing = user_state::erasure{x, hash, sent_ms >= 0 ? sent_ms : unix_ms(), rp,
                                     now + user_state::erasure_wait};
    auto jobs = st.db.direct->jobs_of(st.user_id);
    if (!jobs) {
      rp.deliver(std::move(jobs.error()));
      return end_erasure(self);
    }
    for (const auto& j : *jobs)
      if (auto open = st.group->find(j.job_id); open && open->owner != st.cfg.instance.id)
        return reject_erasure(self, errc::unavailable,
                              "job " + j.job_id + " of user " + st.user_id +
                                  " runs on instance " + open->owner +
                                  ": cancel it (job.cancel), then send user.delete again with "
                                  "a new request_id",
                              true);
    for (auto& [id, pending] : st.inflight)
      if (pending.gpu) self->send(pending.gpu, cancel_atom_v, st.user_id, id);
    st.early_cancels.clear();
    // Each job announces its own end (job.cancelled); a job saving its
    // model cannot be cancelled, and its model goes with the rest.
    for (const auto& j : *jobs)
      if (!is_final_job_status(j.status) && j.status != "moved")
        self->request(st.pool, std::chrono::minutes(10), cancel_atom_v, j.job_id)
            .then([](answers&) {}, [](caf::error&) {});
    continue_erasure(self);
  });
}

// A request sent before its user was deleted and read after: refused, and
// not stored (nothing of the user is kept; a repeat gets the same answer).
bool refused_as_erased(user_ptr self, promise_t& rp, const incoming_event& ev) {
  auto& st = self->state;
  const auto at = st.erased_at.value_or(0);
  if (at == 0 || ev.timestamp_ms < 0 || ev.timestamp_ms > at) return false;
  std::string type, request_id;
  if (auto* rej = std::get_if<rejection>(&ev.parsed)) {
    type = rej->type;
    request_id = rej->request_id;
  } else {
    const auto& value = std::get<parsed_request>(ev.parsed).value;
    if (auto* o = std::get_if<onboarding_request>(&value)) {
      type = "onboarding.request";
      request_id = o->request_id;
    } else if (auto* i = std::get_if<inference_request>(&value)) {
      type = "inference.request";
      request_id = i->request_id;
    }
  }
  // Cancels and deletions are handled as ever.
  if (type != "onboarding.request" && type != "inference.request") return false;
  rp.deliver(answers{error_answer(
      type, st.user_id, request_id, errc::user_deleted,
      "user " + st.user_id + " was deleted (user.delete sent at " + std::to_string(at) +
          " ms) after this request was sent (at " + std::to_string(ev.timestamp_ms) +
          " ms); send it again to be served as a new user")});
  return true;
}

void dispatch(user_ptr self, promise_t rp, incoming_event ev) {
  auto& st = self->state;
  if (!st.erased_at) {
    auto at = st.db.direct->erased_at(st.user_id);
    if (!at) {
      rp.deliver(std::move(at.error()));  // the ingress tries again
      return;
    }
    st.erased_at = at->value_or(0);
  }
  if (refused_as_erased(self, rp, ev)) return;
  if (auto* rej = std::get_if<rejection>(&ev.parsed))
    return handle_rejection(self, rp, std::move(*rej));
  auto& pr = std::get<parsed_request>(ev.parsed);
  std::visit(
      [&](auto& x) {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, onboarding_request>)
          handle_onboarding(self, rp, std::move(x), pr.payload_hash, position_of(ev));
        else if constexpr (std::is_same_v<T, inference_request>)
          handle_inference(self, rp, std::move(x), pr.payload_hash);
        else if constexpr (std::is_same_v<T, job_cancel>)
          handle_job_cancel(self, rp, std::move(x));
        else if constexpr (std::is_same_v<T, user_delete>)
          handle_user_delete(self, rp, std::move(x), pr.payload_hash, ev.timestamp_ms);
        else
          handle_inference_cancel(self, rp, std::move(x));
      },
      pr.value);
}

void release_held(user_ptr self) {
  auto& st = self->state;
  while (!st.erasing && !st.held.empty()) {
    auto [ev, rp] = std::move(st.held.front());
    st.held.pop_front();
    dispatch(self, rp, std::move(ev));
  }
}

const std::string& user_of(const parse_result& r) {
  if (auto* rej = std::get_if<rejection>(&r)) return rej->user_id;
  return std::visit([](const auto& x) -> const std::string& { return x.user_id; },
                    std::get<parsed_request>(r).value);
}

}  // namespace

user_actor::behavior_type user(user_actor::stateful_pointer<user_state> self, std::string user_id,
                               engine_config cfg, metadata_access db, egress_actor out,
                               pool_actor pool, serving_routes routes, registry_actor registry,
                               std::shared_ptr<group_view> group, std::shared_ptr<metrics> stats) {
  self->set_exception_handler(exit_reason_of_exception);
  auto& st = self->state;
  st.user_id = std::move(user_id);
  st.cfg = std::move(cfg);
  st.db = std::move(db);
  st.out = std::move(out);
  st.pool = std::move(pool);
  st.routes = std::move(routes);
  st.registry = std::move(registry);
  st.group = std::move(group);
  st.stats = std::move(stats);
  self->delayed_send(self, std::chrono::seconds(st.cfg.user_idle_seconds), idle_atom_v);
  return {
      [self](handle_atom, incoming_event& ev) -> caf::result<answers> {
        ++self->state.handled;
        auto rp = self->make_response_promise<answers>();
        if (self->state.erasing)
          self->state.held.emplace_back(std::move(ev), rp);
        else
          dispatch(self, rp, std::move(ev));
        return rp;
      },
      [self](erase_atom) { continue_erasure(self); },
      [self](idle_atom) {
        auto& st = self->state;
        auto& early = st.early_cancels;
        const auto now = std::chrono::steady_clock::now();
        while (!early.empty() && now - early.front().read > user_state::early_cancel_wait)
          early.pop_front();
        // Never retired while a generation is on its way back to it, while
        // a cancel waits for its request, nor during a deletion.
        if (st.handled == st.handled_at_last_check && st.inflight.empty() && early.empty() &&
            !st.erasing)
          self->send(st.registry, idle_atom_v, st.user_id, st.handled);
        st.handled_at_last_check = st.handled;
        self->delayed_send(self, std::chrono::seconds(st.cfg.user_idle_seconds), idle_atom_v);
      },
      [self](stop_atom) { self->quit(); },
  };
}

registry_actor::behavior_type registry(registry_actor::stateful_pointer<registry_state> self,
                                       engine_config cfg, metadata_access db, egress_actor out,
                                       pool_actor pool, serving_routes routes,
                                       std::shared_ptr<group_view> group,
                                       std::shared_ptr<metrics> stats) {
  self->set_exception_handler(exit_reason_of_exception);
  self->state.cfg = std::move(cfg);
  self->state.db = std::move(db);
  self->state.out = std::move(out);
  self->state.pool = std::move(pool);
  self->state.routes = std::move(routes);
  self->state.group = std::move(group);
  self->state.stats = std::move(stats);
  // User actors are linked to the registry: when it goes, they go. A user
  // actor's own end arrives here as an exit message and only forgets it.
  self->set_exit_handler([self](caf::exit_msg& em) {
    auto& users = self->state.users;
    for (auto it = users.begin(); it != users.end(); ++it) {
      if (it->second.actor.address() != em.source) continue;
      if (em.reason && em.reason != caf::exit_reason::normal)
        spdlog::error("user actor {} died: {}", it->first, error_text(em.reason));
      users.erase(it);
      self->state.stats->add_users(-1);
      return;
    }
    self->quit(em.reason);
  });
  return {
      [self](route_atom, incoming_event& ev) -> caf::delegated<answers> {
        auto& st = self->state;
        const auto& id = user_of(ev.parsed);
        auto& e = st.users[id];
        if (!e.actor) {
          e.actor = self->spawn<caf::linked>(user, id, st.cfg, st.db, st.out, st.pool, st.routes,
                                             caf::actor_cast<registry_actor>(self), st.group,
                                             st.stats);
          st.stats->add_users(1);
        }
        ++e.routed;
        return self->delegate(e.actor, handle_atom_v, std::move(ev));
      },
      [self](idle_atom, const std::string& id, uint64_t handled) {
        auto& users = self->state.users;
        auto it = users.find(id);
        // Only an actor that has handled all it was sent may go.
        if (it == users.end() || it->second.routed != handled) return;
        // Unlinked first: its exit must not read as the registry's own end.
        self->unlink_from(it->second.actor);
        self->send(it->second.actor, stop_atom_v);
        users.erase(it);
        self->state.stats->add_users(-1);
      },
  };
}

}  // namespace tailor::actors
