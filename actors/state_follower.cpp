#include "actors/state_follower.hpp"

#include <spdlog/spdlog.h>

#include <chrono>
#include <filesystem>
#include <thread>

#include "actors/error_text.hpp"
#include "actors/fault.hpp"
#include "actors/job.hpp"
#include "messages/events.hpp"

namespace tailor::actors {

namespace {

// Where a record read now goes: the follower's own view while it reads the
// topic from its beginning, the shared one once it has read it all.
group_view& view(state_follower_state& st) {
  return st.reading ? *st.reading : *st.group;
}

using self_ptr = state_follower_actor::stateful_pointer<state_follower_state>;
using answers = std::vector<outgoing_message>;

constexpr int metadata_timeout_ms = 10000;
constexpr int drain_batch = 500;  // records a poll takes before it yields to the mailbox

double ms_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}

// The partitions of `topic`, and where each that holds records ends now;
// an error message (empty on success) otherwise.
std::string partition_ends(RdKafka::KafkaConsumer& c, const std::string& topic,
                           std::vector<int32_t>& partitions, std::map<int32_t, int64_t>& ends) {
  std::string err;
  if (!look_up_topic(c, topic, metadata_timeout_ms, err, &partitions)) return err;
  if (partitions.empty()) return "no partitions";
  // A topic just made (the first start on a cluster) has partitions without
  // a leader for a moment: waited for, not a failure of the follower.
  const auto leaderless_until =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(metadata_timeout_ms);
  for (const int32_t id : partitions) {
    int64_t low = 0, high = 0;
    auto rc = c.query_watermark_offsets(topic, id, &low, &high, metadata_timeout_ms);
    while ((rc == RdKafka::ERR_NOT_LEADER_FOR_PARTITION ||
            rc == RdKafka::ERR_LEADER_NOT_AVAILABLE) &&
           std::chrono::steady_clock::now() < leaderless_until) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      rc = c.query_watermark_offsets(topic, id, &low, &high, metadata_timeout_ms);
    }
    if (rc != RdKafka::ERR_NO_ERROR)
      return "partition " + std::to_string(id) + ": " + RdKafka::err2str(rc);
    if (high > low) ends[id] = high;
  }
  return {};
}

// Publishes `out`; a failure is logged (`what` failed) and not retried.
void publish(self_ptr self, answers out, std::string what) {
  self->request(self->state.out, caf::infinite, publish_atom_v, std::move(out))
      .then([](caf::ok_atom) {},
            [what = std::move(what)](caf::error& err) {
              spdlog::error("state: {} not published: {}", what, caf::to_string(err));
            });
}

void caught_up_to(state_follower_state& st, int32_t partition, int64_t next_offset) {
  auto it = st.behind.find(partition);
  if (it != st.behind.end() && next_offset >= it->second) st.behind.erase(it);
}

// Jobs of this instance that another took over while this one was gone
// become `moved`, so that the pool does not resume them. A store that
// cannot take it ends the follower (the supervisor starts it again).
void hand_over_jobs(state_follower_state& st) {
  for (const auto& [job_id, owner] : st.last_owner) {
    if (owner == st.cfg.instance.id) continue;
    auto moved = st.db->hand_over_job(job_id, owner);
    if (!moved)
      throw std::runtime_error("cannot hand job " + job_id + " over: " +
                               caf::to_string(moved.error()));
    if (!*moved) continue;
    st.stats->count_job_handed_over();
    spdlog::warn("state: job {} was taken over by instance {} while this one was away; it is "
                 "moved and does not run here",
                 job_id, owner);
  }
}

