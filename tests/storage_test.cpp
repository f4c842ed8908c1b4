// Unit tests of storage/: every operation of the metadata store on a real
// RocksDB in a temporary directory, atomicity of multi-table writes, and
// durability across reopen and a killed process.
#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <rocksdb/listener.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>

#include "storage/artifacts.hpp"
#include "storage/metadata_store.hpp"
#include "temp_dir.hpp"

using namespace tailor::storage;
namespace fs = std::filesystem;
using tailor::messages::channel;

namespace {

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("tailor-store-" + std::to_string(::getpid()) + "-" +
                                        std::to_string(std::random_device{}()));
    reopen();
  }
  void TearDown() override {
    store_.reset();
    fs::remove_all(dir_);
  }
  void reopen() {
    store_.reset();
    auto s = metadata_store::open(dir_.string());
    ASSERT_TRUE(s) << caf::to_string(s.error());
    store_ = std::move(*s);
  }
  static job_record job(const std::string& id, const std::string& user = "u1") {
    job_record j;
    j.job_id = id;
    j.request_id = "r-" + id;
    j.user_id = user;
    j.base_model = "tiny";
    j.status = "queued";
    j.request = "{}";
    j.created_ms = j.updated_ms = 1000;
    return j;
  }
  static request_record request(const std::string& user, const std::string& req,
                                uint64_t hash = 1) {
    return request_record{
        user, req, "onboarding", hash, "", {{channel::events, user, "{}"}}, 1000, ""};
  }
  static model_record model(const std::string& id, const std::string& user, int64_t t) {
    return model_record{id, user, "tiny", "/a/" + id, "abc", "ready", t, ""};
  }

  fs::path dir_;
  std::unique_ptr<metadata_store> store_;
};

// The store's RocksDB opened as it is, every table: for what the store's
// API does not show (what a table holds), and for records of an older
// format. Open it only while no metadata_store has the directory open.
class raw_store {
 public:
  explicit raw_store(const std::string& path) {
    std::vector<std::string> names;
    auto s = rocksdb::DB::ListColumnFamilies(rocksdb::DBOptions(), path, &names);
    EXPECT_TRUE(s.ok()) << s.ToString();
    std::vector<rocksdb::ColumnFamilyDescriptor> cfs;
    for (const auto& n : names) cfs.emplace_back(n, rocksdb::ColumnFamilyOptions());
    std::vector<rocksdb::ColumnFamilyHandle*> handles;
    s = rocksdb::DB::Open(rocksdb::DBOptions(), path, cfs, &handles, &db_);
    EXPECT_TRUE(s.ok()) << s.ToString();
    for (std::size_t i = 0; i < handles.size(); ++i) tables_[names[i]] = handles[i];
  }
  ~raw_store() {
    for (auto& [name, h] : tables_) (void)db_->DestroyColumnFamilyHandle(h);
    delete db_;
  }
  // The value under `key` in `table`; empty when absent (or no such table).
  std::optional<std::string> get(const std::string& table, const std::string& key) {
    std::string v;
    if (!db_ || !tables_.count(table) ||
        !db_->Get(rocksdb::ReadOptions(), tables_[table], key, &v).ok())
      return std::nullopt;
    return v;
  }
  // Keys of `table` that begin with `prefix`.
  std::size_t count_from(const std::string& table, const std::string& prefix) {
    if (!db_ || !tables_.count(table)) return 0;
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), tables_[table]));
    std::size_t n = 0;
    for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) ++n;
    return n;
  }
  bool put(const std::string& table, const std::string& key, const std::string& value) {
    return db_ && tables_.count(table) &&
           db_->Put(rocksdb::WriteOptions(), tables_[table], key, value).ok();
  }

 private:
  rocksdb::DB* db_ = nullptr;
  std::map<std::string, rocksdb::ColumnFamilyHandle*> tables_;
};

}  // namespace

TEST_F(StoreTest, CreateAndGetJobRecordsItsRequest) {
  auto rq = request("u1", "r-j1", 77);
  rq.job_id = "j1";
  ASSERT_FALSE(store_->create_job(job("j1"), rq));
  auto j = store_->get_job("j1");
  ASSERT_TRUE(j);
  EXPECT_EQ(j->status, "queued");
  EXPECT_EQ(j->user_id, "u1");
  auto r = store_->find_request("u1", "r-j1");
  ASSERT_TRUE(r);
  ASSERT_TRUE(r->has_value());
  EXPECT_EQ((*r)->payload_hash, 77u);
  EXPECT_EQ((*r)->job_id, "j1");
  EXPECT_EQ(store_->get_job("nope").error(), errc::not_found);
}

TEST_F(StoreTest, CreatingAnExistingJobWritesNothing) {
  ASSERT_FALSE(store_->create_job(job("j1"), request("u1", "a")));
  auto err = store_->create_job(job("j1"), request("u1", "b"));
  EXPECT_EQ(err, errc::already_exists);
  auto r = store_->find_request("u1", "b");
  ASSERT_TRUE(r);
  EXPECT_FALSE(r->has_value()) << "the request of a refused job must not be recorded";
}

