#include "storage/metadata_store.hpp"

#include <rocksdb/cache.h>
#include <rocksdb/compaction_filter.h>
#include <rocksdb/db.h>
#include <rocksdb/filter_policy.h>
#include <rocksdb/listener.h>
#include <rocksdb/slice_transform.h>
#include <rocksdb/table.h>
#include <rocksdb/write_batch.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>

#include "storage/artifacts.hpp"

namespace tailor::storage {

namespace {

const std::vector<std::string> table_names = {"users",   "models",       "jobs",    "requests",
                                               "history", "job_requests", "erasures"};
enum table : std::size_t {
  users = 0,
  models,
  jobs,
  requests,
  history,
  job_requests,
  erasures,  // user id -> {"deleted_ms"}: the users deleted, and when
  table_count
};

// RocksDB's log lines, formatted and handed to store_options::log.
class forwarding_logger : public rocksdb::Logger {
 public:
  explicit forwarding_logger(std::function<void(store_log_level, const std::string&)> sink)
      : rocksdb::Logger(rocksdb::InfoLogLevel::INFO_LEVEL), sink_(std::move(sink)) {}

  void Logv(const char* format, va_list ap) override {
    Logv(rocksdb::InfoLogLevel::INFO_LEVEL, format, ap);
  }

  void Logv(const rocksdb::InfoLogLevel level, const char* format, va_list ap) override {
    if (level < GetInfoLogLevel()) return;
    va_list again;
    va_copy(again, ap);
    char buf[512];
    const int n = std::vsnprintf(buf, sizeof buf, format, ap);
    std::string line;
    if (n >= 0 && static_cast<std::size_t>(n) < sizeof buf) {
      line.assign(buf, static_cast<std::size_t>(n));
    } else if (n >= 0) {
      line.resize(static_cast<std::size_t>(n) + 1);
      std::vsnprintf(line.data(), line.size(), format, again);
      line.pop_back();
    }
    va_end(again);
    while (!line.empty() && line.back() == '\n') line.pop_back();  // some lines end in one
    // Its INFO (and HEADER) is every flush, compaction and option: debug here.
    const auto to = level == rocksdb::InfoLogLevel::ERROR_LEVEL ||
                            level == rocksdb::InfoLogLevel::FATAL_LEVEL
                        ? store_log_level::error
                    : level == rocksdb::InfoLogLevel::WARN_LEVEL ? store_log_level::warn
                                                                 : store_log_level::debug;
    sink_(to, line);
  }

 private:
  std::function<void(store_log_level, const std::string&)> sink_;
};

// A failed write leaves RocksDB read-only. Its own recovery from a full disk
// waits for room for a whole memtable (64 MB by default), and refuses a
// Resume() meanwhile; the store asks for one at its next write instead
// (impl::try_resume), so this turns RocksDB's off for that error. It also
// hears that RocksDB left the read-only state.
class recovery_listener : public rocksdb::EventListener {
 public:
  explicit recovery_listener(std::function<void()> recovered) : recovered_(std::move(recovered)) {}
  void OnErrorRecoveryBegin(rocksdb::BackgroundErrorReason, rocksdb::Status error,
                            bool* auto_recovery) override {
    if (error.IsNoSpace()) *auto_recovery = false;
  }
  void OnErrorRecoveryEnd(const rocksdb::BackgroundErrorRecoveryInfo& info) override {
    if (info.new_bg_error.ok()) recovered_();
  }

 private:
  std::function<void()> recovered_;
};

void log_to_stderr(store_log_level level, const std::string& line) {
  if (level != store_log_level::debug) std::fprintf(stderr, "rocksdb: %s\n", line.c_str());
}

// A job that will not run again: final, or run by another instance.
bool is_at_rest(const std::string& status) {
  return messages::is_final_job_status(status) || status == "moved";
}

caf::error io(const rocksdb::Status& s, const char* what) {
  return caf::make_error(s.IsNoSpace() ? errc::no_space : errc::io_error,
                         std::string(what) + ": " + s.ToString());
}

std::string request_key(const std::string& user_id, const std::string& request_id) {
  std::string k = user_id;
  k.push_back('\0');
  k += request_id;
  return k;
}

void put_be64(std::string& out, uint64_t v) {
  for (int i = 7; i >= 0; --i) out.push_back(static_cast<char>((v >> (i * 8)) & 0xff));
}

// A key's user part (`user \0`) in the requests and history tables.
class user_prefix : public rocksdb::SliceTransform {
 public:
  const char* Name() const override { return "tailor.user_prefix"; }
  rocksdb::Slice Transform(const rocksdb::Slice& key) const override {
    const auto* end = static_cast<const char*>(std::memchr(key.data(), '\0', key.size()));
    return {key.data(), static_cast<std::size_t>(end - key.data()) + 1};
  }
  bool InDomain(const rocksdb::Slice& key) const override {
    return std::memchr(key.data(), '\0', key.size()) != nullptr;
  }
};

// A history key's time (user \0 be64(time) be64(seq)); -1 if it has none.
int64_t history_time(std::string_view key) {
  const auto nul = key.find('\0');
  if (nul == std::string_view::npos || key.size() < nul + 1 + 16) return -1;
  uint64_t t = 0;
  for (std::size_t i = nul + 1; i < nul + 9; ++i) t = (t << 8) | static_cast<unsigned char>(key[i]);
  return static_cast<int64_t>(t);
}

// Drops what is past retention as RocksDB compacts a table: inference
// answers' records in the requests table (onboarding ones name jobs, which
// are kept) and history entries. Called from RocksDB's compaction threads:
// it keeps no state.
class expiry_filter : public rocksdb::CompactionFilter {
 public:
  expiry_filter(bool history, std::chrono::milliseconds retention)
      : history_(history), retention_ms_(retention.count()) {}
  const char* Name() const override {
    return history_ ? "tailor.history_expiry" : "tailor.requests_expiry";
  }
  bool Filter(int /*level*/, const rocksdb::Slice& key, const rocksdb::Slice& value,
              std::string* /*new_value*/, bool* /*value_changed*/) const override {
    const auto cutoff = messages::unix_ms() - retention_ms_;
    if (history_) {
      const auto t = history_time(key.ToStringView());
      return t >= 0 && t < cutoff;
    }
    request_record r;
    // One that does not parse is kept: reading it reports the corruption.
    return messages::from_json(value.ToStringView(), r) && r.kind == "inference" &&
           r.created_ms < cutoff;
  }