// What this instance's store has and the topic lacks goes out: ready models
// (made before the topic existed, or the topic was lost or recreated) and
// this instance's open jobs, so that the group learns them. Nothing, when
// the topic is whole.
void publish_missing(self_ptr self) {
  auto& st = self->state;
  constexpr std::size_t chunk = 1000;  // records per publish
  answers out;
  int64_t models = 0, jobs = 0, outside = 0;
  auto flush = [&](bool all) {
    if (out.empty() || (!all && out.size() < chunk)) return;
    publish(self, std::move(out), "records missing from " + st.cfg.kafka.topics.state);
    out.clear();
  };
  auto err = st.db->for_each_model([&](const model_record& m) {
    if (m.status != "ready" || st.seen_models.count(m.model_id)) return;
    const auto rel =
        std::filesystem::path(m.artifact_path).lexically_relative(st.cfg.artifact_dir);
    if (rel.empty() || *rel.begin() == "..") {
      ++outside;  // no other instance could load it
      return;
    }
    job_record made_by;  // names the request that made it, if that job is here
    if (auto job = st.db->get_job(m.job_id)) made_by = std::move(*job);
    out.push_back(model_state_message(m, made_by, st.cfg.artifact_dir));
    ++models;
    flush(false);
  });
  if (err) spdlog::error("state: cannot list this instance's models: {}", caf::to_string(err));
  auto unfinished = st.db->unfinished_jobs();
  if (!unfinished)
    spdlog::error("state: cannot list this instance's jobs: {}",
                  caf::to_string(unfinished.error()));
  for (const auto& job : unfinished ? *unfinished : std::vector<job_record>{}) {
    if (is_final_job_status(job.status) || job.status == "moved" || st.last_owner.count(job.job_id))
      continue;
    out.push_back(job_state_message(job, st.cfg.instance.id));
    ++jobs;
    flush(false);
  }
  flush(true);
  if (models + jobs > 0)
    spdlog::warn("state: {} model(s) and {} open job(s) of this instance were not on {}; "
                 "published",
                 models, jobs, st.cfg.kafka.topics.state);
  if (outside > 0)
    spdlog::warn("state: {} model(s) here have their adapter outside artifact_dir ({}); other "
                 "instances cannot serve them",
                 outside, st.cfg.artifact_dir);
  st.seen_models.clear();
}

void check_caught_up(self_ptr self) {
  auto& st = self->state;
  if (st.caught_up || !st.behind.empty()) return;
  st.group->replace_with(std::move(*st.reading));
  st.reading.reset();
  if (st.hand_over) {
    hand_over_jobs(st);
    publish_missing(self);
  }
  st.last_owner.clear();
  st.caught_up = true;
  spdlog::info("state: read {} record(s) of {} ({} model(s) new here, {} open job(s) in the "
               "group) in {:.0f} ms; following it",
               st.read, st.cfg.kafka.topics.state, st.imported, st.group->size(),
               ms_since(st.started));
  for (auto& rp : st.catch_up_waiters) rp.deliver(caf::ok_atom_v);
  st.catch_up_waiters.clear();
}