TEST_F(StoreTest, TransitionsFollowTheStateMachine) {
  ASSERT_FALSE(store_->create_job(job("j1"), request("u1", "a")));
  auto t = store_->transition_job("j1", "queued", "admitted");
  ASSERT_TRUE(t);
  EXPECT_EQ(t->status, "admitted");
  // From a state the job is not in: refused, nothing changes.
  auto bad = store_->transition_job("j1", "queued", "admitted");
  EXPECT_EQ(bad.error(), errc::invalid_transition);
  // An edge the machine does not have.
  EXPECT_EQ(store_->transition_job("j1", "admitted", "ready").error(), errc::invalid_transition);
  EXPECT_EQ(store_->get_job("j1")->status, "admitted");
  job_record upd;
  upd.error_code = "internal";
  upd.error_message = "boom";
  upd.attempts = 2;
  auto f = store_->transition_job("j1", "admitted", "failed", &upd);
  ASSERT_TRUE(f);
  EXPECT_EQ(f->error_code, "internal");
  EXPECT_EQ(f->attempts, 2);
  // Terminal states have no way out.
  EXPECT_EQ(store_->transition_job("j1", "failed", "queued").error(), errc::invalid_transition);
  EXPECT_EQ(store_->transition_job("none", "queued", "admitted").error(), errc::not_found);
  EXPECT_TRUE(metadata_store::is_allowed_transition("saving", "ready"));
  EXPECT_FALSE(metadata_store::is_allowed_transition("ready", "saving"));
  EXPECT_FALSE(metadata_store::is_allowed_transition("cancelled", "queued"));
}

TEST_F(StoreTest, ListJobsFiltersByStatus) {
  for (int i = 0; i < 5; ++i)
    ASSERT_FALSE(
        store_->create_job(job("j" + std::to_string(i)), request("u1", "r" + std::to_string(i))));
  ASSERT_TRUE(store_->transition_job("j2", "queued", "admitted"));
  EXPECT_EQ(store_->list_jobs("", 100)->size(), 5u);
  EXPECT_EQ(store_->list_jobs("", 3)->size(), 3u);
  auto admitted = store_->list_jobs("admitted", 100);
  ASSERT_EQ(admitted->size(), 1u);
  EXPECT_EQ((*admitted)[0].job_id, "j2");
}

// A job's request (the user's texts, up to 512 KiB) is written once, not
// with each of the job's writes, and deleted when the job ends; what runs
// the job still reads it.
TEST_F(StoreTest, AJobsRequestIsWrittenOnceAndDeletedWhenTheJobEnds) {
  auto written = [&](const std::string& table) {
    for (const auto& [name, bytes] : store_->written_bytes())
      if (name == table) return bytes;
    ADD_FAILURE() << "no table " << table;
    return uint64_t{0};
  };
  auto big = job("j1");
  big.request = R"({"texts":[")" + std::string(100000, 'x') + R"("]})";
  ASSERT_FALSE(store_->create_job(big, request("u1", "r-j1")));
  EXPECT_GE(written("job_requests"), 100000u);
  const auto record_bytes = written("jobs");
  EXPECT_LT(record_bytes, 1000u) << "the record holds the texts";
  for (auto [from, to] :
       {std::pair{"queued", "admitted"}, {"admitted", "training"}, {"training", "saving"}}) {
    auto moved = store_->transition_job("j1", from, to);
    ASSERT_TRUE(moved);
    EXPECT_TRUE(moved->request.empty());
  }
  EXPECT_LT(written("jobs"), 4 * record_bytes + 400) << "a transition wrote the texts";
  EXPECT_LT(written("job_requests"), 100100u) << "the texts were written again";
  // What runs the job reads them; a listing does not.
  EXPECT_EQ(store_->get_job("j1")->request, big.request);
  auto unfinished = store_->unfinished_jobs();
  ASSERT_TRUE(unfinished && unfinished->size() == 1u);
  EXPECT_EQ((*unfinished)[0].request, big.request);
  EXPECT_TRUE((*store_->list_jobs("", 10))[0].request.empty());
  ASSERT_FALSE(store_->register_model(model("m1", "u1", 5), "j1"));
  EXPECT_TRUE(store_->get_job("j1")->request.empty());
  store_.reset();
  {
    raw_store raw(dir_.string());
    EXPECT_FALSE(raw.get("job_requests", "j1")) << "the texts of an ended job are kept";
    EXPECT_TRUE(raw.get("jobs", "j1"));
  }
  reopen();
  EXPECT_EQ(store_->get_job("j1")->status, "ready");
}

// A record written before requests were kept apart holds its request: it
// still gives it, and its next write moves it out.
TEST_F(StoreTest, AJobRecordThatHoldsItsRequestStillGivesIt) {
  ASSERT_FALSE(store_->create_job(job("old"), request("u1", "r-old")));
  store_.reset();
  auto inside = job("old");
  inside.request = R"({"texts":["written by an older tailord"]})";
  {
    raw_store raw(dir_.string());
    ASSERT_TRUE(raw.put("jobs", "old", tailor::messages::to_json(inside)));
    ASSERT_TRUE(raw.put("job_requests", "old", "{}"));  // not read: the record has one
  }
  reopen();
  EXPECT_EQ(store_->get_job("old")->request, inside.request);
  ASSERT_TRUE(store_->transition_job("old", "queued", "admitted"));
  EXPECT_EQ(store_->get_job("old")->request, inside.request);
  store_.reset();
  raw_store raw(dir_.string());
  EXPECT_EQ(raw.get("job_requests", "old"), inside.request);
  job_record now;
  ASSERT_TRUE(tailor::messages::from_json(*raw.get("jobs", "old"), now));
  EXPECT_TRUE(now.request.empty());
}

TEST_F(StoreTest, ModelsAreListedNewestFirstPerUser) {
  ASSERT_FALSE(store_->register_model(model("m1", "u1", 1)));
  ASSERT_FALSE(store_->register_model(model("m2", "u1", 2)));
  ASSERT_FALSE(store_->register_model(model("m3", "u2", 3)));
  auto u1 = store_->list_models("u1");
  ASSERT_TRUE(u1);
  ASSERT_EQ(u1->size(), 2u);
  EXPECT_EQ((*u1)[0].model_id, "m2");
  EXPECT_EQ((*u1)[1].model_id, "m1");
  EXPECT_EQ(store_->list_models("u2")->size(), 1u);
  EXPECT_TRUE(store_->list_models("nobody")->empty());
  EXPECT_EQ(store_->get_model("m3")->user_id, "u2");
  EXPECT_EQ(store_->register_model(model("m1", "u1", 4)), errc::already_exists);
}