 private:
  bool history_;
  int64_t retention_ms_;
};

// A table's block-based format: its blocks in `cache` when one is shared
// (else RocksDB makes the table a cache of its own), whole-key Bloom filters
// if `filtered`.
std::shared_ptr<rocksdb::TableFactory> table_format(const std::shared_ptr<rocksdb::Cache>& cache,
                                                    bool filtered) {
  rocksdb::BlockBasedTableOptions t;
  if (cache) t.block_cache = cache;
  if (filtered) t.filter_policy.reset(rocksdb::NewBloomFilterPolicy(10));
  return std::shared_ptr<rocksdb::TableFactory>(rocksdb::NewBlockBasedTableFactory(t));
}

rocksdb::ColumnFamilyOptions plain_table(const std::shared_ptr<rocksdb::Cache>& cache) {
  rocksdb::ColumnFamilyOptions o;
  o.table_factory = table_format(cache, false);
  return o;
}

// The requests and history tables get a write per answer, for users in
// any order. A memtable insert searches the whole skip list unless it has a
// hint; one per user, where that user's last key went, makes it a short
// step (a user's keys come in about in order); a hint takes ~250 bytes per
// user written since the memtable's last flush. Each answer first looks up
// its request id, which is new: whole-key Bloom filters, in the memtable
// and in the table files, answer "absent" without a search. For users
// drawn from 1,000 the two took a third off an answer's store work
// (bm_answer_record/1000, median 21 against 30 us; docs/measurements.md).
rocksdb::ColumnFamilyOptions per_user_table(bool looked_up,
                                            const std::shared_ptr<rocksdb::Cache>& cache) {
  rocksdb::ColumnFamilyOptions o;
  o.memtable_insert_with_hint_prefix_extractor = std::make_shared<user_prefix>();
  if (looked_up) {
    o.memtable_prefix_bloom_size_ratio = 0.02;
    o.memtable_whole_key_filtering = true;
  }
  o.table_factory = table_format(cache, looked_up);
  return o;
}

}  // namespace

struct metadata_store::impl {
  rocksdb::DB* db = nullptr;
  std::vector<rocksdb::ColumnFamilyHandle*> cf;
  rocksdb::WriteOptions wopts;
  // Serializes read-modify-write sequences (transitions, model lists).
  std::mutex rmw;
  std::atomic<uint64_t> history_seq{0};
  std::chrono::milliseconds retention{0};
  std::unique_ptr<expiry_filter> requests_expiry, history_expiry;

  // Entries written before this are past retention (none when it is 0).
  int64_t expiry_cutoff() const {
    return retention.count() > 0 ? messages::unix_ms() - retention.count() : 0;
  }
  std::atomic<uint64_t> models_generation{0};
  bool shared_cache = false;  // one block cache for every table (store_options::memory_bytes)

  rocksdb::ColumnFamilyHandle* t(table x) { return cf[x]; }

  // history: user \0 be64(time) be64(seq), so that a user's entries are in
  // time order and two in the same millisecond do not collide.
  std::string history_key(const history_entry& entry);

  caf::error write(rocksdb::WriteBatch& batch, const char* what) {
    if (failing.load(std::memory_order_relaxed)) try_resume();
    auto s = db->Write(wopts, &batch);
    if (!s.ok()) {
      auto err = io(s, what);
      write_failed(err);
      return err;
    }
    if (failing.load(std::memory_order_relaxed)) writes_recovered();
    count_written(batch);
    return {};
  }

  // store_writes: `failing` keeps the hot path to one load while writes work.
  std::atomic<bool> failing{false};
  std::atomic<uint64_t> write_failures{0};
  mutable std::mutex writes_mtx;
  std::string failing_reason;
  int64_t failing_since_ms = 0;

