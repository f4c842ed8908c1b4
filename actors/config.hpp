#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "messages/jobs.hpp"
#include "messages/limits.hpp"

namespace tailor::actors {

struct topic_names {
  std::string onboarding = "tailor.onboarding";
  std::string inference = "tailor.inference";
  std::string control = "tailor.control";
  std::string results = "tailor.results";
  std::string events = "tailor.events";
  std::string dlq = "tailor.dlq";
  // Compacted: the ready models every instance of the group reads
  // (design section 6).
  std::string state = "tailor.state";
};

struct kafka_config {
  // Empty: start librdkafka's embedded mock cluster (the demo default).
  std::string bootstrap_servers;
  std::string group_id = "tailor";
  topic_names topics;
  // Passed to every librdkafka client as is (SASL, TLS, tuning).
  std::map<std::string, std::string> properties;
  bool create_topics = true;
  int topic_partitions = 4;
  int replication_factor = 1;
  // How often the ingress commits answered offsets while busy. Every commit
  // is a write on the broker; a crash replays at most this much, and replays
  // are answered from the stored results.
  int commit_interval_ms = 100;
  // Exactly-once output (docs/operations.md): every answer and the input
  // offset it answers are committed in one Kafka transaction (back to
  // back, not every commit_interval_ms); consumers reading with
  // isolation.level read_committed see each answer once, even across
  // crashes.
  bool exactly_once = false;
  // How long tailord's consumers wait at the broker for data (librdkafka's
  // fetch.wait.max.ms); 0: librdkafka's default, 500 ms. Not a key: set for
  // the embedded mock cluster, which answers a fetch only after this wait
  // even when data has arrived (a real broker answers at once).
  int fetch_wait_ms = 0;
};

// Fine-tuning (issue 4): the training pool, admission and retries, and the
// values of hyperparameters a request leaves out.
struct training_config {
  int slots = 2;                    // training actors, one job each at a time
  int admission_queue = 32;         // jobs waiting for a slot; onboarding pauses at this many
  int max_jobs_per_user = 4;        // in flight; more is quota_exceeded
  int max_attempts = 3;             // transient failures retry up to this many runs in all
  int retry_backoff_ms = 1000;      // before the first retry; doubles with each
  int checkpoint_every = 50;        // steps; 0: no checkpoints
  int progress_interval_ms = 1000;  // at most one job.progress per job per interval
  std::string data_dir;             // where data_ref resolves; default <data_dir>/training-data
  std::size_t max_data_bytes = 8 << 20;      // of a data_ref file
  messages::hyperparameter_values defaults;  // training.rank ... training.seed
  int64_t prompt_max_tokens = 64;            // generations of an onboarding request's prompts
};

// Serving (issue 5): GPU actors (CPU device slots here), their batches, the
// adapter cache tiers, per-user limits and request defaults.
struct serving_config {
  int devices = 1;                  // GPU actors per base model (CPU device slots)
  int max_batch = 32;               // sequences decoded together
  int max_tokens_in_flight = 8192;  // sum of (prompt + max_tokens) over a batch
  int device_adapters = 256;        // adapters resident in a device bank
  int host_adapters = 1024;         // decoded adapters kept in host memory (LRU)
  int max_rank = 16;                // of the device banks; higher-rank adapters cannot be served
  int prefix_cache_entries = 1024;  // prompts whose keys and values a device keeps (0: off)
  int prefix_cache_mb = 128;        // at most this much memory for them, per device
  int max_requests_per_user = 16;   // in flight; more is quota_exceeded
  int prefill_chunk = 256;          // prompt tokens a batch step computes at most (0: all)
  // A SCHED_IDLE thread per device takes chunks of big steps: "auto" in the
  // steps where it measures faster, "on" in all, "off" none.
  std::string step_helper = "auto";
  int64_t default_max_tokens = 64;
  int64_t default_min_tokens = 0;  // also for onboarding prompts
  double default_temperature = 0.7;
  int deadline_ms = 60000;  // a request not finished by then ends with finish_reason deadline
  std::vector<std::string> pinned_models;  // kept resident on every device once loaded
  // "shared": the batch loop is an ordinary thread. "realtime": SCHED_FIFO,
  // so that no ordinary thread takes its core while it steps (needs
  // CAP_SYS_NICE; without it the loop stays shared and says so).
  std::string batch_thread = "shared";
  // The keys and values a device keeps of each running sequence and cached
  // prompt: "float16" (half the memory and reads) or "float32".
  std::string kv_cache = "float16";
  // The serving forward's matrix products: "amx" (inputs rounded to
  // bfloat16, sums in float, on AMX's tiles), "bfloat16" (the same on
  // AVX-512 BF16's dot product), "float32", or "auto": the first of these
  // the CPU has. A CPU without the one asked for runs the next (tailord warns).
  std::string products = "auto";
};

// How LibTorch and OpenBLAS use the cores (process-wide): each training slot
// runs on its own thread, so `training.slots` is the cores training takes.
struct compute_config {
  int intra_op_threads = 1;
  int blas_threads = 1;
  // CAF's scheduler threads for the actors that are not detached (users,
  // the registry, jobs): all short handlers, so one thread (no wake-ups
  // between threads on a request's hops) serves them best; 0: CAF's
  // default (the number of cores, at least 4).
  int actor_threads = 1;
  // "batch": every thread of tailord runs SCHED_BATCH (model/threads.hpp);
  // "normal": the default policy.
  std::string scheduling = "batch";
};

// Where base models come from: $TAILOR_HOME/models/NAME.safetensors, made by
// `tailorctl pretrain` or, when missing, pre-trained at start with this budget.
struct models_config {
  std::string dir;  // default $TAILOR_HOME/models
  double pretrain_minutes = 10.0;
  int64_t pretrain_steps = 0;  // 0: the budget decides
};

// This instance among the others of its group (design section 6).
struct instance_config {
  // Empty: made up at the first start and kept in <data_dir>/instance-id,
  // so a restart from the same data directory is the same instance.
  std::string id;
  int heartbeat_ms = 2000;  // how often it says it is alive on the state topic
  // An instance not heard from this long is gone: its open jobs are taken
  // over by the live ones. 0: never take over.
  int takeover_after_ms = 30000;
};

struct engine_config {
  kafka_config kafka;
  instance_config instance;
  std::string data_dir;  // RocksDB and artifacts; default $TAILOR_HOME/engine
  bool sync_writes = false;
  // RocksDB's memory: half a block cache every table shares, half the
  // memtables together (storage::store_options). 0: RocksDB's defaults.
  int store_memory_mb = 128;
  // Inference answers (the dedup records a repeated request id is answered
  // from) and history entries older than this go; 0: kept forever.
  int history_retention_days = 30;
  std::string admin_host = "127.0.0.1";
  int admin_port = 8080;   // 0: any free port (printed and written to ready_file)
  // Per-user and per-model request series on /metrics; the rest sum as "(other)".
  int admin_max_user_series = 1000;
  // Set: every admin path but /healthz and /readyz needs "Authorization:
  // Bearer <the file's first line>" (the history holds users' prompts).
  std::string admin_token_file;
  std::string ready_file;  // JSON {admin_port, bootstrap_servers} once ready
  std::vector<std::string> base_models = {"tailor-base"};
  std::string default_base_model = "tailor-base";
  messages::limits limits;
  int user_idle_seconds = 60;
  // After this long without work, the heap malloc holds but no longer uses
  // goes back to the system (and again each minute while idle); 0: never.
  int memory_trim_idle_seconds = 10;
  // tailord's: a stop (SIGTERM, SIGINT, a failure) not done by then ends the
  // process with status 1, logging the step it was stuck at. 0: no limit.
  int stop_timeout_seconds = 120;
  int max_in_flight = 256;  // per input topic; above it the ingress pauses
  std::string log_level = "info";
  std::string artifact_dir;  // adapters and checkpoints; default <data_dir>/artifacts
  training_config training;
  serving_config serving;
  compute_config compute;
  models_config models;
};

// Checks values that no type can: counts, bounds, names; an error message
// naming the key, empty when the configuration is usable.
std::string validate(const engine_config& cfg);

// The admin API's token: the first line of `path`, without surrounding
// blanks. Returns why not, when the file cannot be read or holds none.
// Not part of validate(): a tailorctl user who may read tailord's
// configuration but not its secret still gets its topics and addresses.
std::string read_admin_token(const std::string& path, std::string& token);

// Reads a JSON configuration file over `cfg`; returns an error message naming
// the offending key, empty on success.
std::string load_config_file(const std::string& path, engine_config& cfg);

}  // namespace tailor::actors
