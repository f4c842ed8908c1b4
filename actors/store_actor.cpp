#include "actors/store_actor.hpp"

#include <spdlog/spdlog.h>

#include "actors/error_text.hpp"

namespace tailor::actors {

namespace {

template <class T>
caf::result<std::vector<T>> zero_or_one(caf::expected<T> x) {
  if (x) return std::vector<T>{std::move(*x)};
  if (x.error() == storage::errc::not_found) return std::vector<T>{};
  return x.error();
}

}  // namespace

store_actor::behavior_type store(store_actor::stateful_pointer<store_state> self,
                                 std::shared_ptr<storage::metadata_store> db) {
  self->set_exception_handler(exit_reason_of_exception);
  self->state.db = std::move(db);
  return {
      [self](create_atom, const job_record& job,
             const request_record& req) -> caf::result<caf::ok_atom> {
        if (auto err = self->state.db->create_job(job, req)) return err;
        return caf::ok_atom_v;
      },
      [self](record_atom, const request_record& req) -> caf::result<caf::ok_atom> {
        if (auto err = self->state.db->put_request(req)) return err;
        return caf::ok_atom_v;
      },
      [self](models_atom, const std::string& user) -> caf::result<std::vector<model_record>> {
        auto r = self->state.db->list_models(user);
        if (!r) return r.error();
        return std::move(*r);
      },
      [self](jobs_atom, const std::string& status,
             uint64_t limit) -> caf::result<std::vector<job_record>> {
        auto r = self->state.db->list_jobs(status, limit);
        if (!r) return r.error();
        return std::move(*r);
      },
      [self](job_atom, const std::string& job_id) {
        return zero_or_one(self->state.db->get_job(job_id));
      },
      [self](transit_atom, const std::string& job_id, const std::string& from,
             const std::string& to, const job_record& update) -> caf::result<job_record> {
        auto r = self->state.db->transition_job(job_id, from, to, &update);
        if (!r) return r.error();
        return std::move(*r);
      },
      [self](register_atom, const model_record& m, const std::string& job_id,
             const std::vector<outgoing_message>& outcome) -> caf::result<caf::ok_atom> {
        if (auto err = self->state.db->register_model(m, job_id, outcome)) return err;
        return caf::ok_atom_v;
      },
      [self](announce_atom, const std::string& job_id,
             const std::string& status) -> caf::result<caf::ok_atom> {
        if (auto err = self->state.db->mark_announced(job_id, status)) return err;
        return caf::ok_atom_v;
      },
      [self](moved_atom, const std::string& job_id,
             const std::string& owner) -> caf::result<bool> {
        auto moved = self->state.db->hand_over_job(job_id, owner);
        if (!moved) return moved.error();
        return *moved;
      },
      [self](history_atom, const history_entry& e) {
        // Off the answer's path: a failure is logged, never retried into it.
        if (auto err = self->state.db->append_history(e))
          spdlog::warn("history of {}: {}", e.user_id, caf::to_string(err));
      },
      [self](history_atom, const std::string& user, const std::string& after,
             uint64_t limit) -> caf::result<std::vector<history_entry>, std::string> {
        auto page = self->state.db->page_history(user, after, limit);
        if (!page) return page.error();
        return {std::move(page->entries), std::move(page->next)};
      },
      [self](recover_atom) -> caf::result<std::vector<job_record>> {
        auto r = self->state.db->unfinished_jobs();
        if (!r) return r.error();
        return std::move(*r);
      },
  };
}

}  // namespace tailor::actors
