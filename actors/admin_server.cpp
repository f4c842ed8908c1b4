#include "actors/admin_server.hpp"

#include <httplib.h>

#include <unistd.h>

#include <charconv>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>

#include "storage/errc.hpp"

namespace tailor::actors {

namespace {

using json = nlohmann::json;
using namespace tailor::messages;

void reply_json(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(body.dump(2), "application/json");
}

void reply_error(httplib::Response& res, int status, const std::string& code,
                 const std::string& msg) {
  reply_json(res, status, json{{"error", {{"code", code}, {"message", msg}}}});
}

// Compares in a time that does not depend on where the two first differ,
// so that timing does not reveal a token's prefix.
bool same_secret(const std::string& given, const std::string& expected) {
  unsigned char diff = given.size() == expected.size() ? 0 : 1;
  for (std::size_t i = 0; i < expected.size(); ++i)
    diff |= static_cast<unsigned char>(expected[i] ^ (i < given.size() ? given[i] : 0));
  return diff == 0;
}

json records_to_json(const auto& records) {
  json out = json::array();
  for (const auto& r : records) out.push_back(json::parse(to_json(r)));
  return out;
}

// The process's resident memory and the store's part of it, read at each
// scrape: what an operator watches a spike of sign-ups by.
std::string memory_gauges(storage::metadata_store& db) {
  std::string out;
  if (const auto bytes = resident_memory_bytes(); bytes > 0)
    out += "# HELP process_resident_memory_bytes Resident memory of this process.\n"
           "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes " +
           std::to_string(bytes) + "\n";
  const auto m = db.memory();
  out += "# HELP tailor_store_memory_bytes What RocksDB holds in memory, by part (its own "
         "estimates; store_memory_mb bounds memtables and block_cache).\n"
         "# TYPE tailor_store_memory_bytes gauge\n";
  const std::pair<const char*, uint64_t> parts[] = {
      {"memtables", m.memtables}, {"block_cache", m.block_cache},
      {"table_readers", m.table_readers}};
  for (const auto& [part, bytes] : parts)
    out += std::string("tailor_store_memory_bytes{part=\"") + part + "\"} " +
           std::to_string(bytes) + "\n";
  out += "# HELP tailor_store_written_bytes_total Keys and values written to each table of the "
         "store since start.\n# TYPE tailor_store_written_bytes_total counter\n";
  for (const auto& [table, bytes] : db.written_bytes())
    out += "tailor_store_written_bytes_total{table=\"" + table + "\"} " + std::to_string(bytes) +
           "\n";
  const auto w = db.writes();
  out += "# HELP tailor_store_writable Whether the store's writes succeed (0 from a failed write, "
         "a full disk say, to the next one that succeeds).\n# TYPE tailor_store_writable gauge\n"
         "tailor_store_writable " +
         std::string(w.failing.empty() ? "1" : "0") +
         "\n# HELP tailor_store_write_failures_total Writes to the store that failed since "
         "start.\n# TYPE tailor_store_write_failures_total counter\n"
         "tailor_store_write_failures_total " +
         std::to_string(w.failures) + "\n";
  return out;
}

// History cursors are binary RocksDB keys: hex on the wire.
std::string to_hex(const std::string& bytes) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : bytes) {
    out.push_back(digits[c >> 4]);
    out.push_back(digits[c & 15]);
  }
  return out;
}

std::optional<std::string> from_hex(const std::string& hex) {
  if (hex.size() % 2 != 0) return std::nullopt;
  std::string out;
  for (std::size_t i = 0; i < hex.size(); i += 2) {
    int v = 0;
    for (int k = 0; k < 2; ++k) {
      char c = hex[i + k];
      int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
      if (d < 0) return std::nullopt;
      v = v * 16 + d;
    }
    out.push_back(static_cast<char>(v));
  }
  return out;
}