// One record: a ready model of another instance goes into the store. A
// record that cannot be read is logged and skipped (it is nobody's request,
// so it has no requester to answer); a store that cannot take it ends the
// follower, which the supervisor starts again to read the topic again.
void apply(self_ptr self, const RdKafka::Message& msg) {
  auto& st = self->state;
  ++st.read;
  // A tombstone of a deleted user's model or job: the user's erasure
  // record deletes them from the store; a job leaves the group too.
  if (msg.len() == 0) {
    if (const auto* key = msg.key(); key && key->rfind("job/", 0) == 0)
      view(st).erase(key->substr(4));
    return;
  }
  // The process's Nth record throws, which ends the follower.
  static fault_point fault("TAILOR_FAULT_STATE", "the state follower", "state record", false);
  fault.throw_if_fires();
  messages::state_record record;
  const std::string_view bytes(static_cast<const char*>(msg.payload()), msg.len());
  if (auto why = messages::parse_state_record(bytes, record); !why.empty()) {
    spdlog::error("state: record {}/{}@{} skipped: {}", msg.topic_name(), msg.partition(),
                  msg.offset(), why);
    st.stats->count_state_record("rejected");
    return;
  }
  if (auto* newer = std::get_if<messages::newer_state_record>(&record)) {
    // Another instance runs a newer tailord (a rolling upgrade): what it
    // adds is not this version's to follow. Said once per kind, not per
    // record, as heartbeats of a new kind would come every second.
    // The kinds remembered are bounded, and so is a type in the log: a
    // writer gone wrong must not grow either.
    st.stats->count_state_record("newer");
    const auto type = newer->type.substr(0, 100);
    if (st.newer_kinds.size() < state_follower_state::max_newer_kinds &&
        st.newer_kinds.insert({type, newer->schema_version}).second)
      spdlog::warn("state: records of type {} with schema_version {} are newer than this "
                   "tailord ({}) reads; skipped (another instance of the group runs a newer "
                   "version). First: {}/{}@{}",
                   type, newer->schema_version, TAILOR_VERSION, msg.topic_name(),
                   msg.partition(), msg.offset());
    return;
  }
  if (auto* alive = std::get_if<messages::instance_alive>(&record)) {
    view(st).heard(alive->instance_id, group_view::clock::now());
    st.stats->count_state_record("followed");
    return;
  }
  if (auto* job = std::get_if<messages::job_state_record>(&record)) {
    // A request is kept only while another instance may have to be
    // replaced: at most its admission queue and slots' worth each.
    const bool mine = job->owner == st.cfg.instance.id;
    if (mine) job->request.clear();
    view(st).update(*job);
    if (!is_open_job_state(job->status)) {
      st.untakeable.erase(job->job_id);
      st.cancels.erase(job->job_id);
    } else if (job->status == "cancelling" && mine) {
      st.cancels.emplace(job->job_id, false);  // acted on once caught up
    }
    // Needed only for the first catch-up's hand-over and publish_missing.
    if (st.hand_over && !st.caught_up) st.last_owner[job->job_id] = job->owner;
    // Ended elsewhere while it may run here too (this instance stalled
    // and its job was taken over, or it came back while the taker ran it):
    // the run here stops. Before the first catch-up, the store does it.
    if (!is_open_job_state(job->status) && !mine && (st.caught_up || !st.hand_over))
      self->send(st.pool, moved_atom_v, job->job_id, job->owner);
    st.stats->count_state_record("followed");
    return;
  }
  if (auto* gone = std::get_if<messages::user_erasure_record>(&record)) {
    // The instance that deleted the user has deleted it there; here, what
    // this instance kept of them from before goes (its store only: their
    // files are in the shared artifact store, which that instance cleared).
    // Read again at each start, it changes nothing once applied.
    if (gone->owner != st.cfg.instance.id) {
      auto erased = st.db->delete_user(gone->user_id, gone->deleted_ms, {}, true);
      if (!erased)
        throw std::runtime_error("cannot delete user " + gone->user_id + ": " +
                                 caf::to_string(erased.error()));
      if (!erased->models.empty() || erased->requests > 0) {
        st.stats->count_user_deleted("another");
        spdlog::info("state: user {} was deleted on instance {}; {} model(s) and {} job(s) of "
                     "theirs deleted here",
                     gone->user_id, gone->owner, erased->models.size(), erased->job_ids.size());
      }
    }
    st.stats->count_state_record("followed");
    return;
  }
  auto& ms = std::get<messages::model_state>(record);
  if (st.hand_over && !st.caught_up) st.seen_models.insert(ms.model.model_id);
  ms.model.artifact_path = st.cfg.artifact_dir + "/" + ms.model.artifact_path;
  // A repeat of the request that made the model, read here, is answered
  // as its first instance answered it, not trained again.
  const auto made_by = messages::onboarding_record_of(ms);
  auto added = st.db->import_model(ms.model, made_by ? &*made_by : nullptr);
  if (!added)
    throw std::runtime_error("cannot import model " + ms.model.model_id + ": " +
                             caf::to_string(added.error()));
  st.stats->count_state_record(*added ? "imported" : "known");
  if (*added) {
    ++st.imported;
    spdlog::debug("state: model {} of user {} imported", ms.model.model_id, ms.model.user_id);
  }
}

