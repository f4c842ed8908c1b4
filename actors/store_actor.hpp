#pragma once

#include <caf/typed_actor.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <memory>
#include <string>
#include <vector>

#include "messages/type_ids.hpp"
#include "storage/metadata_store.hpp"

namespace tailor::actors {

using namespace tailor::messages;

// Owns the RocksDB metadata store; runs detached so that disk writes never
// block CAF's shared scheduler. Lookups that may find nothing answer with a
// vector of zero or one records.
using store_actor = caf::typed_actor<
    caf::replies_to<create_atom, job_record, request_record>::with<caf::ok_atom>,
    caf::replies_to<record_atom, request_record>::with<caf::ok_atom>,
    caf::replies_to<models_atom, std::string>::with<std::vector<model_record>>,
    caf::replies_to<jobs_atom, std::string, uint64_t>::with<std::vector<job_record>>,
    caf::replies_to<job_atom, std::string>::with<std::vector<job_record>>,
    caf::replies_to<transit_atom, std::string, std::string, std::string,
                    job_record>::with<job_record>,
    caf::replies_to<register_atom, model_record, std::string,
                    std::vector<outgoing_message>>::with<caf::ok_atom>,
    caf::replies_to<announce_atom, std::string, std::string>::with<caf::ok_atom>,
    // A job another instance ran to its end: moved here (hand_over_job).
    caf::replies_to<moved_atom, std::string, std::string>::with<bool>,
    caf::replies_to<recover_atom>::with<std::vector<job_record>>,
    caf::reacts_to<history_atom, history_entry>,
    // A page of a user's history after a cursor: entries and the next cursor.
    caf::replies_to<history_atom, std::string, std::string,
                    uint64_t>::with<std::vector<history_entry>, std::string>>;

// What a user actor needs of the metadata: the store actor (its own thread,
// off CAF's scheduler) and the store itself for calls that never wait on the
// disk: the point reads on a request's path (duplicate check, model lookup;
// RocksDB gets from memory) and, unless every write is synced, recording an
// inference answer (a write into the WAL's OS buffer). As messages to the
// store actor each of these costs two thread wake-ups, milliseconds on a
// loaded 2-core machine. Both are safe from any thread.
struct metadata_access {
  store_actor actor;
  std::shared_ptr<storage::metadata_store> direct;
};

struct store_state {
  std::shared_ptr<storage::metadata_store> db;
  static inline const char* name = "tailor.store";
};

store_actor::behavior_type store(store_actor::stateful_pointer<store_state> self,
                                 std::shared_ptr<storage::metadata_store> db);

}  // namespace tailor::actors
