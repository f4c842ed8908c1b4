#pragma once

#include <caf/meta/type_name.hpp>
#include <chrono>
#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

// Records that storage/ persists and actors/ pass around. Plain fields only,
// so each has a CAF inspect and a JSON form (records.cpp).
namespace tailor::messages {

// Unix time in milliseconds, as records stamp it (created_ms, updated_ms,
// at_ms).
inline int64_t unix_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Where an outgoing event goes; egress maps each to its configured topic.
enum class channel : uint8_t { results = 0, events = 1, dlq = 2, state = 3 };

struct outgoing_message {
  channel to = channel::results;
  std::string key;
  std::string payload;
  // Of an inference result as its GPU actor made it: the milliseconds it
  // reports in the queue, loading its adapter and in batch steps, which
  // the ingress leaves out of the engine's overhead (without parsing the
  // payload again). -1 for any other message, a stored answer among them.
  // Not stored: a record keeps the messages' channel, key and payload.
  double inside_ms = -1;
  // Of the same: the milliseconds it waited for its adapter to be loaded
  // (0: the adapter was resident), for the ingress's latency histogram.
  double adapter_load_ms = -1;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, outgoing_message& x) {
  return f(caf::meta::type_name("outgoing_message"), x.to, x.key, x.payload, x.inside_ms,
           x.adapter_load_ms);
}

// The offset after an input event whose answer goes with it, under
// exactly-once output (kafka.exactly_once): the egress commits it in the
// transaction that carries the answer.
struct input_offset {
  std::string topic;
  int32_t partition = -1;
  int64_t next = -1;  // the offset the group reads next
  // The ingress that read it (group_membership::next_epoch): after a
  // transaction of it aborts, the egress refuses its answers until its
  // successor reads them again.
  uint64_t epoch = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, input_offset& x) {
  return f(caf::meta::type_name("input_offset"), x.topic, x.partition, x.next,
           x.epoch);
}

// Job states; design section 1 and issue 4. Stored as their names.
struct job_record {
  std::string job_id;
  std::string request_id;
  std::string user_id;
  std::string base_model;
  // queued|admitted|training|saving|ready|retrying|failed|cancelled, or moved (taken
  // over by another instance while this one was gone; never run here again)
  std::string status;
  std::string request;  // the onboarding request as received (JSON): data and settings for training
  uint64_t payload_hash = 0;  // the request's, as its dedup record has it
  int64_t attempts = 0;
  int64_t created_ms = 0;
  int64_t updated_ms = 0;
  std::string error_code;
  std::string error_message;
  std::string model_id;
  // The status whose announcement was delivered: after a crash, a job whose
  // final status is not announced yet gets its final events published again.
  std::string announced;
  // The final events of a ready job (model.ready, then the prompts' results),
  // stored with the registration so a re-publish is byte for byte the same.
  std::vector<outgoing_message> outcome;
};

// A job that has ended: ready, failed or cancelled (a `moved` job has not:
// it ended, or still runs, on another instance).
inline bool is_final_job_status(const std::string& status) {
  return status == "ready" || status == "failed" || status == "cancelled";
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, job_record& x) {
  return f(caf::meta::type_name("job_record"), x.job_id, x.request_id, x.user_id, x.base_model,
           x.status, x.request, x.payload_hash, x.attempts, x.created_ms, x.updated_ms,
           x.error_code, x.error_message, x.model_id, x.announced, x.outcome);
}

// How a finished job's training went, on its model.ready and its model's
// record: whether the user's texts made a model that predicts their
// held-out texts better than the base. best_step 0: the untrained adapter
// scored best and was kept (the model answers as the base).
// validation_texts 0: none were held out (a single text), the validation
// figures are 0 and the last step is kept.
struct training_summary {
  int64_t steps = 0;      // steps run
  int64_t best_step = 0;  // the step whose adapter the model is
  int64_t train_texts = 0, validation_texts = 0;
  double loss = 0;  // the last step's training loss (nats per token)
  double validation_loss = 0, base_validation_loss = 0;  // the model's and the base's
  double learning_rate = 0;  // the peak it trained at; 0: not recorded (an older record)

  // Whether it says anything: a model registered without training (as the
  // benchmarks' are) or by a version before it was kept has none.
  bool recorded() const { return steps > 0; }
};

// Its JSON object (docs/events.md); without validation texts, the two
// validation losses are left out. from_json throws on a malformed object.
void to_json(nlohmann::json& j, const training_summary& x);
void from_json(const nlohmann::json& j, training_summary& x);

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, training_summary& x) {
  return f(caf::meta::type_name("training_summary"), x.steps, x.best_step, x.train_texts,
           x.validation_texts, x.loss, x.validation_loss, x.base_validation_loss,
           x.learning_rate);
}

struct model_record {
  std::string model_id;
  std::string user_id;
  std::string base_model;
  std::string artifact_path;
  std::string checksum;
  std::string status;  // ready|deleted
  int64_t created_ms = 0;
  std::string job_id;
  training_summary training{};  // how it was trained, where recorded()
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, model_record& x) {
  return f(caf::meta::type_name("model_record"), x.model_id, x.user_id, x.base_model,
           x.artifact_path, x.checksum, x.status, x.created_ms, x.job_id, x.training);
}

// One handled request, keyed by (user_id, request_id): the dedup entry.
// `answers` are the exact messages published for it, so a redelivered request
// is answered again with identical bytes.
struct request_record {
  std::string user_id;
  std::string request_id;
  std::string kind;  // onboarding|inference
  uint64_t payload_hash = 0;
  std::string job_id;
  std::vector<outgoing_message> answers;
  int64_t created_ms = 0;
  // Exactly-once output: the input event ("topic/partition/offset") whose
  // reading published an onboarding request's job.queued, once that was
  // committed. The same event read again (its offset was not committed
  // with it) then has nothing left to publish. Empty otherwise.
  std::string announced_by;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, request_record& x) {
  return f(caf::meta::type_name("request_record"), x.user_id, x.request_id, x.kind, x.payload_hash,
           x.job_id, x.answers, x.created_ms, x.announced_by);
}

struct history_entry {
  std::string user_id;
  int64_t time_ms = 0;
  std::string request_id;
  std::string input;   // the request's JSON
  std::string output;  // the answer's JSON
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, history_entry& x) {
  return f(caf::meta::type_name("history_entry"), x.user_id, x.time_ms, x.request_id, x.input,
           x.output);
}

std::string to_json(const job_record& x);
std::string to_json(const model_record& x);
std::string to_json(const request_record& x);
std::string to_json(const history_entry& x);
bool from_json(std::string_view s, job_record& x);
bool from_json(std::string_view s, model_record& x);
bool from_json(std::string_view s, request_record& x);
bool from_json(std::string_view s, history_entry& x);

}  // namespace tailor::messages