// Runs here a job whose instance is gone: stored (with its request's dedup
// record, so a repeat read here is answered as the first instance answered
// it), handed to the pool, and published as this instance's. A job whose
// cancel was passed on to the gone instance is stored cancelled instead,
// and the pool only announces its end. A failure leaves it open, to be
// tried again at the next tick.
void take_over(self_ptr self, messages::job_state_record open) {
  auto& st = self->state;
  const bool cancelled = open.status == "cancelling";
  job_record job;
  job.job_id = open.job_id;
  job.request_id = open.request_id;
  job.user_id = open.user_id;
  job.base_model = open.base_model;
  job.status = cancelled ? "cancelled" : "queued";
  job.request = open.request;
  job.payload_hash = open.payload_hash;
  job.created_ms = open.created_ms;
  job.updated_ms = messages::unix_ms();
  const auto made_by = messages::queued_record(job.user_id, job.request_id, job.payload_hash,
                                               job.job_id, job.created_ms);
  auto stored = st.db->import_job(job, made_by);
  if (!stored) {
    spdlog::error("state: cannot take job {} over: {}", job.job_id,
                  caf::to_string(stored.error()));
    return;
  }
  if (!*stored) {
    // Here already: the pool runs it from this instance's own store (a
    // restart, or a repeat of its request read here). Unless it has ended,
    // the group learns that it runs here.
    auto here = st.db->get_job(job.job_id);
    if (!here) {
      // Not stored: its user was deleted after it was made.
      if (here.error() == storage::errc::not_found) st.group->erase(job.job_id);
      return;
    }
    if (is_final_job_status(here->status)) {
      st.group->erase(job.job_id);
      return;
    }
    // Not ended here, and its cancel was passed on to the gone instance.
    if (cancelled) st.cancels.emplace(job.job_id, false);
  }
  const auto gone = open.owner;
  open.owner = st.cfg.instance.id;
  open.request.clear();
  st.group->update(open);
  spdlog::warn("state: instance {} not heard from for {} ms; job {} of user {} {}", gone,
               st.cfg.instance.takeover_after_ms, job.job_id, job.user_id,
               cancelled ? "was to be cancelled there: cancelled here" : "runs here");
  if (*stored) {
    st.stats->count_job_taken_over();
    // The pool resumes it from the checkpoint the other instance left in
    // the shared artifact store, if any.
    self->request(st.pool, caf::infinite, submit_atom_v, job)
        .then([](caf::ok_atom) {},
              [id = job.job_id](caf::error& err) {
                spdlog::error("state: job {} taken over but not queued: {}", id,
                              caf::to_string(err));
              });
  }
  // A job stored cancelled is closed by its announcement; one here already
  // stays cancelling, under its new owner.
  if (*stored && cancelled) return;
  publish(self, {cancelled ? cancelling_message(open) : job_state_message(job, open.owner)},
          "job " + job.job_id + " taken over; its new owner");
}

// The cancels another instance passed on of jobs of this one: each goes to
// the pool, as a cancel read here would, and its answer goes out from here.
// A job not in the pool yet (being recovered) is asked again at the next
// tick; one that ended before its cancel came is refused with the reason,
// and the topic told again that it ended.
void pass_cancels(self_ptr self) {
  auto& st = self->state;
  for (auto it = st.cancels.begin(); it != st.cancels.end();) {
    auto& [job_id, asked] = *it;
    if (asked) {
      ++it;
      continue;
    }
    auto job = st.db->get_job(job_id);
    if (!job && job.error() != storage::errc::not_found) {
      ++it;  // the store may answer at the next tick
      continue;
    }
    if (!job || job->status == "moved") {
      spdlog::warn("state: a cancel of job {} was passed on here, but it does not run here; "
                   "dropped",
                   job_id);
      it = st.cancels.erase(it);
      continue;
    }
    if (is_final_job_status(job->status)) {
      st.stats->count_cancel_passed_on("received");
      answers out;
      if (job->status != "cancelled")
        out.push_back(cancel_rejected(job->job_id, job->request_id, job->user_id,
                                      errc::job_not_cancellable,
                                      "job " + job->job_id + " is " + job->status));
      out.push_back(job_state_message(*job, st.cfg.instance.id));
      publish(self, std::move(out), "the answer to the cancel of job " + job_id);
      it = st.cancels.erase(it);
      continue;
    }
    asked = true;
    self->request(st.pool, std::chrono::minutes(10), cancel_atom_v, job_id)
        .then(
            [self, id = job_id, user = job->user_id](answers& out) {
              spdlog::info("state: job {} of user {}: a cancel passed on by another instance "
                           "was answered here",
                           id, user);
              self->state.stats->count_cancel_passed_on("received");
              self->state.cancels.erase(id);
              if (!out.empty()) publish(self, std::move(out), "the answer to the cancel of " + id);
            },
            [self, id = job_id](caf::error& err) {
              auto found = self->state.cancels.find(id);
              if (found != self->state.cancels.end()) found->second = false;
              spdlog::debug("state: cancel of job {} not taken yet ({}); asked again",
                            id, caf::to_string(err));
            });
    ++it;
  }
}