// What benches and tests use for adapters they do not train: the bytes
// where the artifact store keeps the user's adapter, under their checksum,
// and the model ready for the user.
TEST_F(StoreTest, ARegisteredReadyAdapterIsOnDiskUnderItsChecksumAndListed) {
  const std::vector<std::byte> bytes(100, std::byte{42});
  const auto dir = (dir_ / "artifacts").string();
  auto m = register_ready_adapter(*store_, dir, "u1", "m1", "tailor-base", bytes);
  ASSERT_TRUE(m) << caf::to_string(m.error());
  EXPECT_EQ(m->artifact_path, adapter_artifact_path(dir, "u1", "m1"));
  EXPECT_EQ(read_file(m->artifact_path, m->checksum).value(), bytes);
  auto listed = store_->list_models("u1");
  ASSERT_TRUE(listed);
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ(listed->front().status, "ready");
  EXPECT_EQ(listed->front().checksum, checksum_of(bytes));
  EXPECT_EQ(listed->front().base_model, "tailor-base");
}

// An artifact store that cannot be written (here a file where its
// directory should be) is an error, not an adapter silently missing.
// Every user's adapters are in a folder of their own below adapters/, even
// for the ids "." and "..", which are valid and would name another folder.
TEST(Artifacts, EveryUsersAdaptersAreInAFolderOfTheirOwn) {
  const std::string root = "/store";
  for (const std::string user : {"u1", ".", "..", "..."}) {
    const fs::path p = adapter_artifact_path(root, user, "model-1");
    const auto rel = p.lexically_normal().lexically_relative(root + "/adapters");
    ASSERT_EQ(std::distance(rel.begin(), rel.end()), 2) << user << ": " << p;
    EXPECT_NE(rel.begin()->string(), "..") << user;
    EXPECT_NE(rel.begin()->string(), ".") << user;
    EXPECT_EQ(rel.filename(), "model-1.safetensors") << user;
  }
  EXPECT_NE(adapter_artifact_path(root, ".", "m"), adapter_artifact_path(root, "..", "m"));
}

TEST_F(StoreTest, AnAdapterThatCannotBeStoredIsAnError) {
  const auto blocker = (dir_ / "not-a-directory").string();
  std::ofstream(blocker) << "x";
  const std::vector<std::byte> bytes(10, std::byte{1});
  auto stored = store_adapter(blocker, "u1", "m1", bytes);
  ASSERT_FALSE(stored);
  EXPECT_EQ(stored.error(), errc::io_error);
  EXPECT_FALSE(register_ready_adapter(*store_, blocker, "u1", "m1", "tailor-base", bytes));
  EXPECT_TRUE(store_->list_models("u1")->empty()) << "nothing registered without its bytes";
}

TEST_F(StoreTest, RegisteringAModelFinishesItsJobAtomically) {
  ASSERT_FALSE(store_->create_job(job("j1"), request("u1", "a")));
  // The job is not in `saving`: the whole batch is refused, no table changes.
  EXPECT_EQ(store_->register_model(model("m1", "u1", 5), "j1"), errc::invalid_transition);
  EXPECT_TRUE(store_->list_models("u1")->empty());
  EXPECT_EQ(store_->get_model("m1").error(), errc::not_found);
  ASSERT_TRUE(store_->transition_job("j1", "queued", "admitted"));
  ASSERT_TRUE(store_->transition_job("j1", "admitted", "training"));
  ASSERT_TRUE(store_->transition_job("j1", "training", "saving"));
  ASSERT_FALSE(store_->register_model(model("m1", "u1", 5), "j1"));
  auto j = store_->get_job("j1");
  EXPECT_EQ(j->status, "ready");
  EXPECT_EQ(j->model_id, "m1");
  EXPECT_EQ(store_->list_models("u1")->size(), 1u);
}

// Models another instance registered (read from tailor.state) arrive in any
// order across partitions: each user's list stays newest first, a model is
// imported once, and a job of this instance that made the same model (the
// same request, run on both) still ends ready without listing it twice.
TEST_F(StoreTest, ImportedModelsAreListedNewestFirstOnceEach) {
  const auto generation = store_->models_generation();
  EXPECT_EQ(store_->import_model(model("m2", "u1", 2)), true);
  EXPECT_GT(store_->models_generation(), generation) << "readers of the models must re-read";
  EXPECT_EQ(store_->import_model(model("m1", "u1", 1)), true);
  EXPECT_EQ(store_->import_model(model("m3", "u1", 3)), true);
  auto ids = [&] {
    std::vector<std::string> out;
    auto listed = store_->list_models("u1");
    EXPECT_TRUE(listed);
    if (listed)
      for (const auto& m : *listed) out.push_back(m.model_id);
    return out;
  };
  EXPECT_EQ(ids(), (std::vector<std::string>{"m3", "m2", "m1"}));
  const auto after = store_->models_generation();
  EXPECT_EQ(store_->import_model(model("m2", "u1", 9)), false);
  EXPECT_EQ(store_->get_model("m2")->created_ms, 2) << "a known model is kept as it is";
  EXPECT_EQ(store_->models_generation(), after);
  EXPECT_EQ(ids(), (std::vector<std::string>{"m3", "m2", "m1"}));
  ASSERT_FALSE(store_->create_job(job("j3"), request("u1", "r3")));
  for (auto [from, to] :
       {std::pair{"queued", "admitted"}, {"admitted", "training"}, {"training", "saving"}})
    ASSERT_TRUE(store_->transition_job("j3", from, to));
  ASSERT_FALSE(store_->register_model(model("m3", "u1", 3), "j3"));
  EXPECT_EQ(store_->get_job("j3")->status, "ready");
  EXPECT_EQ(ids(), (std::vector<std::string>{"m3", "m2", "m1"}));
  // With the dedup record of the request that made it, unless one is here.
  const request_record made{"u2", "signup", "onboarding", 77, "j9",
                            {{channel::events, "u2", "{}"}}, 5, ""};
  EXPECT_EQ(store_->import_model(model("m9", "u2", 5), &made), true);
  auto found = store_->find_request("u2", "signup");
  ASSERT_TRUE(found && *found);
  EXPECT_EQ((*found)->payload_hash, 77u);
  EXPECT_EQ((*found)->job_id, "j9");
  ASSERT_FALSE(store_->put_request(request("u2", "mine", 1)));
  auto again = made;
  again.request_id = "mine";
  again.payload_hash = 2;
  EXPECT_EQ(store_->import_model(model("m10", "u2", 6), &again), true);
  EXPECT_EQ((*store_->find_request("u2", "mine"))->payload_hash, 1u)
      << "this instance's own record is kept";
  // Every model of every user, once each (what the state topic may lack).
  std::multiset<std::string> every;
  ASSERT_FALSE(store_->for_each_model([&](const model_record& m) { every.insert(m.model_id); }));
  EXPECT_EQ(every, (std::multiset<std::string>{"m1", "m10", "m2", "m3", "m9"}));
}