  // A failed write leaves RocksDB read-only until asked to resume
  // (recovery_listener): at most once a second, from the next write or
  // the next look at writes().
  std::chrono::steady_clock::time_point last_resume{};
  void try_resume() {
    {
      std::lock_guard<std::mutex> guard(writes_mtx);
      const auto now = std::chrono::steady_clock::now();
      if (now - last_resume < std::chrono::seconds(1)) return;
      last_resume = now;
    }
    // Not ok: still no room, which the next write reports again.
    if (db->Resume().ok()) writes_recovered();
  }

  void write_failed(const caf::error& err) {
    ++write_failures;
    std::lock_guard<std::mutex> guard(writes_mtx);
    if (!failing.exchange(true)) failing_since_ms = messages::unix_ms();
    failing_reason = err.context().match_elements<std::string>()
                         ? err.context().get_as<std::string>(0)
                         : caf::to_string(err);
  }

  void writes_recovered() {
    std::lock_guard<std::mutex> guard(writes_mtx);
    failing = false;
    failing_reason.clear();
    failing_since_ms = 0;
  }

  // Keys and values written to each table since open (written_bytes()),
  // found by the column family ids a batch names.
  std::array<std::atomic<uint64_t>, table_count> written{};
  std::array<uint32_t, table_count> cf_ids{};

  // Attributes a batch's bytes to its tables: what a sign-up or an answer
  // costs the store, by table, is what grows its memtables, WAL and files.
  void count_written(const rocksdb::WriteBatch& batch) {
    struct counter : rocksdb::WriteBatch::Handler {
      impl* self;
      explicit counter(impl* s) : self(s) {}
      void add(uint32_t cf_id, std::size_t bytes) {
        for (std::size_t x = 0; x < table_count; ++x)
          if (self->cf_ids[x] == cf_id) self->written[x] += bytes;
      }
      rocksdb::Status PutCF(uint32_t cf_id, const rocksdb::Slice& key,
                            const rocksdb::Slice& value) override {
        add(cf_id, key.size() + value.size());
        return rocksdb::Status::OK();
      }
      rocksdb::Status DeleteCF(uint32_t cf_id, const rocksdb::Slice& key) override {
        add(cf_id, key.size());
        return rocksdb::Status::OK();
      }
    } c(this);
    // Counting cannot fail; a batch it did not understand would count less.
    (void)batch.Iterate(&c);
  }

  // Reads `key` from `tab` into `out`; not_found when absent.
  caf::error get(table tab, const std::string& key, std::string& out) {
    auto s = db->Get(rocksdb::ReadOptions(), t(tab), key, &out);
    if (s.IsNotFound())
      return caf::make_error(errc::not_found, table_names[tab] + " has no " + key);
    return s.ok() ? caf::error{} : io(s, "get");
  }

  // The ids of `user`'s models, newest first (an empty array for none).
  caf::expected<nlohmann::json> model_ids(const std::string& user) {
    std::string raw;
    auto err = get(users, user, raw);
    if (err == errc::not_found) return nlohmann::json::array();
    if (err) return err;
    auto ids = nlohmann::json::parse(raw, nullptr, false);
    if (!ids.is_array())
      return caf::make_error(errc::corrupt_record, "users/" + user + " does not parse");
    return ids;
  }

  // Writes a job's record without its request, which goes to job_requests
  // once, when given, and is deleted once the job is at rest: a transition
  // then rewrites a few hundred bytes, not the user's texts, and the texts
  // are not kept past the job that needed them.
  void put_job(rocksdb::WriteBatch& batch, job_record job) {
    if (is_at_rest(job.status))
      batch.Delete(t(job_requests), job.job_id);
    else if (!job.request.empty())
      batch.Put(t(job_requests), job.job_id, job.request);
    job.request.clear();
    batch.Put(t(jobs), job.job_id, messages::to_json(job));
  }

  // Fills in the request of a job that can still run (a record written
  // before job_requests existed holds it itself).
  caf::error add_request(job_record& job) {
    if (!job.request.empty() || is_at_rest(job.status)) return {};
    auto err = get(job_requests, job.job_id, job.request);
    return err == errc::not_found ? caf::error{} : err;
  }

  // When `user` was deleted; 0 if never.
  caf::expected<int64_t> erased_at(const std::string& user) {
    std::string raw;
    auto err = get(erasures, user, raw);
    if (err == errc::not_found) return int64_t{0};
    if (err) return err;
    auto j = nlohmann::json::parse(raw, nullptr, false);
    if (!j.is_object() || !j.contains("deleted_ms") || !j["deleted_ms"].is_number_integer())
      return caf::make_error(errc::corrupt_record, "erasures/" + user + " does not parse");
    return j["deleted_ms"].get<int64_t>();
  }

  // The job that `user`'s request record `r` names, if it is here and theirs.
  caf::expected<std::optional<job_record>> job_of(const std::string& user,
                                                  const request_record& r) {
    if (r.job_id.empty()) return std::optional<job_record>();  // answered: no job
    auto job = get_record<job_record>(jobs, r.job_id);
    if (!job && job.error() == errc::not_found) return std::optional<job_record>();
    if (!job) return job.error();
    if (job->user_id != user) return std::optional<job_record>();
    return std::optional<job_record>(std::move(*job));
  }

