#pragma once

#include <atomic>
#include <caf/expected.hpp>
#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "messages/records.hpp"
#include "storage/errc.hpp"

namespace rocksdb {
class DB;
class ColumnFamilyHandle;
class EventListener;
}  // namespace rocksdb

namespace tailor::storage {

using messages::history_entry;
using messages::job_record;
using messages::model_record;
using messages::request_record;

enum class store_log_level { debug, warn, error };

struct store_options {
  // fsync the WAL on every write. Off by default: the WAL already survives a
  // killed process; on, it also survives a power cut, at a cost per write.
  bool sync_writes = false;
  // What RocksDB may hold in memory: half for one block cache that every
  // table shares, half for the tables' memtables together (a flush starts
  // when they pass it). 0: RocksDB's defaults, an 8 MB cache per table and
  // up to two 64 MB memtables per table, about 800 MB in all for our six.
  uint64_t memory_bytes = 0;
  // Told of RocksDB's flushes and compactions as they happen (a test waits
  // on them rather than polling the store's memory).
  std::vector<std::shared_ptr<rocksdb::EventListener>> listeners;
  // How long inference answers (their dedup records) and history entries
  // are kept: older ones are not paged and go at the tables' next
  // compaction, which RocksDB runs at least daily. Onboarding records,
  // jobs and models are kept. 0: forever.
  std::chrono::milliseconds retention{0};
  // Where RocksDB's own log lines go, instead of a LOG file in the database's
  // directory: RocksDB 7.8 as Debian builds it (assertions on) aborts the
  // process when it writes that file again after a failed write, as it does
  // while the disk is full. Unset: warnings and errors to stderr.
  std::function<void(store_log_level, const std::string&)> log;
};

// What the store holds in memory now, by RocksDB's own accounting.
struct store_memory {
  uint64_t memtables = 0;      // every table's memtables, flushed or not yet
  uint64_t block_cache = 0;    // blocks of table files read
  uint64_t table_readers = 0;  // indexes and filters of open table files
};

// Whether the store can write, for an operator: while writes fail (a full
// disk, say), the last failure's reason and since when; both empty once a
// write succeeds again or RocksDB resumes.
struct store_writes {
  std::string failing;
  int64_t failing_since_ms = 0;
  uint64_t failures = 0;  // writes failed since open
};

// What deleting a user removed (metadata_store::delete_user): the models
// (whose artifacts and cached adapters the caller removes next), the jobs'
// ids (whose checkpoints and state records go too) and how many request
// records and history entries went.
struct user_erasure {
  std::vector<model_record> models;
  std::vector<std::string> job_ids;
  uint64_t requests = 0;
  uint64_t history = 0;
};

// A page of a user's history, oldest first; `next` resumes after the last entry.
struct history_page {
  std::vector<history_entry> entries;
  std::string next;  // empty at the end
};

// The RocksDB tables of design section 4, one column family each. Every
// operation that touches several tables is one WriteBatch. Thread-safe.
class metadata_store {
 public:
  static caf::expected<std::unique_ptr<metadata_store>> open(const std::string& path,
                                                             store_options opts = {});
  ~metadata_store();
  store_memory memory() const;
  // While writes fail, first asks RocksDB to resume (at most once a
  // second), so that a probe sees the store writable once there is room,
  // with nothing written meanwhile.
  store_writes writes();
  // Bytes of keys and values written to each table since open, by name.
  std::vector<std::pair<std::string, uint64_t>> written_bytes() const;
  // Compacts the requests and history tables now: what is past retention
  // goes (otherwise RocksDB does it in its own time).
  caf::error compact();
  metadata_store(const metadata_store&) = delete;
  metadata_store& operator=(const metadata_store&) = delete;

  // --- jobs ---------------------------------------------------------------
  // A job's `request` (the onboarding request, the user's texts) is stored
  // once, apart from its record, and deleted when the job is at rest (final
  // or moved): what reads a job to run it gets it (get_job,
  // unfinished_jobs); what does not, does not (transition_job, list_jobs).
  //
  // Creates the job and records the request that created it, atomically.
  caf::error create_job(const job_record& job, const request_record& req);
  // With its request while the job can still run.
  caf::expected<job_record> get_job(const std::string& job_id);
  // Moves a job from `from` to `to`; refused unless the job is in `from` and
  // the edge is part of the state machine. `update` may set error/model fields.
  // Returns the job as it is now, without its request.
  caf::expected<job_record> transition_job(const std::string& job_id, const std::string& from,
                                           const std::string& to,
                                           const job_record* update = nullptr);
  // Jobs, optionally only those in `status`; at most `limit`, by job id;
  // without their requests.
  caf::expected<std::vector<job_record>> list_jobs(const std::string& status, std::size_t limit);