// Deleting a user removes everything stored of them in one batch, nothing
// of anyone else, and keeps their deletion: a model or job of theirs made
// before it and imported afterwards (a late state record) stays out.
TEST_F(StoreTest, DeletingAUserLeavesNothingOfThemAndNothingElseGoes) {
  for (const auto& user : {std::string("gone"), std::string("kept")}) {
    auto j = job("j-" + user, user);
    auto r = request(user, "r-j-" + user);
    r.job_id = j.job_id;
    j.request = std::string(1000, 'x');  // still running: its texts are kept
    ASSERT_FALSE(store_->create_job(j, r));
    ASSERT_FALSE(store_->register_model(model("m-" + user, user, 5)));
    request_record answer{user, "q1", "inference", 3, "", {{channel::results, user, "{}"}}, 9, ""};
    history_entry entry{user, 9, "q1", "{\"prompt\":\"secret\"}", ""};
    ASSERT_FALSE(store_->put_request(answer, &entry));
    ASSERT_FALSE(store_->append_history({user, 10, "q2", "{}", "{}"}));
  }
  ASSERT_EQ(store_->jobs_of("gone")->size(), 1u);
  EXPECT_EQ(store_->jobs_of("gone")->front().job_id, "j-gone");
  EXPECT_FALSE(*store_->erased_at("gone"));
  const auto generation = store_->models_generation();
  const request_record deletion{
      "gone", "del-1", "deletion", 4, "", {{channel::events, "gone", "d"}}, 20, ""};
  auto erased = store_->delete_user("gone", 20, [&](const user_erasure& e) {
    EXPECT_EQ(e.requests, 2u) << "the answer is made from what went";
    return deletion;
  });
  ASSERT_TRUE(erased) << caf::to_string(erased.error());
  ASSERT_EQ(erased->models.size(), 1u);
  EXPECT_EQ(erased->models.front().artifact_path, "/a/m-gone");
  EXPECT_EQ(erased->job_ids, std::vector<std::string>{"j-gone"});
  EXPECT_EQ(erased->requests, 2u);  // the onboarding and the inference record
  EXPECT_EQ(erased->history, 2u);
  EXPECT_GT(store_->models_generation(), generation) << "readers of the models must re-read";

  EXPECT_TRUE(store_->list_models("gone")->empty());
  EXPECT_EQ(store_->get_model("m-gone").error(), errc::not_found);
  EXPECT_EQ(store_->get_job("j-gone").error(), errc::not_found);
  EXPECT_TRUE(store_->page_history("gone", "", 10)->entries.empty());
  EXPECT_FALSE(*store_->find_request("gone", "q1"));
  EXPECT_FALSE(*store_->find_request("gone", "r-j-gone"));
  EXPECT_TRUE(store_->jobs_of("gone")->empty());
  EXPECT_EQ(store_->erased_at("gone")->value_or(0), 20);
  auto kept_answer = store_->find_request("gone", "del-1");
  ASSERT_TRUE(kept_answer && *kept_answer) << "a repeated deletion is answered as the first";
  EXPECT_EQ((*kept_answer)->answers.front().payload, "d");

  // The other user is whole.
  EXPECT_EQ(store_->list_models("kept")->size(), 1u);
  EXPECT_EQ(store_->get_job("j-kept")->request, std::string(1000, 'x'));
  EXPECT_EQ(store_->page_history("kept", "", 10)->entries.size(), 2u);
  EXPECT_TRUE(*store_->find_request("kept", "q1"));

  // Records of the deleted user's past read late do not bring it back;
  // what they make after the deletion is stored.
  EXPECT_EQ(store_->import_model(model("m-late", "gone", 19)), false);
  EXPECT_EQ(store_->get_model("m-late").error(), errc::not_found);
  auto late = job("j-late", "gone");
  late.created_ms = 20;
  EXPECT_EQ(store_->import_job(late, request("gone", "r-j-late")), false);
  EXPECT_EQ(store_->get_job("j-late").error(), errc::not_found);
  EXPECT_EQ(store_->import_model(model("m-new", "gone", 21)), true);
  EXPECT_EQ(store_->list_models("gone")->size(), 1u);

  // On disk: the job's texts went with it, and nothing survives a reopen.
  store_.reset();
  {
    raw_store raw(dir_.string());
    EXPECT_FALSE(raw.get("job_requests", "j-gone")) << "the deleted user's texts are kept";
    EXPECT_TRUE(raw.get("job_requests", "j-kept"));
    EXPECT_EQ(raw.count_from("history", std::string("gone") + '\0'), 0u);
  }
  reopen();
  EXPECT_EQ(store_->erased_at("gone")->value_or(0), 20);
  EXPECT_EQ(store_->get_model("m-gone").error(), errc::not_found);
}