  // Calls `f` with each key and value of `user`'s part of `tab` (requests,
  // history).
  template <class F>
  caf::error for_each_of_user(table tab, const std::string& user, F f) {
    std::string prefix = user;
    prefix.push_back('\0');
    std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions(), t(tab)));
    for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next())
      if (auto err = f(it->key(), it->value())) return err;
    return it->status().ok() ? caf::error{} : io(it->status(), "scan user");
  }

  template <class Record>
  caf::expected<Record> get_record(table tab, const std::string& key) {
    std::string raw;
    if (auto err = get(tab, key, raw)) return err;
    Record r;
    if (!messages::from_json(raw, r))
      return caf::make_error(errc::corrupt_record,
                             table_names[tab] + "/" + key + " does not parse");
    return r;
  }
};

store_writes metadata_store::writes() {
  auto& im = *impl_;
  if (im.failing.load()) im.try_resume();
  store_writes w;
  w.failures = im.write_failures.load();
  std::lock_guard<std::mutex> guard(im.writes_mtx);
  w.failing = im.failing_reason;
  w.failing_since_ms = im.failing_since_ms;
  return w;
}

store_memory metadata_store::memory() const {
  store_memory m;
  auto sum = [&](const std::string& property, uint64_t& into) {
    for (auto* h : impl_->cf) {
      uint64_t v = 0;
      if (impl_->db->GetIntProperty(h, property, &v)) into += v;
    }
  };
  sum(rocksdb::DB::Properties::kCurSizeAllMemTables, m.memtables);
  sum(rocksdb::DB::Properties::kEstimateTableReadersMem, m.table_readers);
  if (impl_->shared_cache) {
    // A cache shared by every table reports its whole usage for each.
    uint64_t v = 0;
    if (!impl_->cf.empty() &&
        impl_->db->GetIntProperty(impl_->cf.front(), rocksdb::DB::Properties::kBlockCacheUsage,
                                  &v))
      m.block_cache = v;
  } else {
    sum(rocksdb::DB::Properties::kBlockCacheUsage, m.block_cache);
  }
  return m;
}

caf::error metadata_store::compact() {
  for (auto tab : {requests, history}) {
    rocksdb::CompactRangeOptions o;
    // The last level too: that is where old entries lie.
    o.bottommost_level_compaction = rocksdb::BottommostLevelCompaction::kForce;
    auto s = impl_->db->CompactRange(o, impl_->t(tab), nullptr, nullptr);
    if (!s.ok()) return io(s, ("compact " + table_names[tab]).c_str());
  }
  return {};
}

std::vector<std::pair<std::string, uint64_t>> metadata_store::written_bytes() const {
  std::vector<std::pair<std::string, uint64_t>> out;
  for (std::size_t x = 0; x < table_count; ++x)
    out.emplace_back(table_names[x], impl_->written[x].load());
  return out;
}

metadata_store::~metadata_store() {
  if (impl_ && impl_->db) {
    for (auto* h : impl_->cf) {
      auto s = impl_->db->DestroyColumnFamilyHandle(h);
      (void)s;  // closing: nothing left to report to
    }
    delete impl_->db;
  }
}

caf::expected<std::unique_ptr<metadata_store>> metadata_store::open(const std::string& path,
                                                                    store_options opts) {
  std::unique_ptr<metadata_store> store(new metadata_store);
  store->impl_ = std::make_unique<impl>();
  auto& im = *store->impl_;
  rocksdb::DBOptions dbo;
  dbo.create_if_missing = true;
  dbo.create_missing_column_families = true;
  dbo.keep_log_file_num = 4;
  // Concurrent memtable writes ignore insert hints; writers here are the
  // user actors' one thread and the store actor.
  dbo.allow_concurrent_memtable_write = false;
  dbo.listeners = opts.listeners;
  auto* writes = &im;
  dbo.listeners.push_back(
      std::make_shared<recovery_listener>([writes] { writes->writes_recovered(); }));
  dbo.info_log = std::make_shared<forwarding_logger>(opts.log ? opts.log : log_to_stderr);
  std::shared_ptr<rocksdb::Cache> cache;
  if (opts.memory_bytes > 0) {
    cache = rocksdb::NewLRUCache(opts.memory_bytes / 2);
    dbo.db_write_buffer_size = opts.memory_bytes / 2;
    im.shared_cache = true;
  }
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs;
  cfs.emplace_back(rocksdb::kDefaultColumnFamilyName, plain_table(cache));
  for (std::size_t i = 0; i < table_count; ++i)
    cfs.emplace_back(table_names[i], i == requests  ? per_user_table(true, cache)
                                     : i == history ? per_user_table(false, cache)
                                                    : plain_table(cache));
  if (opts.retention.count() > 0) {
    im.retention = opts.retention;
    im.requests_expiry = std::make_unique<expiry_filter>(false, opts.retention);
    im.history_expiry = std::make_unique<expiry_filter>(true, opts.retention);
    // Every table file is compacted again at least this often, so that old
    // entries go even where nothing new is written over them.
    const auto every = std::clamp<uint64_t>(
        static_cast<uint64_t>(opts.retention.count() / 1000 / 10), 3600, 86400);
    for (auto [tab, filter] : {std::pair{requests, im.requests_expiry.get()},
                               std::pair{history, im.history_expiry.get()}}) {
      auto& o = cfs[tab + 1].options;  // [0] is the default family
      o.compaction_filter = filter;
      o.periodic_compaction_seconds = every;
    }
  }
  // Made here: RocksDB logs a missing directory as an error before it makes it.
  std::error_code ec;
  if (std::filesystem::create_directories(path, ec); ec)
    return caf::make_error(errc::io_error, "create " + path + ": " + ec.message());
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  auto s = rocksdb::DB::Open(dbo, path, cfs, &handles, &im.db);
  if (!s.ok()) return io(s, ("open " + path).c_str());
  // handles[0] is the default family; ours follow in table order.
  im.cf.assign(handles.begin() + 1, handles.end());
  for (std::size_t x = 0; x < table_count; ++x) im.cf_ids[x] = im.cf[x]->GetID();
  auto ds = im.db->DestroyColumnFamilyHandle(handles[0]);
  if (!ds.ok()) return io(ds, "release default column family");
  im.wopts.sync = opts.sync_writes;
  im.history_seq = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                             std::chrono::system_clock::now().time_since_epoch())
                                             .count());
  return store;
}