  // --- models -------------------------------------------------------------
  // Adds the model to its user's list (newest first) and the models table,
  // and moves `job_id` (if given) from saving to ready with its final events
  // `outcome`, in one batch. A model already listed is refused
  // (already_exists) unless a job is given: then it was imported from
  // another instance that ran the same request, and the job still ends.
  caf::error register_model(const model_record& model, const std::string& job_id = {},
                            const std::vector<messages::outgoing_message>& outcome = {});
  // A ready model that another instance registered (read from tailor.state):
  // added to its user's list in order of creation, newest first, with the
  // dedup record of the request that made it (`made_by`, when given and no
  // record of that request is here), in one batch. True when added; false
  // when the model is here already (it is kept as it is), or its user was
  // deleted after it was made.
  caf::expected<bool> import_model(const model_record& model,
                                   const request_record* made_by = nullptr);
  // A job another instance admitted and is gone from (read from
  // tailor.state), to be run here: stored with the dedup record of its
  // request (unless one is here), in one batch. True when stored; false
  // when the job is here already (it is kept as it is), unless it is one
  // this instance handed over (`moved`), which is stored anew; false too
  // when its user was deleted after it was made.
  caf::expected<bool> import_job(const job_record& job, const request_record& made_by);
  // A job of this instance that `owner` took over while this one was gone:
  // unless it is final, it becomes `moved` (at rest, announced, never run
  // here again). True when it moved; false when it is not here or final.
  caf::expected<bool> hand_over_job(const std::string& job_id, const std::string& owner);
  // Records that the job's events up to `status` were delivered.
  caf::error mark_announced(const std::string& job_id, const std::string& status);
  // Jobs not yet at rest: in a non-final state (with their requests), or
  // final but not announced.
  caf::expected<std::vector<job_record>> unfinished_jobs();
  caf::expected<model_record> get_model(const std::string& model_id);
  caf::expected<std::vector<model_record>> list_models(const std::string& user_id);
  // Calls `f` with every model of every user, by model id (one at a time:
  // a store may hold more than memory should).
  caf::error for_each_model(const std::function<void(const model_record&)>& f);
  // Goes up after every change to the models (register_model), so that a
  // reader may keep what it read of them while this value is unchanged:
  // read it before reading the models.
  uint64_t models_generation() const;

  // --- requests (dedup) ---------------------------------------------------
  caf::expected<std::optional<request_record>> find_request(const std::string& user_id,
                                                            const std::string& request_id);
  // The request's record and, when given, its history entry in the same
  // write (one WAL record, not two).
  caf::error put_request(const request_record& req, const history_entry* entry = nullptr);

  // --- history ------------------------------------------------------------
  // An entry stored with an empty output reads its request record's answer
  // as its output (page_history), so that an answer (~0.5-1 KB of JSON,
  // escaped again inside the entry's) is written once: store the record
  // first, or in the same write.
  caf::error append_history(const history_entry& entry);
  caf::expected<history_page> page_history(const std::string& user_id, const std::string& after,
                                           std::size_t limit);

  // --- users ---------------------------------------------------------------
  // The user's jobs, found through their onboarding requests' records.
  caf::expected<std::vector<job_record>> jobs_of(const std::string& user_id);
  // Deletes everything stored of the user, in one batch: their models, jobs
  // (with their requests), request records and history; then records that
  // the user was deleted at `deleted_ms` (erased_at), and the deletion's own
  // record, made by `answer` from what went (when given), which are all
  // that is left of them. A model or job of the user made before
  // `deleted_ms` and imported later (import_model, import_job) is not
  // stored again. With `keep_newer` (a deletion another instance made, read
  // late), what was made after `deleted_ms` stays, and a deletion already
  // applied here changes nothing.
  using erasure_answer = std::function<request_record(const user_erasure&)>;
  caf::expected<user_erasure> delete_user(const std::string& user_id, int64_t deleted_ms,
                                          const erasure_answer& answer = {},
                                          bool keep_newer = false);
  // When the user was last deleted; none if never.
  caf::expected<std::optional<int64_t>> erased_at(const std::string& user_id);

  static bool is_allowed_transition(const std::string& from, const std::string& to);

 private:
  metadata_store() = default;
  struct impl;
  std::unique_ptr<impl> impl_;
};

// An adapter's safetensors bytes written to the artifact store under
// `artifact_dir` and registered ready for its user, as a finished onboarding
// leaves them: for the benches and tests that need adapters without
// training them. Its record.
caf::expected<messages::model_record> register_ready_adapter(
    metadata_store& db, const std::string& artifact_dir, const std::string& user_id,
    const std::string& model_id, const std::string& base_model, std::span<const std::byte> bytes);

}  // namespace tailor::storage