// Another instance's deletion of a user, read late from the state topic:
// what was made before it goes, what was made after stays, and reading it
// again (each start) changes nothing.
TEST_F(StoreTest, ADeletionReadLateKeepsWhatWasMadeAfterIt) {
  ASSERT_FALSE(store_->register_model(model("old", "u", 5)));
  ASSERT_FALSE(store_->register_model(model("new", "u", 50)));
  ASSERT_FALSE(store_->append_history({"u", 9, "q1", "{}", "{}"}));
  ASSERT_FALSE(store_->append_history({"u", 60, "q2", "{}", "{}"}));
  request_record before{"u", "q1", "inference", 3, "", {{channel::results, "u", "{}"}}, 9, ""};
  request_record after{"u", "q2", "inference", 3, "", {{channel::results, "u", "{}"}}, 60, ""};
  ASSERT_FALSE(store_->put_request(before));
  ASSERT_FALSE(store_->put_request(after));
  auto erased = store_->delete_user("u", 20, {}, true);
  ASSERT_TRUE(erased) << caf::to_string(erased.error());
  EXPECT_EQ(erased->models.size(), 1u);
  EXPECT_EQ(erased->requests, 1u);
  EXPECT_EQ(erased->history, 1u);
  auto listed = store_->list_models("u");
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ(listed->front().model_id, "new");
  EXPECT_FALSE(*store_->find_request("u", "q1"));
  EXPECT_TRUE(*store_->find_request("u", "q2"));
  auto page = store_->page_history("u", "", 10);
  ASSERT_EQ(page->entries.size(), 1u);
  EXPECT_EQ(page->entries.front().request_id, "q2");
  auto again = store_->delete_user("u", 20, {}, true);
  ASSERT_TRUE(again);
  EXPECT_TRUE(again->models.empty());
  EXPECT_EQ(again->requests, 0u);
  EXPECT_EQ(store_->list_models("u")->size(), 1u);
}

// A job taken over from an instance that is gone is stored once, with its
// request's dedup record unless one is here; a job of this instance that
// another took over while it was away is moved: at rest, never resumed,
// and stored anew if it comes back to this instance.
TEST_F(StoreTest, JobsTakenOverAreImportedOnceAndJobsHandedOverRest) {
  auto theirs = job("t1", "u2");
  const request_record made{"u2", "r-t1", "onboarding", 77, "t1", {{channel::events, "u2", "q"}},
                            5, ""};
  EXPECT_EQ(store_->import_job(theirs, made), true);
  EXPECT_EQ(store_->get_job("t1")->status, "queued");
  auto found = store_->find_request("u2", "r-t1");
  ASSERT_TRUE(found && *found);
  EXPECT_EQ((*found)->payload_hash, 77u);
  EXPECT_EQ((*found)->answers[0].payload, "q");
  ASSERT_TRUE(store_->transition_job("t1", "queued", "admitted"));
  EXPECT_EQ(store_->import_job(theirs, made), false);
  EXPECT_EQ(store_->get_job("t1")->status, "admitted") << "a job here is kept as it is";
  // Ours, taken over elsewhere while this instance was away.
  ASSERT_FALSE(store_->create_job(job("o1"), request("u1", "o1")));
  ASSERT_TRUE(store_->transition_job("o1", "queued", "admitted"));
  ASSERT_TRUE(store_->transition_job("o1", "admitted", "training"));
  ASSERT_FALSE(store_->create_job(job("o2"), request("u1", "o2")));
  ASSERT_TRUE(store_->transition_job("o2", "queued", "failed"));
  EXPECT_EQ(store_->hand_over_job("o1", "tailord-b"), true);
  EXPECT_EQ(store_->hand_over_job("o2", "tailord-b"), false) << "a final job stays final";
  EXPECT_EQ(store_->hand_over_job("nowhere", "tailord-b"), false);
  const auto moved = store_->get_job("o1");
  EXPECT_EQ(moved->status, "moved");
  EXPECT_NE(moved->error_message.find("tailord-b"), std::string::npos) << moved->error_message;
  std::vector<std::string> unfinished;
  const auto jobs = store_->unfinished_jobs();
  ASSERT_TRUE(jobs);
  for (const auto& j : *jobs) unfinished.push_back(j.job_id);
  EXPECT_EQ(unfinished, (std::vector<std::string>{"o2", "t1"})) << "o1 is not resumed here";
  EXPECT_EQ(store_->hand_over_job("o1", "tailord-c"), false) << "moved once";
  // Taken over again by this instance when the other is gone too.
  auto back = job("o1");
  EXPECT_EQ(store_->import_job(back, request("u1", "o1")), true);
  EXPECT_EQ(store_->get_job("o1")->status, "queued");
}