bool metadata_store::is_allowed_transition(const std::string& from, const std::string& to) {
  static const std::vector<std::pair<std::string, std::vector<std::string>>> edges = {
      {"queued", {"admitted", "failed", "cancelled"}},
      {"admitted", {"training", "retrying", "failed", "cancelled", "queued"}},
      {"training", {"saving", "retrying", "failed", "cancelled", "admitted"}},
      {"saving", {"ready", "retrying", "failed", "admitted"}},
      {"retrying", {"queued", "admitted", "failed", "cancelled"}},
  };
  for (const auto& [f, tos] : edges)
    if (f == from)
      for (const auto& t : tos)
        if (t == to) return true;
  return false;
}

caf::error metadata_store::create_job(const job_record& job, const request_record& req) {
  auto& im = *impl_;
  std::lock_guard<std::mutex> guard(im.rmw);
  std::string existing;
  auto err = im.get(jobs, job.job_id, existing);
  if (!err) return caf::make_error(errc::already_exists, "job " + job.job_id + " exists");
  if (err != errc::not_found) return err;
  rocksdb::WriteBatch batch;
  im.put_job(batch, job);
  batch.Put(im.t(requests), request_key(req.user_id, req.request_id), messages::to_json(req));
  return im.write(batch, "create job");
}

caf::expected<job_record> metadata_store::get_job(const std::string& job_id) {
  auto job = impl_->get_record<job_record>(jobs, job_id);
  if (job)
    if (auto err = impl_->add_request(*job)) return err;
  return job;
}

caf::expected<job_record> metadata_store::transition_job(const std::string& job_id,
                                                         const std::string& from,
                                                         const std::string& to,
                                                         const job_record* update) {
  auto& im = *impl_;
  std::lock_guard<std::mutex> guard(im.rmw);
  auto job = im.get_record<job_record>(jobs, job_id);
  if (!job) return job.error();
  if (job->status != from)
    return caf::make_error(errc::invalid_transition,
                           "job " + job_id + " is " + job->status + ", not " + from);
  if (!is_allowed_transition(from, to))
    return caf::make_error(errc::invalid_transition,
                           "job " + job_id + ": " + from + " -> " + to +
                               " is not a transition of the job state machine");
  job->status = to;
  job->updated_ms = messages::unix_ms();
  if (update) {
    if (!update->error_code.empty()) job->error_code = update->error_code;
    if (!update->error_message.empty()) job->error_message = update->error_message;
    if (!update->model_id.empty()) job->model_id = update->model_id;
    job->attempts = std::max(job->attempts, update->attempts);
  }
  rocksdb::WriteBatch batch;
  im.put_job(batch, *job);
  if (auto err = im.write(batch, "transition job")) return err;
  job->request.clear();  // as put: the caller has it
  return job;
}

caf::expected<std::vector<job_record>> metadata_store::list_jobs(const std::string& status,
                                                                 std::size_t limit) {
  auto& im = *impl_;
  std::vector<job_record> out;
  std::unique_ptr<rocksdb::Iterator> it(im.db->NewIterator(rocksdb::ReadOptions(), im.t(jobs)));
  for (it->SeekToFirst(); it->Valid() && out.size() < limit; it->Next()) {
    job_record r;
    if (!messages::from_json(it->value().ToStringView(), r))
      return caf::make_error(errc::corrupt_record,
                             "jobs/" + it->key().ToString() + " does not parse");
    if (status.empty() || r.status == status) out.push_back(std::move(r));
  }
  if (!it->status().ok()) return io(it->status(), "list jobs");
  return out;
}

