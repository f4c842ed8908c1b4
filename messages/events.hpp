#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "messages/errc.hpp"
#include "messages/limits.hpp"
#include "messages/records.hpp"

// The events of design section 3: parsing with validation for what clients
// send, serialization for what Tailor sends. JSON never leaves this folder
// as anything but std::string.
namespace tailor::messages {

inline constexpr int schema_version = 1;

// Which input topic an event came from; each accepts its own types only.
enum class input_topic : uint8_t { onboarding, inference, control };

struct hyperparameters {
  std::optional<int64_t> rank;
  std::optional<double> alpha;
  std::optional<int64_t> steps;
  std::optional<double> learning_rate;
  std::optional<int64_t> batch_size;
  std::optional<uint64_t> seed;
};

struct onboarding_request {
  std::string request_id;
  std::string user_id;
  std::optional<std::string> base_model;
  std::vector<std::string> texts;       // either texts ...
  std::optional<std::string> data_ref;  // ... or a file under the data directory
  hyperparameters hparams;
  std::vector<std::string> prompts;
};

struct inference_request {
  std::string request_id;
  std::string user_id;
  std::optional<std::string> model_id;
  std::string prompt;
  std::optional<int64_t> max_tokens;
  std::optional<double> temperature;
  std::optional<int64_t> top_k;
  std::optional<double> top_p;
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  std::optional<bool> ignore_end_of_text;  // load tests: always generate max_tokens
  std::optional<int64_t> min_tokens;       // tokens before end-of-text or a stop may end it
};

struct job_cancel {
  std::string user_id;
  std::string job_id;
};

struct inference_cancel {
  std::string user_id;
  std::string request_id;
};

// Deletes everything Tailor keeps of the user (docs/events.md).
struct user_delete {
  std::string user_id;
  std::string request_id;
};

using request =
    std::variant<onboarding_request, inference_request, job_cancel, inference_cancel, user_delete>;

// A rejected event. `user_id`/`request_id` are set when the requester could be
// identified and the event had the right shape: then the rejection is answered
// to the requester; otherwise (unreadable) it goes to tailor.dlq.
struct rejection {
  errc code = errc::none;
  std::string message;  // names the field and the reason
  std::string type;     // the event type, when it was readable
  std::string user_id;
  std::string request_id;
  uint64_t payload_hash = 0;  // set when answerable, for dedup
  bool answerable() const { return !is_unreadable(code) && !user_id.empty(); }
};

// A parsed request plus the hash of its canonical JSON (dedup key payload).
struct parsed_request {
  request value;
  uint64_t payload_hash = 0;
};

using parse_result = std::variant<parsed_request, rejection>;

// Parses and validates one event read from `topic`.
parse_result parse_event(input_topic topic, std::string_view bytes, const limits& lim);

// --- What Tailor writes -----------------------------------------------------

struct error_info {
  errc code = errc::none;
  std::string message;
};

struct timings_ms {
  double queue = 0, adapter_load = 0, prefill = 0, decode = 0, total = 0;
  double route = 0;  // from the engine taking the request to its GPU actor taking it
};

struct token_usage {
  int64_t prompt_tokens = 0, completion_tokens = 0;
};

struct inference_result {
  std::string request_id;
  std::string user_id;
  std::string model_id;  // empty when no model was chosen
  std::string text;
  std::string finish_reason;  // stop|length|cancelled|deadline; empty on error
  timings_ms timings;
  token_usage usage;
  std::optional<error_info> error;
};

struct progress_info {
  int64_t step = 0, steps = 0;
  double loss = 0;
};

// type: job.queued|job.admitted|job.training|job.progress|job.saving|
//       job.retrying|job.failed|job.cancelled|model.ready
struct job_event {
  std::string type;
  std::string job_id;
  std::string request_id;
  std::string user_id;
  std::optional<std::string> model_id;
  std::optional<progress_info> progress;
  std::optional<error_info> error;
  std::optional<training_summary> training = std::nullopt;  // model.ready only
};

// The answer to user.delete on tailor.events: user.deleted with what went,
// or user.delete_rejected with the reason.
struct user_deletion {
  std::string user_id;
  std::string request_id;
  uint64_t models = 0, jobs = 0, requests = 0, history = 0;
  std::optional<error_info> error;
};

// The most of an unreadable event's bytes a DLQ record carries; the rest
// stays in its source topic (the record names topic, partition, offset).
constexpr std::size_t dlq_payload_max_bytes = 256 * 1024;
// The most of its Kafka key a DLQ record keeps, as its own key and in the
// record: a key near Kafka's largest record (the producer may send one)
// would make the record too large to publish, and its event would be
// retried for good.
constexpr std::size_t dlq_key_max_bytes = 16 * 1024;
// An event's key as its DLQ record carries it: its first dlq_key_max_bytes.
std::string dlq_key_of(const std::string& key);

struct dlq_record {
  error_info error;
  std::string topic;
  int32_t partition = -1;
  int64_t offset = -1;
  std::string key;
  std::string payload;  // original bytes; base64 on the wire
};

std::string to_json(const inference_result& x);
std::string to_json(const job_event& x);
// A job event as it goes out: on tailor.events, keyed by its user. Every
// job event is made here, so that a stored answer and one made again
// elsewhere are the same bytes.
outgoing_message to_message(const job_event& x);
std::string to_json(const dlq_record& x);
std::string to_json(const user_deletion& x);
outgoing_message to_message(const user_deletion& x);

// Serialize a client request (used by tailorctl and tests).
std::string to_json(const onboarding_request& x);
std::string to_json(const inference_request& x);
std::string to_json(const job_cancel& x);
std::string to_json(const inference_cancel& x);
std::string to_json(const user_delete& x);

// --- What instances share (tailor.state, design section 6) -----------------

// A ready model as another instance of the group needs it to serve the
// model's user. Keyed by model id on a compacted topic, so the topic keeps
// the latest record of every model. `model.artifact_path` is relative to the
// artifact store: each instance resolves it against its own artifact_dir
// (a store the instances share). The onboarding request that made it
// (`request_id`, `payload_hash`; empty and 0 when unknown) lets another
// instance answer a repeat of that request as its first instance did,
// rather than train again.
struct model_state {
  model_record model;
  std::string request_id;
  uint64_t payload_hash = 0;
};

std::string to_json(const model_state& x);
// Parses a tailor.state record: empty on success, else what is wrong with it.
std::string parse_model_state(std::string_view bytes, model_state& x);
// The dedup record of the onboarding request that made the model, as the
// instance that took the request stored it (its answer: job.queued); none
// when the record names no request.
std::optional<request_record> onboarding_record_of(const model_state& x);

// An onboarding job as another instance needs it to take the job over when
// the instance running it (`owner`) is gone. Keyed "job/<job_id>" ('/' is
// in no id, so no key of a model collides). Open while `status` is queued:
// `request` then holds the onboarding request as received (a JSON object);
// a closed job (ready, failed, cancelled) carries no request. `cancelling`
// is still open: a cancel read by another instance than `owner`, passed on
// to it (no request either; whoever would take the job over cancels it).
struct job_state_record {
  std::string owner;
  std::string status;
  std::string job_id;
  std::string request_id;
  std::string user_id;
  std::string base_model;
  std::string request;
  uint64_t payload_hash = 0;
  int64_t created_ms = 0;
};

// An instance's heartbeat, keyed "instance/<instance_id>": an instance not
// heard from for a while is gone, and its open jobs are taken over.
struct instance_alive {
  std::string instance_id;
  int64_t at_ms = 0;
};

// A deleted user, keyed "user/<user_id>": every instance deletes what it
// keeps of them, and keeps none of their models or jobs made before
// `deleted_ms` that it reads afterwards. Stays on the compacted topic.
struct user_erasure_record {
  std::string user_id;
  std::string owner;  // the instance that deleted the user
  int64_t deleted_ms = 0;
};

// Queued or cancelling: the job has not ended.
bool is_open_job_state(const std::string& status);

std::string to_json(const job_state_record& x);
std::string to_json(const instance_alive& x);
std::string to_json(const user_erasure_record& x);
std::string state_key_of_job(const std::string& job_id);
std::string state_key_of_user(const std::string& user_id);
std::string state_key_of_instance(const std::string& instance_id);

// A record this version cannot read because a newer one wrote it: a type
// it does not know, or a schema_version above its own, as another instance
// of the group publishes while a rolling upgrade is under way. Skipped,
// not refused: it is no error of the writer's.
struct newer_state_record {
  std::string type;
  int64_t schema_version = 0;
};

// Any record of tailor.state, by its type.
using state_record = std::variant<model_state, job_state_record, instance_alive,
                                  user_erasure_record, newer_state_record>;
// Parses a tailor.state record: empty on success, else what is wrong with it.
std::string parse_state_record(std::string_view bytes, state_record& x);

// The dedup record of an onboarding request answered with job.queued, as
// the instance that took the request stored it.
request_record queued_record(const std::string& user_id, const std::string& request_id,
                             uint64_t payload_hash, const std::string& job_id,
                             int64_t created_ms);

std::string base64_encode(std::string_view bytes);

// Replaces every invalid UTF-8 sequence with U+FFFD.
std::string repair_utf8(std::string_view bytes);

// FNV-1a 64, stable across builds and machines.
uint64_t fnv1a64(std::string_view bytes, uint64_t seed = 0xcbf29ce484222325ULL);

}  // namespace tailor::messages