// The `limit` query parameter, `fallback` when absent; a malformed one (not
// an integer in [1, max]) is answered 400 here, and nullopt returned.
std::optional<uint64_t> limit_of(const httplib::Request& req, httplib::Response& res,
                                 uint64_t fallback, uint64_t max = 0) {
  if (!req.has_param("limit")) return fallback;
  const auto text = req.get_param_value("limit");
  uint64_t value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || value == 0 ||
      (max > 0 && value > max)) {
    reply_error(res, 400, "invalid_argument",
                max > 0 ? "limit: must be an integer in [1, " + std::to_string(max) + "]"
                        : "limit: must be a positive integer");
    return std::nullopt;
  }
  return value;
}

// Answers with `on_value` of what the store read, or 500 with its error.
template <class T, class OnValue>
void answer(httplib::Response& res, caf::expected<T> read, OnValue on_value) {
  if (!read) return reply_error(res, 500, "internal", caf::to_string(read.error()));
  on_value(*read);
}

// The group as the state follower saw it: instances heard from, open jobs
// (the first `limit`, by job id).
json group_json(const admin_server::group_info& group, std::size_t limit) {
  const auto now = group_view::clock::now();
  json instances = json::array();
  for (const auto& [id, at] : group.view->instances()) {
    const auto ago = std::chrono::duration_cast<std::chrono::milliseconds>(now - at).count();
    instances.push_back({{"instance_id", id},
                         {"heard_ms_ago", ago},
                         {"live", group.takeover_after_ms == 0 || ago <= group.takeover_after_ms},
                         {"this", id == group.instance_id}});
  }
  json jobs = json::array();
  group.view->for_each([&](const messages::job_state_record& open) {
    if (jobs.size() >= limit) return false;
    jobs.push_back({{"job_id", open.job_id},
                    {"user_id", open.user_id},
                    {"owner", open.owner},
                    {"status", open.status},
                    {"created_ms", open.created_ms}});
    return true;
  });
  return {{"instance_id", group.instance_id},
          {"takeover_after_ms", group.takeover_after_ms},
          {"instances", std::move(instances)},
          {"open_jobs_total", group.view->size()},
          {"open_jobs", std::move(jobs)}};
}

}  // namespace

admin_server::admin_server(std::shared_ptr<storage::metadata_store> db,
                           std::shared_ptr<metrics> stats,
                           std::shared_ptr<const engine_health> health, std::size_t input_topics,
                           group_info group)
    : db_(std::move(db)),
      stats_(std::move(stats)),
      health_(std::move(health)),
      input_topics_(input_topics),
      group_(std::move(group)) {}

admin_server::~admin_server() {
  stop();
}