caf::error metadata_store::register_model(const model_record& model, const std::string& job_id,
                                          const std::vector<messages::outgoing_message>& outcome) {
  auto& im = *impl_;
  std::lock_guard<std::mutex> guard(im.rmw);
  auto found = im.model_ids(model.user_id);
  if (!found) return found.error();
  auto& ids = *found;
  const bool listed = std::find(ids.begin(), ids.end(), model.model_id) != ids.end();
  if (listed && job_id.empty())
    return caf::make_error(errc::already_exists, "model " + model.model_id + " exists");
  rocksdb::WriteBatch batch;
  if (!listed) {
    ids.insert(ids.begin(), model.model_id);
    batch.Put(im.t(users), model.user_id, ids.dump());
  }
  batch.Put(im.t(models), model.model_id, messages::to_json(model));
  if (!job_id.empty()) {
    auto job = im.get_record<job_record>(jobs, job_id);
    if (!job) return job.error();
    if (job->status != "saving")
      return caf::make_error(errc::invalid_transition,
                             "job " + job_id + " is " + job->status + ", not saving");
    job->status = "ready";
    job->model_id = model.model_id;
    job->updated_ms = model.created_ms;
    job->outcome = outcome;
    im.put_job(batch, *job);
  }
  if (auto err = im.write(batch, "register model")) return err;
  // After the write: a reader that saw the old value re-reads the models.
  im.models_generation.fetch_add(1, std::memory_order_release);
  return {};
}

caf::expected<bool> metadata_store::import_model(const model_record& model,
                                                 const request_record* made_by) {
  auto& im = *impl_;
  std::lock_guard<std::mutex> guard(im.rmw);
  std::string raw;
  auto known = im.get(models, model.model_id, raw);
  if (!known) return false;
  if (known != errc::not_found) return known;
  // Deleted after it was made: a record read late (another partition, or
  // before its tombstone) does not bring the model back.
  auto erased = im.erased_at(model.user_id);
  if (!erased) return erased.error();
  if (*erased > 0 && model.created_ms <= *erased) return false;
  auto found = im.model_ids(model.user_id);
  if (!found) return found.error();
  auto& ids = *found;
  // Records of different partitions arrive in any order: the list stays
  // newest first by creation time, as "the user's newest model" reads it.
  auto at = ids.begin();
  for (; at != ids.end(); ++at) {
    if (!at->is_string()) continue;
    auto listed = im.get_record<model_record>(models, at->get<std::string>());
    if (!listed) return listed.error();
    if (listed->created_ms <= model.created_ms) break;
  }
  ids.insert(at, model.model_id);
  rocksdb::WriteBatch batch;
  batch.Put(im.t(users), model.user_id, ids.dump());
  batch.Put(im.t(models), model.model_id, messages::to_json(model));
  if (made_by) {
    const auto key = request_key(made_by->user_id, made_by->request_id);
    auto known = im.get(requests, key, raw);
    if (known == errc::not_found)
      batch.Put(im.t(requests), key, messages::to_json(*made_by));
    else if (known)
      return known;
  }
  if (auto err = im.write(batch, "import model")) return err;
  im.models_generation.fetch_add(1, std::memory_order_release);
  return true;
}

caf::expected<bool> metadata_store::import_job(const job_record& job,
                                               const request_record& made_by) {
  auto& im = *impl_;
  std::lock_guard<std::mutex> guard(im.rmw);
  // A job this instance handed over comes back to it like a new one.
  auto here = im.get_record<job_record>(jobs, job.job_id);
  if (here && here->status != "moved") return false;
  if (!here && here.error() != errc::not_found) return here.error();
  auto erased = im.erased_at(job.user_id);
  if (!erased) return erased.error();
  if (*erased > 0 && job.created_ms <= *erased) return false;
  rocksdb::WriteBatch batch;
  im.put_job(batch, job);
  std::string raw;
  const auto key = request_key(made_by.user_id, made_by.request_id);
  if (auto found = im.get(requests, key, raw); found == errc::not_found)
    batch.Put(im.t(requests), key, messages::to_json(made_by));
  else if (found)
    return found;
  if (auto err = im.write(batch, "import job")) return err;
  return true;
}

caf::expected<bool> metadata_store::hand_over_job(const std::string& job_id,
                                                  const std::string& owner) {
  auto& im = *impl_;
  std::lock_guard<std::mutex> guard(im.rmw);
  auto job = im.get_record<job_record>(jobs, job_id);
  if (!job) return job.error() == errc::not_found ? caf::expected<bool>(false) : job.error();
  if (is_at_rest(job->status)) return false;
  job->status = job->announced = "moved";
  job->error_message = "taken over by instance " + owner;
  job->updated_ms = messages::unix_ms();
  rocksdb::WriteBatch batch;
  im.put_job(batch, *job);
  if (auto err = im.write(batch, "hand over job")) return err;
  return true;
}

uint64_t metadata_store::models_generation() const {
  return impl_->models_generation.load(std::memory_order_acquire);
}