TEST_F(StoreTest, UnfinishedJobsAreThoseNotAtRestYet) {
  ASSERT_FALSE(store_->create_job(job("q"), request("u1", "q")));
  ASSERT_FALSE(store_->create_job(job("r"), request("u1", "r")));
  ASSERT_FALSE(store_->create_job(job("f"), request("u1", "f")));
  for (auto [from, to] :
       {std::pair{"queued", "admitted"}, {"admitted", "training"}, {"training", "saving"}})
    ASSERT_TRUE(store_->transition_job("r", from, to));
  std::vector<tailor::messages::outgoing_message> outcome{{channel::events, "u1", "ready!"}};
  ASSERT_FALSE(store_->register_model(model("m", "u1", 5), "r", outcome));
  ASSERT_TRUE(store_->transition_job("f", "queued", "failed"));
  auto ids = [&] {
    std::vector<std::string> out;
    auto jobs = store_->unfinished_jobs();
    EXPECT_TRUE(jobs);
    if (jobs)
      for (const auto& j : *jobs) out.push_back(j.job_id);
    return out;
  };
  // Final but not announced: still unfinished, so a restart announces it.
  EXPECT_EQ(ids(), (std::vector<std::string>{"f", "q", "r"}));
  EXPECT_EQ(store_->get_job("r")->outcome.size(), 1u);
  EXPECT_EQ(store_->get_job("r")->outcome[0].payload, "ready!");
  ASSERT_FALSE(store_->mark_announced("r", "ready"));
  ASSERT_FALSE(store_->mark_announced("f", "failed"));
  // A late confirmation of an older status changes nothing.
  ASSERT_FALSE(store_->mark_announced("q", "admitted"));
  EXPECT_EQ(ids(), (std::vector<std::string>{"q"}));
  reopen();
  EXPECT_EQ(ids(), (std::vector<std::string>{"q"}));
  EXPECT_EQ(store_->get_job("r")->announced, "ready");
}

TEST(Artifacts, AtomicWriteChecksumAndVerifiedRead) {
  const tailor::test::temp_dir dir("art");
  auto path = (dir / "a.bin").string();
  std::string text = "adapter bytes";
  std::vector<std::byte> bytes(reinterpret_cast<const std::byte*>(text.data()),
                               reinterpret_cast<const std::byte*>(text.data()) + text.size());
  ASSERT_FALSE(write_file_atomic(path, bytes));
  // SHA-256 of "adapter bytes", computed independently (sha256sum).
  auto sum = checksum_of(bytes);
  EXPECT_EQ(sum, "sha256:dd70d2c1a473d6e87c6dd52a250ca1c9f055a3910d10f1674121461cf6c96bf7");
  auto back = read_file(path, sum);
  ASSERT_TRUE(back);
  EXPECT_EQ(*back, bytes);
  // Overwrite in place: readers see the old or the new file, never a temp one.
  text = "other bytes!";
  std::vector<std::byte> other(reinterpret_cast<const std::byte*>(text.data()),
                               reinterpret_cast<const std::byte*>(text.data()) + text.size());
  ASSERT_FALSE(write_file_atomic(path, other));
  EXPECT_EQ(read_file(path, sum).error(), errc::checksum_mismatch);
  EXPECT_EQ(read_file((dir / "absent").string()).error(), errc::not_found);
  std::size_t files = 0;
  for (auto& e : fs::directory_iterator(dir.path())) files += e.is_regular_file();
  EXPECT_EQ(files, 1u) << "no temporary file is left behind";
}

TEST_F(StoreTest, RequestsAreKeyedByUserAndRequestId) {
  ASSERT_FALSE(store_->put_request(request("u1", "same", 1)));
  ASSERT_FALSE(store_->put_request(request("u2", "same", 2)));
  EXPECT_EQ((*store_->find_request("u1", "same"))->payload_hash, 1u);
  EXPECT_EQ((*store_->find_request("u2", "same"))->payload_hash, 2u);
  EXPECT_FALSE(store_->find_request("u3", "same")->has_value());
  // A user id that is a prefix of another must not see its requests.
  ASSERT_FALSE(store_->put_request(request("u", "1same", 3)));
  EXPECT_FALSE(store_->find_request("u1", "1same")->has_value());
}

// With a retention, inference answers and history entries older than it
// are not paged, and go at the next compaction; onboarding records (they
// name jobs), newer entries and the other tables stay.
TEST_F(StoreTest, AnswersAndHistoryPastRetentionGoAndTheRestStays) {
  store_.reset();
  store_options o;
  o.retention = std::chrono::hours(24);
  auto opened = metadata_store::open(dir_.string(), o);
  ASSERT_TRUE(opened) << caf::to_string(opened.error());
  store_ = std::move(*opened);
  const auto now = std::chrono::duration_cast<std::chrono::milliseconds>(
                       std::chrono::system_clock::now().time_since_epoch())
                       .count();
  const int64_t old = now - 2 * 24 * 3600 * 1000, recent = now - 3600 * 1000;
  auto answer = [&](const std::string& id, const std::string& kind, int64_t at) {
    return request_record{
        "u1", id, kind, 1, "", {{channel::results, "u1", "answer " + id}}, at, ""};
  };
  // Answers stored with their entries, output kept once in the record.
  for (auto [id, at] : {std::pair{"old", old}, {"new", recent}}) {
    history_entry e{"u1", at, id, "in", ""};
    ASSERT_FALSE(store_->put_request(answer(id, "inference", at), &e));
  }
  ASSERT_FALSE(store_->put_request(answer("signup", "onboarding", old)));
  ASSERT_FALSE(store_->create_job(job("j-old"), answer("r-j-old", "onboarding", old)));
  auto paged = [&] {
    std::vector<std::string> ids;
    auto page = store_->page_history("u1", "", 10);
    EXPECT_TRUE(page) << caf::to_string(page.error());
    if (page)
      for (const auto& e : page->entries) ids.push_back(e.request_id + "=" + e.output);
    return ids;
  };
  const std::vector<std::string> only_new{"new=answer new"};
  EXPECT_EQ(paged(), only_new) << "past retention, even before a compaction";
  ASSERT_FALSE(store_->compact());
  EXPECT_EQ(paged(), only_new);
  auto found = [&](const std::string& id) {
    auto r = store_->find_request("u1", id);
    EXPECT_TRUE(r);
    return r && r->has_value();
  };
  EXPECT_FALSE(found("old")) << "compacted away";
  EXPECT_TRUE(found("new"));
  EXPECT_TRUE(found("signup")) << "an onboarding record names a job: kept";
  EXPECT_TRUE(found("r-j-old"));
  EXPECT_TRUE(store_->get_job("j-old"));
  store_.reset();
  raw_store raw(dir_.string());
  EXPECT_EQ(raw.count_from("history", std::string("u1") + '\0'), 1u) << "the old entry is gone";
}