int admin_server::start(const std::string& host, int port, const std::string& token) {
  server_ = std::make_unique<httplib::Server>();
  auto& svr = *server_;
  // Probes stay open: a process manager asks them without credentials, and
  // they tell nothing of users.
  if (!token.empty())
    svr.set_pre_routing_handler([token](const httplib::Request& req, httplib::Response& res) {
      if (req.path == "/healthz" || req.path == "/readyz" ||
          same_secret(req.get_header_value("Authorization"), "Bearer " + token))
        return httplib::Server::HandlerResponse::Unhandled;
      res.set_header("WWW-Authenticate", "Bearer");
      reply_error(res, 401, "unauthenticated",
                  req.has_header("Authorization")
                      ? "the bearer token is not this admin API's (admin.token_file)"
                      : "this admin API needs \"Authorization: Bearer TOKEN\" (admin.token_file)");
      return httplib::Server::HandlerResponse::Handled;
    });
  // A failed engine is stopping (engine_health): both probes say why.
  svr.Get("/healthz", [this](const httplib::Request&, httplib::Response& res) {
    if (auto failure = health_->failure(); !failure.empty()) {
      res.status = 503;
      res.set_content("failed: " + failure + "\n", "text/plain");
      return;
    }
    res.set_content("ok\n", "text/plain");
  });
  svr.Get("/v1/status", [this](const httplib::Request&, httplib::Response& res) {
    auto j = stats_->summary();
    const auto failure = health_->failure();
    j["version"] = TAILOR_VERSION;
    j["health"] = failure.empty() ? "ok" : "failed: " + failure;
    const auto writes = db_->writes();
    j["ready"] = failure.empty() && writes.failing.empty() && stats_->ready(input_topics_);
    j["resident_memory_bytes"] = resident_memory_bytes();
    const auto m = db_->memory();
    j["store"] = {{"memtables_bytes", m.memtables},
                  {"block_cache_bytes", m.block_cache},
                  {"write_failures", writes.failures}};
    if (!writes.failing.empty()) {
      j["store"]["cannot_write"] = writes.failing;
      j["store"]["cannot_write_since_ms"] = writes.failing_since_ms;
    }
    reply_json(res, 200, j);
  });
  svr.Get("/readyz", [this](const httplib::Request&, httplib::Response& res) {
    if (auto failure = health_->failure(); !failure.empty()) {
      res.status = 503;
      res.set_content("not ready: failed: " + failure + "\n", "text/plain");
      return;
    }
    auto why = stats_->not_ready(input_topics_);
    // Events wait in Kafka until it writes again (a full disk, say).
    if (const auto writes = db_->writes(); why.empty() && !writes.failing.empty())
      why = "the store cannot write: " + writes.failing;
    res.status = why.empty() ? 200 : 503;
    res.set_content(why.empty() ? "ready\n" : "not ready: " + why + "\n", "text/plain");
  });
  svr.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(stats_->render() + memory_gauges(*db_), "text/plain; version=0.0.4");
  });
  svr.Get("/v1/jobs", [this](const httplib::Request& req, httplib::Response& res) {
    std::string status = req.has_param("status") ? req.get_param_value("status") : "";
    const auto limit = limit_of(req, res, 100);
    if (!limit) return;
    answer(res, db_->list_jobs(status, *limit), [&](const std::vector<job_record>& jobs) {
      reply_json(res, 200, records_to_json(jobs));
    });
  });
  svr.Get(R"(/v1/jobs/([A-Za-z0-9._:-]+))",
          [this](const httplib::Request& req, httplib::Response& res) {
            std::string id = req.matches[1];
            auto job = db_->get_job(id);
            if (!job && job.error() == storage::errc::not_found) {
              // Not here; the state topic may say which instance runs it.
              if (auto open = group_.view->find(id))
                return reply_error(res, 404, "job_not_found",
                                   "job " + id + " is not on this instance: it runs on " +
                                       open->owner + " (" + open->status + ")");
              return reply_error(res, 404, "job_not_found", "job " + id + " does not exist");
            }
            answer(res, std::move(job), [&](const job_record& found) {
              reply_json(res, 200, json::parse(to_json(found)));
            });
          });
  svr.Get(R"(/v1/users/([A-Za-z0-9._:-]+)/models)", [this](const httplib::Request& req,
                                                           httplib::Response& res) {
    std::string id = req.matches[1];
    answer(res, db_->list_models(id), [&](const std::vector<model_record>& models) {
      reply_json(res, 200, records_to_json(models));
    });
  });
  svr.Get(R"(/v1/users/([A-Za-z0-9._:-]+)/history)", [this](const httplib::Request& req,
                                                            httplib::Response& res) {
    std::string id = req.matches[1];
    auto after = from_hex(req.has_param("after") ? req.get_param_value("after") : "");
    if (!after) return reply_error(res, 400, "invalid_argument", "after: must be a cursor (hex)");
    const auto limit = limit_of(req, res, 50, 1000);
    if (!limit) return;
    answer(res, db_->page_history(id, *after, *limit), [&](const storage::history_page& page) {
      reply_json(res, 200,
                 json{{"entries", records_to_json(page.entries)}, {"next", to_hex(page.next)}});
    });
  });
  svr.Get("/v1/group", [this](const httplib::Request& req, httplib::Response& res) {
    const auto limit = limit_of(req, res, 100);
    if (!limit) return;
    reply_json(res, 200, group_json(group_, *limit));
  });
  int bound = port == 0 ? svr.bind_to_any_port(host) : (svr.bind_to_port(host, port) ? port : -1);
  if (bound < 0) return -1;
  thread_ = std::thread([this] { server_->listen_after_bind(); });
  return bound;
}

void admin_server::stop() {
  if (server_) server_->stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace tailor::actors