caf::error metadata_store::mark_announced(const std::string& job_id, const std::string& status) {
  auto& im = *impl_;
  std::lock_guard<std::mutex> guard(im.rmw);
  auto job = im.get_record<job_record>(jobs, job_id);
  if (!job) return job.error();
  // A late confirmation of an earlier status must not hide a newer one.
  if (job->status != status) return {};
  job->announced = status;
  rocksdb::WriteBatch batch;
  im.put_job(batch, *job);
  return im.write(batch, "mark job announced");
}

caf::expected<std::vector<job_record>> metadata_store::unfinished_jobs() {
  auto all = list_jobs("", std::numeric_limits<std::size_t>::max());
  if (!all) return all.error();
  std::vector<job_record> out;
  for (auto& j : *all) {
    if (is_at_rest(j.status) && j.announced == j.status) continue;
    if (auto err = impl_->add_request(j)) return err;  // to run it
    out.push_back(std::move(j));
  }
  return out;
}

caf::expected<model_record> metadata_store::get_model(const std::string& model_id) {
  return impl_->get_record<model_record>(models, model_id);
}

caf::expected<std::vector<model_record>> metadata_store::list_models(const std::string& user_id) {
  auto& im = *impl_;
  std::vector<model_record> out;
  auto ids = im.model_ids(user_id);
  if (!ids) return ids.error();
  for (const auto& id : *ids) {
    if (!id.is_string())
      return caf::make_error(errc::corrupt_record, "users/" + user_id + " holds a non-string");
    auto m = im.get_record<model_record>(models, id.get<std::string>());
    if (!m) return m.error();
    out.push_back(std::move(*m));
  }
  return out;
}

caf::error metadata_store::for_each_model(const std::function<void(const model_record&)>& f) {
  auto& im = *impl_;
  std::unique_ptr<rocksdb::Iterator> it(im.db->NewIterator(rocksdb::ReadOptions(), im.t(models)));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    model_record m;
    if (!messages::from_json(it->value().ToStringView(), m))
      return caf::make_error(errc::corrupt_record,
                             "models/" + it->key().ToString() + " does not parse");
    f(m);
  }
  if (!it->status().ok()) return io(it->status(), "list models");
  return {};
}

caf::expected<std::optional<request_record>> metadata_store::find_request(
    const std::string& user_id, const std::string& request_id) {
  auto r = impl_->get_record<request_record>(requests, request_key(user_id, request_id));
  if (r) return std::optional<request_record>(std::move(*r));
  if (r.error() == errc::not_found) return std::optional<request_record>();
  return r.error();
}

std::string metadata_store::impl::history_key(const history_entry& entry) {
  std::string key = entry.user_id;
  key.push_back('\0');
  put_be64(key, static_cast<uint64_t>(entry.time_ms));
  put_be64(key, history_seq.fetch_add(1));
  return key;
}

caf::error metadata_store::put_request(const request_record& req, const history_entry* entry) {
  auto& im = *impl_;
  rocksdb::WriteBatch batch;
  batch.Put(im.t(requests), request_key(req.user_id, req.request_id), messages::to_json(req));
  if (entry) batch.Put(im.t(history), im.history_key(*entry), messages::to_json(*entry));
  return im.write(batch, entry ? "put request and history" : "put request");
}

caf::error metadata_store::append_history(const history_entry& entry) {
  auto& im = *impl_;
  rocksdb::WriteBatch batch;
  batch.Put(im.t(history), im.history_key(entry), messages::to_json(entry));
  return im.write(batch, "append history");
}

caf::expected<history_page> metadata_store::page_history(const std::string& user_id,
                                                         const std::string& after,
                                                         std::size_t limit) {
  auto& im = *impl_;
  std::string prefix = user_id;
  prefix.push_back('\0');
  history_page page;
  std::unique_ptr<rocksdb::Iterator> it(im.db->NewIterator(rocksdb::ReadOptions(), im.t(history)));
  if (after.empty()) {
    it->Seek(prefix);
  } else {
    it->Seek(after);
    if (it->Valid() && it->key().ToStringView() == after) it->Next();
  }
  std::string last;
  const auto cutoff = im.expiry_cutoff();
  for (; it->Valid() && it->key().starts_with(prefix); it->Next()) {
    if (page.entries.size() == limit) {
      page.next = last;
      break;
    }
    // Past retention, not compacted away yet: as good as gone.
    const auto t = history_time(it->key().ToStringView());
    if (cutoff > 0 && t >= 0 && t < cutoff) {
      last = it->key().ToString();
      continue;
    }
    history_entry e;
    if (!messages::from_json(it->value().ToStringView(), e))
      return caf::make_error(errc::corrupt_record,
                             "history entry of " + user_id + " does not parse");
    if (e.output.empty()) {
      // Stored once, in the request's record (put_request).
      auto rec = im.get_record<request_record>(requests, request_key(e.user_id, e.request_id));
      if (!rec && rec.error() != errc::not_found) return rec.error();
      // Its record, stamped a moment before it, may just have expired.
      constexpr int64_t stamp_skew_ms = 60 * 1000;
      if (!rec && cutoff > 0 && t < cutoff + stamp_skew_ms) {
        last = it->key().ToString();
        continue;
      }
      if (!rec || rec->answers.empty())
        return caf::make_error(errc::corrupt_record,
                               "history entry of " + user_id + " for request " + e.request_id +
                                   ": its answer is kept in the request's record, which " +
                                   (rec ? "has no answer" : "is missing"));
      e.output = std::move(rec->answers.front().payload);
    }
    page.entries.push_back(std::move(e));
    last = it->key().ToString();
  }
  if (!it->status().ok()) return io(it->status(), "page history");
  return page;
}