// Without one, nothing goes.
TEST_F(StoreTest, WithoutRetentionOldAnswersStay) {
  history_entry e{"u1", 1000, "ancient", "in", ""};
  ASSERT_FALSE(store_->put_request(
      request_record{
          "u1", "ancient", "inference", 1, "", {{channel::results, "u1", "a"}}, 1000, ""},
      &e));
  ASSERT_FALSE(store_->compact());
  auto page = store_->page_history("u1", "", 10);
  ASSERT_TRUE(page);
  ASSERT_EQ(page->entries.size(), 1u);
  EXPECT_EQ(page->entries[0].output, "a");
  auto r = store_->find_request("u1", "ancient");
  EXPECT_TRUE(r && r->has_value());
}

TEST_F(StoreTest, HistoryPagesInTimeOrderPerUser) {
  for (int i = 0; i < 7; ++i)
    ASSERT_FALSE(store_->append_history({"u1", 100 + i, "q" + std::to_string(i), "in", "out"}));
  ASSERT_FALSE(store_->append_history({"u10", 50, "other", "in", "out"}));
  std::vector<std::string> seen;
  std::string cursor;
  int pages = 0;
  do {
    auto p = store_->page_history("u1", cursor, 3);
    ASSERT_TRUE(p);
    for (auto& e : p->entries) seen.push_back(e.request_id);
    cursor = p->next;
    ++pages;
  } while (!cursor.empty() && pages < 10);
  EXPECT_EQ(pages, 3);
  EXPECT_EQ(seen, (std::vector<std::string>{"q0", "q1", "q2", "q3", "q4", "q5", "q6"}));
}

// An inference's answer and its history entry are one write: both or neither.
TEST_F(StoreTest, ARequestWithItsHistoryEntryIsStoredAndPagedLikeAnAppendedOne) {
  const history_entry entry{"u1", 200, "q9", "in9", "out9"};
  ASSERT_FALSE(store_->put_request(request("u1", "q9", 9), &entry));
  ASSERT_FALSE(store_->append_history({"u1", 100, "q8", "in8", "out8"}));
  EXPECT_EQ((*store_->find_request("u1", "q9"))->payload_hash, 9u);
  auto page = store_->page_history("u1", "", 10);
  ASSERT_TRUE(page);
  ASSERT_EQ(page->entries.size(), 2u);
  EXPECT_EQ(page->entries[0].request_id, "q8") << "time order, whichever way each was written";
  EXPECT_EQ(page->entries[1].request_id, "q9");
  EXPECT_EQ(page->entries[1].input, "in9");
  EXPECT_EQ(page->entries[1].output, "out9");
  reopen();
  EXPECT_EQ(store_->page_history("u1", "", 10)->entries.size(), 2u);
  EXPECT_TRUE(store_->find_request("u1", "q9")->has_value());
}

// The answer is kept once, in the request's record: a history entry with
// no output, written with the record or appended after it, reads it from
// there, before and after a reopen. An entry with an output keeps its own;
// one whose record is gone is a clear error, not an empty output.
TEST_F(StoreTest, AHistoryEntryReadsTheAnswerItsRecordKeeps) {
  const std::string answer = R"({"request_id":"q1","text":"a \"quoted\" answer"})";
  request_record rec{
      "u1", "q1", "inference.request", 7, "", {{channel::results, "u1", answer}}, 5, ""};
  const history_entry with{"u1", 100, "q1", R"({"prompt":"hi"})", ""};
  ASSERT_FALSE(store_->put_request(rec, &with));
  request_record rec2{
      "u1", "q2", "inference.request", 8, "", {{channel::results, "u1", "{}"}}, 6, ""};
  const history_entry other{"u1", 101, "q2", "in2", "not the record's answer"};
  ASSERT_FALSE(store_->put_request(rec2, &other));
  request_record rec3{
      "u1", "q3", "inference.request", 9, "", {{channel::results, "u1", "{\"n\":3}"}}, 7, ""};
  ASSERT_FALSE(store_->put_request(rec3));
  ASSERT_FALSE(store_->append_history({"u1", 102, "q3", "in3", ""}));
  auto check = [&](const char* where) {
    auto page = store_->page_history("u1", "", 10);
    ASSERT_TRUE(page) << where;
    ASSERT_EQ(page->entries.size(), 3u) << where;
    EXPECT_EQ(page->entries[0].input, R"({"prompt":"hi"})") << where;
    EXPECT_EQ(page->entries[0].output, answer) << where;
    EXPECT_EQ(page->entries[1].output, "not the record's answer") << where;
    EXPECT_EQ(page->entries[2].input, "in3") << where;
    EXPECT_EQ(page->entries[2].output, "{\"n\":3}") << where;
  };
  check("in the memtable");
  reopen();
  check("after a reopen");
  ASSERT_FALSE(store_->append_history({"u2", 100, "never-answered", "in", ""}));
  auto broken = store_->page_history("u2", "", 10);
  ASSERT_FALSE(broken);
  EXPECT_NE(caf::to_string(broken.error()).find("never-answered"), std::string::npos)
      << caf::to_string(broken.error());
}