// Counts the group's instances and open jobs (for /metrics), and takes over
// the open jobs of silent instances whose taker is this one.
void watch_group(self_ptr self) {
  auto& st = self->state;
  if (!st.caught_up) return;
  const auto after = std::chrono::milliseconds(st.cfg.instance.takeover_after_ms);
  const auto now = group_view::clock::now();
  const auto heard = st.group->instances();
  // Not heard from since this follower started counts from its start: an
  // instance alive now is heard from well within `after`.
  auto gone = [&](const std::string& id) {
    auto it = heard.find(id);
    return after.count() > 0 && now - (it == heard.end() ? st.started : it->second) > after;
  };
  std::vector<std::string> live = {st.cfg.instance.id};
  for (const auto& [id, at] : heard)
    if (id != st.cfg.instance.id && !gone(id)) live.push_back(id);
  std::vector<messages::job_state_record> mine;
  int64_t orphaned = 0, open_jobs = 0;
  st.group->for_each([&](const messages::job_state_record& open) {
    ++open_jobs;
    if (open.owner == st.cfg.instance.id || !gone(open.owner)) return true;
    ++orphaned;
    if (taker_of(open.job_id, live) == st.cfg.instance.id) mine.push_back(open);
    return true;
  });
  st.stats->set_group(static_cast<int64_t>(live.size()), open_jobs, orphaned);
  for (auto& open : mine) {
    if (!open.request.empty() || open.status == "cancelling") {
      take_over(self, std::move(open));
      continue;
    }
    // Published without it (too large for a record): left to the instance
    // that has it, and said once (it stays among the orphaned jobs).
    if (st.untakeable.insert(open.job_id).second)
      spdlog::error("state: job {} of gone instance {} cannot be taken over: its request was "
                    "too large to publish; it waits for that instance",
                    open.job_id, open.owner);
  }
}

// Drains what the consumer holds, a batch at a time: true if more may wait.
bool drain(self_ptr self) {
  auto& st = self->state;
  for (int i = 0; i < drain_batch; ++i) {
    std::unique_ptr<RdKafka::Message> msg(st.consumer->consume(0));
    switch (msg->err()) {
      case RdKafka::ERR_NO_ERROR:
        apply(self, *msg);
        caught_up_to(st, msg->partition(), msg->offset() + 1);
        break;
      case RdKafka::ERR__PARTITION_EOF:
        caught_up_to(st, msg->partition(), msg->offset());
        break;
      case RdKafka::ERR__TIMED_OUT:
        check_caught_up(self);
        return false;
      default:
        // librdkafka retries on its own (a broker down, a leader moving).
        spdlog::warn("state: reading {}: {}", st.cfg.kafka.topics.state, msg->errstr());
        check_caught_up(self);
        return false;
    }
  }
  check_caught_up(self);
  return true;
}

}  // namespace

std::string taker_of(const std::string& job_id, const std::vector<std::string>& live) {
  std::string best;
  uint64_t best_score = 0;
  for (const auto& id : live) {
    const auto score = messages::fnv1a64(job_id, messages::fnv1a64(id));
    if (best.empty() || score > best_score || (score == best_score && id < best)) {
      best = id;
      best_score = score;
    }
  }
  return best;
}