caf::expected<std::vector<job_record>> metadata_store::jobs_of(const std::string& user_id) {
  auto& im = *impl_;
  std::vector<job_record> out;
  auto err = im.for_each_of_user(requests, user_id, [&](const auto&, const auto& value) {
    request_record r;
    if (!messages::from_json(value.ToStringView(), r))
      return caf::make_error(errc::corrupt_record,
                             "requests/" + user_id + " has a record that does not parse");
    auto job = im.job_of(user_id, r);
    if (!job) return job.error();
    if (*job) out.push_back(std::move(**job));
    return caf::error{};
  });
  if (err) return err;
  return out;
}

caf::expected<user_erasure> metadata_store::delete_user(const std::string& user_id,
                                                        int64_t deleted_ms,
                                                        const erasure_answer& answer,
                                                        bool keep_newer) {
  auto& im = *impl_;
  std::lock_guard<std::mutex> guard(im.rmw);
  user_erasure out;
  if (keep_newer) {
    auto at = im.erased_at(user_id);
    if (!at) return at.error();
    if (*at >= deleted_ms) return out;
  }
  auto goes = [&](int64_t made_ms) { return !keep_newer || made_ms <= deleted_ms; };
  rocksdb::WriteBatch batch;
  auto ids = im.model_ids(user_id);
  if (!ids) return ids.error();
  auto kept = nlohmann::json::array();
  for (const auto& id : *ids) {
    if (!id.is_string())
      return caf::make_error(errc::corrupt_record, "users/" + user_id + " holds a non-string");
    auto m = im.get_record<model_record>(models, id.get<std::string>());
    if (!m && m.error() != errc::not_found) return m.error();
    if (m && !goes(m->created_ms)) {
      kept.push_back(id);
      continue;
    }
    batch.Delete(im.t(models), id.get<std::string>());
    if (m) out.models.push_back(std::move(*m));
  }
  if (kept.empty())
    batch.Delete(im.t(users), user_id);
  else
    batch.Put(im.t(users), user_id, kept.dump());
  auto err = im.for_each_of_user(requests, user_id, [&](const auto& key, const auto& value) {
    request_record r;
    // One that does not parse goes too: it is the user's all the same.
    const bool parsed = messages::from_json(value.ToStringView(), r);
    if (parsed && !goes(r.created_ms)) return caf::error{};
    if (parsed) {
      auto job = im.job_of(user_id, r);
      if (!job) return job.error();
      if (*job) {
        batch.Delete(im.t(jobs), r.job_id);
        batch.Delete(im.t(job_requests), r.job_id);
        out.job_ids.push_back(r.job_id);
      }
    }
    // Key by key, not DeleteRange: a range tombstone in a table with
    // memtable insert hints (per_user_table) broke RocksDB's skip list
    // (an assertion in InlineSkipList::Insert, 2026-12-05).
    batch.Delete(im.t(requests), key);
    ++out.requests;
    return caf::error{};
  });
  if (err) return err;
  err = im.for_each_of_user(history, user_id, [&](const auto& key, const auto&) {
    if (!goes(history_time(key.ToStringView()))) return caf::error{};
    batch.Delete(im.t(history), key);
    ++out.history;
    return caf::error{};
  });
  if (err) return err;
  batch.Put(im.t(erasures), user_id, nlohmann::json{{"deleted_ms", deleted_ms}}.dump());
  if (answer) {
    const auto rec = answer(out);
    batch.Put(im.t(requests), request_key(rec.user_id, rec.request_id), messages::to_json(rec));
  }
  if (auto werr = im.write(batch, "delete user")) return werr;
  im.models_generation.fetch_add(1, std::memory_order_release);
  return out;
}

caf::expected<std::optional<int64_t>> metadata_store::erased_at(const std::string& user_id) {
  auto at = impl_->erased_at(user_id);
  if (!at) return at.error();
  return *at > 0 ? std::optional<int64_t>(*at) : std::nullopt;
}

caf::expected<messages::model_record> register_ready_adapter(
    metadata_store& db, const std::string& artifact_dir, const std::string& user_id,
    const std::string& model_id, const std::string& base_model, std::span<const std::byte> bytes) {
  auto stored = store_adapter(artifact_dir, user_id, model_id, bytes);
  if (!stored) return stored.error();
  messages::model_record m;
  m.model_id = model_id;
  m.user_id = user_id;
  m.base_model = base_model;
  m.artifact_path = stored->path;
  m.checksum = stored->checksum;
  m.status = "ready";
  m.created_ms = messages::unix_ms();
  if (auto err = db.register_model(m)) return err;
  return m;
}

}  // namespace tailor::storage