// Answers of many users arrive interleaved, a user's ids not in key order;
// each lookup finds exactly its own record (or none: a new id, another
// user's id) and each history is that user's in time order, both from the
// memtable and, after a reopen, from table files.
TEST_F(StoreTest, ManyUsersInterleavedEachFindOnlyTheirOwnRequestsAndHistory) {
  constexpr int users = 120, per_user = 6;
  std::vector<std::pair<int, int>> order;
  for (int u = 0; u < users; ++u)
    for (int i = 0; i < per_user; ++i) order.emplace_back(u, i);
  std::shuffle(order.begin(), order.end(), std::mt19937(5));
  std::vector<int> written(users, 0);  // a user's entries so far: its next time
  for (auto [u, i] : order) {
    const auto user = "user-" + std::to_string(u), id = "q" + std::to_string(per_user - i);
    const history_entry entry{user, 1000 + written[u]++, id, "in", "out" + id};
    const auto hash = static_cast<uint64_t>(u * 100 + i);
    ASSERT_FALSE(store_->put_request(request(user, id, hash), &entry));
  }
  auto check = [&](const char* where) {
    for (int u = 0; u < users; ++u) {
      const auto user = "user-" + std::to_string(u);
      for (int i = 0; i < per_user; ++i) {
        auto found = store_->find_request(user, "q" + std::to_string(per_user - i));
        ASSERT_TRUE(found && found->has_value()) << user << " " << where;
        EXPECT_EQ((*found)->payload_hash, static_cast<uint64_t>(u * 100 + i)) << where;
      }
      EXPECT_FALSE(store_->find_request(user, "q0")->has_value()) << where;
      EXPECT_FALSE(store_->find_request(user + "x", "q1")->has_value()) << where;
      auto page = store_->page_history(user, "", 100);
      ASSERT_TRUE(page);
      ASSERT_EQ(page->entries.size(), static_cast<std::size_t>(per_user)) << user << " " << where;
      for (std::size_t k = 0; k < page->entries.size(); ++k) {
        EXPECT_EQ(page->entries[k].user_id, user);
        EXPECT_EQ(page->entries[k].time_ms, 1000 + static_cast<int64_t>(k)) << where;
      }
    }
  };
  check("in the memtable");
  reopen();  // the log is replayed into table files
  check("after a reopen");
}

// A spike of answers must not grow the store's memory without bound: with a
// budget, the memtables are flushed once together they pass half of it (by
// default each table would keep up to 64 MB before a flush, two of them),
// and /metrics reads what they hold from memory().
TEST_F(StoreTest, AMemoryBudgetBoundsTheMemtablesAndMemoryReportsThem) {
  constexpr uint64_t budget = 16u << 20;  // memtables 8 MB
  const std::string output(2000, 'o');
  auto write_24_mb = [&](metadata_store& db) {
    for (int i = 0; i < 12000; ++i)
      ASSERT_FALSE(db.append_history({"u" + std::to_string(i % 100), 1000 + i,
                                      "q" + std::to_string(i), "in", output}));
  };
  write_24_mb(*store_);
  ASSERT_FALSE(HasFatalFailure());
  EXPECT_GT(store_->memory().memtables, 20u << 20) << "RocksDB's defaults keep it all";
  store_.reset();
  fs::remove_all(dir_);
  // Flushes run in RocksDB's background threads: each one that completes
  // wakes the wait, which ends once the memtables are within the budget.
  struct flushes : rocksdb::EventListener {
    std::mutex mutex;
    std::condition_variable done;
    void OnFlushCompleted(rocksdb::DB*, const rocksdb::FlushJobInfo&) override {
      std::lock_guard<std::mutex> lock(mutex);
      done.notify_all();
    }
  };
  auto listener = std::make_shared<flushes>();
  store_options options;
  options.memory_bytes = budget;
  options.listeners = {listener};
  auto s = metadata_store::open(dir_.string(), options);
  ASSERT_TRUE(s) << caf::to_string(s.error());
  store_ = std::move(*s);
  write_24_mb(*store_);
  ASSERT_FALSE(HasFatalFailure());
  {
    std::unique_lock<std::mutex> lock(listener->mutex);
    listener->done.wait_for(lock, std::chrono::seconds(30), [&] {
      return store_->memory().memtables <= budget / 2 + (1u << 20);
    });
  }
  const auto m = store_->memory();
  EXPECT_LE(m.memtables, budget / 2 + (1u << 20));
  EXPECT_GT(m.memtables, 0u);
  EXPECT_LE(m.block_cache, budget / 2);
  // Flushed is not lost: every user's entries page back.
  auto page = store_->page_history("u7", "", 1000);
  ASSERT_TRUE(page);
  EXPECT_EQ(page->entries.size(), 120u);
}

TEST_F(StoreTest, DataSurvivesReopen) {
  ASSERT_FALSE(store_->create_job(job("j1"), request("u1", "a")));
  ASSERT_FALSE(store_->register_model(model("m1", "u1", 1)));
  ASSERT_FALSE(store_->append_history({"u1", 1, "q", "in", "out"}));
  reopen();
  EXPECT_EQ(store_->get_job("j1")->status, "queued");
  EXPECT_EQ(store_->list_models("u1")->size(), 1u);
  EXPECT_TRUE(store_->find_request("u1", "a")->has_value());
  EXPECT_EQ(store_->page_history("u1", "", 10)->entries.size(), 1u);
}

TEST_F(StoreTest, DataSurvivesAKilledProcess) {
  store_.reset();
  pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto s = metadata_store::open(dir_.string());
    if (!s) ::_exit(2);
    for (int i = 0; i < 100; ++i) {
      auto rq = request("u1", "r" + std::to_string(i));
      if ((*s)->create_job(job("j" + std::to_string(i)), rq)) ::_exit(3);
    }
    ::kill(::getpid(), SIGKILL);  // no close, no flush: only the WAL remains
    ::_exit(4);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFSIGNALED(status)) << "child exited with " << WEXITSTATUS(status);
  reopen();
  auto jobs = store_->list_jobs("", 1000);
  ASSERT_TRUE(jobs);
  EXPECT_EQ(jobs->size(), 100u);
  EXPECT_TRUE(store_->find_request("u1", "r99")->has_value());
}