state_follower_state::~state_follower_state() {
  wakeup.reset();
  if (consumer) consumer->close();
}

state_follower_actor::behavior_type state_follower(
    state_follower_actor::stateful_pointer<state_follower_state> self, engine_config cfg,
    std::shared_ptr<storage::metadata_store> db, std::shared_ptr<metrics> stats,
    pool_actor pool, egress_actor out, std::shared_ptr<group_view> group, bool hand_over) {
  self->set_exception_handler(exit_reason_of_exception);
  auto& st = self->state;
  st.cfg = std::move(cfg);
  st.db = std::move(db);
  st.stats = std::move(stats);
  st.pool = std::move(pool);
  st.out = std::move(out);
  st.group = std::move(group);
  st.reading = std::make_unique<group_view>();  // the topic is read from its beginning
  st.hand_over = hand_over;
  st.started = std::chrono::steady_clock::now();
  st.next_progress_log = st.started + std::chrono::seconds(10);
  const auto& topic = st.cfg.kafka.topics.state;
  auto fail = [&](const std::string& what) {
    spdlog::error("state: cannot read {}: {}", topic, what);
    self->quit(caf::make_error(caf::sec::runtime_error, "cannot read " + topic + ": " + what));
    return state_follower_actor::behavior_type::make_empty_behavior();
  };
  std::string err;
  st.events = watch_brokers("tailord-state", st.stats);
  // No group membership: every instance reads every partition. The group
  // id is only librdkafka's requirement for a consumer; nothing is committed.
  auto settings = consumer_settings(st.cfg.kafka);
  settings.insert(settings.begin(), {{"group.id", st.cfg.kafka.group_id + ".state"},
                                     {"enable.auto.commit", "false"},
                                     {"enable.auto.offset.store", "false"},
                                     {"enable.partition.eof", "true"},
                                     {"client.id", "tailord-state"}});
  auto conf = make_conf(st.cfg.kafka, settings, err, st.events.get());
  if (conf) st.consumer.reset(RdKafka::KafkaConsumer::create(conf.get(), err));
  if (!st.consumer) return fail(err);
  std::vector<int32_t> partitions;
  if (err = partition_ends(*st.consumer, topic, partitions, st.behind); !err.empty())
    return fail(err);
  std::vector<RdKafka::TopicPartition*> parts;
  for (auto p : partitions)
    parts.push_back(RdKafka::TopicPartition::create(topic, p, RdKafka::Topic::OFFSET_BEGINNING));
  const auto rc = st.consumer->assign(parts);
  RdKafka::TopicPartition::destroy(parts);
  if (rc != RdKafka::ERR_NO_ERROR) return fail("assign: " + RdKafka::err2str(rc));
  st.wakeup = poll_on_wakeup<state_follower_actor>(self, st.consumer->c_ptr(),
                                                   queue_wakeup::queue::consumer);
  check_caught_up(self);
  self->send(self, tick_atom_v);
  return {
      [self](catch_up_atom) -> caf::result<caf::ok_atom> {
        auto& st = self->state;
        if (st.caught_up) return caf::ok_atom_v;
        auto rp = self->make_response_promise<caf::ok_atom>();
        st.catch_up_waiters.push_back(rp);
        return rp;
      },
      [self](poll_atom) {
        self->state.wakeup->rearm();
        if (drain(self)) self->send(self, poll_atom_v);
      },
      [self](tick_atom) {
        auto& st = self->state;
        if (drain(self)) self->send(self, poll_atom_v);
        const auto now = std::chrono::steady_clock::now();
        if (!st.caught_up && now >= st.next_progress_log) {
          spdlog::info("state: reading {}: {} record(s) so far, {} partition(s) to go",
                       st.cfg.kafka.topics.state, st.read, st.behind.size());
          st.next_progress_log = now + std::chrono::seconds(10);
        }
        watch_group(self);
        if (st.caught_up) pass_cancels(self);
        self->delayed_send(self, std::chrono::seconds(1), tick_atom_v);
      },
  };
}

}  // namespace tailor::actors
