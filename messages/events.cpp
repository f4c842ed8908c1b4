#include "messages/events.hpp"

#include <cmath>
#include <cstdio>
#include <limits>
#include <nlohmann/json.hpp>

#include "messages/ids.hpp"

namespace tailor::messages {

namespace {

using json = nlohmann::json;

// Reads fields of one event object. The first failure wins and is kept in
// `error`; every accessor returns false once there is one, so parsing code is
// a straight line of checks.
class reader {
 public:
  explicit reader(const json& obj) : obj_(obj) {}

  rejection error;
  bool failed() const { return error.code != errc::none; }

  bool fail(errc code, std::string message) {
    if (!failed()) {
      error.code = code;
      error.message = std::move(message);
    }
    return false;
  }

  const json* find(const char* field) const {
    auto it = obj_.find(field);
    if (it == obj_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  bool string(const char* field, std::string& out, bool required, std::size_t max_bytes) {
    if (failed()) return false;
    const json* v = find(field);
    if (!v)
      return required ? fail(errc::missing_field, std::string(field) + ": is required") : true;
    if (!v->is_string()) return fail(errc::wrong_type, std::string(field) + ": must be a string");
    const auto& s = v->get_ref<const std::string&>();
    if (s.size() > max_bytes)
      return fail(errc::too_large,
                  std::string(field) + ": must be at most " + std::to_string(max_bytes) + " bytes");
    out = s;
    return true;
  }

  bool id(const char* field, std::string& out, bool required) {
    if (failed()) return false;
    const json* v = find(field);
    if (!v && !required) return true;
    if (!string(field, out, required, std::numeric_limits<std::size_t>::max())) return false;
    if (!is_valid_id(out))
      return fail(errc::invalid_id,
                  std::string(field) + ": must be 1-128 characters of [A-Za-z0-9._:-]");
    return true;
  }

  bool optional_id(const char* field, std::optional<std::string>& out) {
    if (failed() || !find(field)) return !failed();
    std::string s;
    if (!id(field, s, false)) return false;
    out = std::move(s);
    return true;
  }

  template <class Int>
  bool integer(const char* field, std::optional<Int>& out) {
    if (failed()) return false;
    const json* v = find(field);
    if (!v) return true;
    if (!v->is_number_integer())
      return fail(errc::wrong_type, std::string(field) + ": must be an integer");
    if (v->is_number_unsigned()) {
      auto u = v->get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<Int>::max()))
        return fail(errc::invalid_argument, std::string(field) + ": is too large");
      out = static_cast<Int>(u);
    } else {
      auto i = v->get<int64_t>();
      if constexpr (std::is_unsigned_v<Int>) {
        if (i < 0)
          return fail(errc::invalid_argument, std::string(field) + ": must not be negative");
      }
      out = static_cast<Int>(i);
    }
    return true;
  }

  bool boolean(const char* field, std::optional<bool>& out) {
    if (failed()) return false;
    const json* v = find(field);
    if (!v) return true;
    if (!v->is_boolean()) return fail(errc::wrong_type, std::string(field) + ": must be a boolean");
    out = v->get<bool>();
    return true;
  }

  bool number(const char* field, std::optional<double>& out) {
    if (failed()) return false;
    const json* v = find(field);
    if (!v) return true;
    if (!v->is_number()) return fail(errc::wrong_type, std::string(field) + ": must be a number");
    out = v->get<double>();
    return true;
  }

  bool strings(const char* field, std::vector<std::string>& out, std::size_t max_count,
               std::size_t max_each, std::size_t max_total) {
    if (failed()) return false;
    const json* v = find(field);
    if (!v) return true;
    if (!v->is_array())
      return fail(errc::wrong_type, std::string(field) + ": must be an array of strings");
    if (v->size() > max_count)
      return fail(errc::too_large, std::string(field) + ": must hold at most " +
                                       std::to_string(max_count) + " entries");
    std::size_t total = 0;
    for (std::size_t i = 0; i < v->size(); ++i) {
      const auto& e = (*v)[i];
      std::string name = std::string(field) + "[" + std::to_string(i) + "]";
      if (!e.is_string()) return fail(errc::wrong_type, name + ": must be a string");
      const auto& s = e.get_ref<const std::string&>();
      if (s.size() > max_each)
        return fail(errc::too_large,
                    name + ": must be at most " + std::to_string(max_each) + " bytes");
      total += s.size();
      if (total > max_total)
        return fail(errc::too_large, std::string(field) + ": must total at most " +
                                         std::to_string(max_total) + " bytes");
      out.push_back(s);
    }
    return true;
  }

  const json& obj() const { return obj_; }

 private:
  const json& obj_;
};

template <class T>
bool in_range(reader& r, const char* field, const std::optional<T>& v, T lo, T hi, const char* what,
              errc code = errc::invalid_argument) {
  if (r.failed() || !v) return !r.failed();
  if (*v < lo || *v > hi) {
    std::string msg = std::string(field) + ": must be " + what + " in [";
    if constexpr (std::is_floating_point_v<T>) {
      json bounds = {lo, hi};
      msg += bounds[0].dump() + ", " + bounds[1].dump() + "]";
    } else {
      msg += std::to_string(lo) + ", " + std::to_string(hi) + "]";
    }
    return r.fail(code, msg);
  }
  return true;
}

// A relative path that stays below its base: no root, no "..", no empty name.
bool stays_inside(std::string_view path) {
  if (path.empty() || path.front() == '/') return false;
  std::size_t start = 0;
  while (start <= path.size()) {
    auto end = path.find('/', start);
    if (end == std::string_view::npos) end = path.size();
    auto part = path.substr(start, end - start);
    if (part == "..") return false;
    start = end + 1;
  }
  return path.find('\0') == std::string_view::npos;
}

void parse_hyperparameters(reader& r, const limits& lim, hyperparameters& hp) {
  const json* v = r.find("hyperparameters");
  if (r.failed() || !v) return;
  if (!v->is_object()) {
    r.fail(errc::wrong_type, "hyperparameters: must be an object");
    return;
  }
  reader h(*v);
  h.integer("rank", hp.rank);
  h.number("alpha", hp.alpha);
  h.integer("steps", hp.steps);
  h.number("learning_rate", hp.learning_rate);
  h.integer("batch_size", hp.batch_size);
  h.integer("seed", hp.seed);
  const auto& b = lim.hyperparameters;
  in_range(h, "rank", hp.rank, b.min_rank, b.max_rank, "an integer", errc::out_of_bounds);
  in_range(h, "alpha", hp.alpha, b.min_alpha, b.max_alpha, "a number", errc::out_of_bounds);
  in_range(h, "steps", hp.steps, b.min_steps, b.max_steps, "an integer", errc::out_of_bounds);
  in_range(h, "learning_rate", hp.learning_rate, b.min_learning_rate, b.max_learning_rate,
           "a number", errc::out_of_bounds);
  in_range(h, "batch_size", hp.batch_size, b.min_batch_size, b.max_batch_size, "an integer",
           errc::out_of_bounds);
  if (h.failed()) r.fail(h.error.code, "hyperparameters." + h.error.message);
}

void parse_onboarding(reader& r, const limits& lim, onboarding_request& x) {
  r.id("request_id", x.request_id, true);
  r.optional_id("base_model", x.base_model);
  r.strings("texts", x.texts, lim.max_texts, lim.max_texts_bytes, lim.max_texts_bytes);
  std::string ref;
  bool has_ref = r.find("data_ref") != nullptr;
  if (r.string("data_ref", ref, false, lim.max_data_ref_bytes) && has_ref) x.data_ref = ref;
  bool has_texts = r.find("texts") != nullptr;
  if (!r.failed() && !has_texts && !has_ref)
    r.fail(errc::missing_field, "texts: one of texts or data_ref is required");
  r.strings("prompts", x.prompts, lim.max_prompts, lim.max_prompt_bytes,
            lim.max_prompts * lim.max_prompt_bytes);
  parse_hyperparameters(r, lim, x.hparams);
  if (r.failed() && is_unreadable(r.error.code)) return;
  // From here on the request is readable: what follows is answered to its requester.
  if (!r.failed() && has_texts && has_ref)
    r.fail(errc::invalid_argument, "texts: give either texts or data_ref, not both");
  if (!r.failed() && has_texts && x.texts.empty())
    r.fail(errc::invalid_argument, "texts: must hold at least one text");
  if (!r.failed() && x.data_ref && !stays_inside(*x.data_ref))
    r.fail(errc::path_escape, "data_ref: must be a relative path inside the data directory");
}

void parse_inference(reader& r, const limits& lim, inference_request& x) {
  r.id("request_id", x.request_id, true);
  r.optional_id("model_id", x.model_id);
  r.string("prompt", x.prompt, true, lim.max_prompt_bytes);
  r.integer("max_tokens", x.max_tokens);
  r.number("temperature", x.temperature);
  r.boolean("ignore_end_of_text", x.ignore_end_of_text);
  r.integer("min_tokens", x.min_tokens);
  r.integer("top_k", x.top_k);
  r.number("top_p", x.top_p);
  r.integer("seed", x.seed);
  r.strings("stop", x.stop, lim.max_stops, lim.max_stop_bytes, lim.max_stops * lim.max_stop_bytes);
  if (r.failed() && is_unreadable(r.error.code)) return;
  in_range<int64_t>(r, "max_tokens", x.max_tokens, 1, lim.max_tokens, "an integer");
  in_range<int64_t>(r, "min_tokens", x.min_tokens, 0, lim.max_tokens, "an integer");
  if (!r.failed() && x.min_tokens && x.max_tokens && *x.min_tokens > *x.max_tokens)
    r.fail(errc::invalid_argument, "min_tokens: must not exceed max_tokens (" +
                                       std::to_string(*x.max_tokens) + ")");
  in_range(r, "temperature", x.temperature, 0.0, 10.0, "a number");
  in_range<int64_t>(r, "top_k", x.top_k, 0, 1000000, "an integer");
  if (!r.failed() && x.top_p && !(*x.top_p > 0.0 && *x.top_p <= 1.0))
    r.fail(errc::invalid_argument, "top_p: must be a number in (0, 1]");
  for (std::size_t i = 0; !r.failed() && i < x.stop.size(); ++i)
    if (x.stop[i].empty())
      r.fail(errc::invalid_argument, "stop[" + std::to_string(i) + "]: must not be empty");
}

const char* topic_types(input_topic topic) {
  switch (topic) {
    case input_topic::onboarding: return "onboarding.request";
    case input_topic::inference: return "inference.request";
    case input_topic::control: return "job.cancel, inference.cancel or user.delete";
  }
  return "";
}

}  // namespace

parse_result parse_event(input_topic topic, std::string_view bytes, const limits& lim) {
  rejection rej;
  if (bytes.size() > lim.max_event_bytes) {
    rej.code = errc::too_large;
    rej.message = "event: " + std::to_string(bytes.size()) + " bytes is over the limit of " +
                  std::to_string(lim.max_event_bytes);
    return rej;
  }
  json doc = json::parse(bytes.begin(), bytes.end(), nullptr, false);
  if (doc.is_discarded()) {
    rej.code = errc::invalid_json;
    rej.message = "event: is not valid JSON (UTF-8)";
    return rej;
  }
  if (!doc.is_object()) {
    rej.code = errc::not_an_object;
    rej.message = "event: must be a JSON object";
    return rej;
  }
  reader r(doc);
  std::string type;
  r.string("type", type, true, 64);
  std::optional<int64_t> version;
  if (!r.failed() && !r.find("schema_version"))
    r.fail(errc::missing_field, "schema_version: is required");
  r.integer("schema_version", version);
  if (!r.failed() && *version != schema_version)
    r.fail(errc::unsupported_schema_version,
           "schema_version: " + std::to_string(*version) + " is not supported (expected 1)");
  bool accepted =
      (topic == input_topic::onboarding && type == "onboarding.request") ||
      (topic == input_topic::inference && type == "inference.request") ||
      (topic == input_topic::control &&
       (type == "job.cancel" || type == "inference.cancel" || type == "user.delete"));
  if (!r.failed() && !accepted)
    r.fail(errc::unknown_type,
           "type: '" + type + "' is not accepted here (expected " + topic_types(topic) + ")");
  std::string user_id;
  r.id("user_id", user_id, true);

  parsed_request out;
  std::string request_id;
  if (type == "onboarding.request") {
    onboarding_request x;
    x.user_id = user_id;
    parse_onboarding(r, lim, x);
    request_id = x.request_id;
    out.value = std::move(x);
  } else if (type == "inference.request") {
    inference_request x;
    x.user_id = user_id;
    parse_inference(r, lim, x);
    request_id = x.request_id;
    out.value = std::move(x);
  } else if (type == "job.cancel") {
    job_cancel x{user_id, {}};
    r.id("job_id", x.job_id, true);
    out.value = std::move(x);
  } else if (type == "user.delete") {
    user_delete x{user_id, {}};
    r.id("request_id", x.request_id, true);
    request_id = x.request_id;
    out.value = std::move(x);
  } else {
    inference_cancel x{user_id, {}};
    r.id("request_id", x.request_id, true);
    out.value = std::move(x);
  }
  if (r.failed()) {
    r.error.type = type;
    r.error.user_id = user_id;
    r.error.request_id = request_id;
    if (r.error.answerable()) r.error.payload_hash = fnv1a64(doc.dump());
    return std::move(r.error);
  }
  out.payload_hash = fnv1a64(doc.dump());
  return out;
}

// --- Serialization ------------------------------------------------------------

namespace {

json header(const char* type) {
  return json{{"type", type}, {"schema_version", schema_version}};
}

// To the microsecond: finer is noise, and a double's last digits
// (2.5975669999999997) are noise a reader has to look past.
double to_microsecond(double ms) { return std::round(ms * 1000.0) / 1000.0; }

json error_json(const error_info& e) {
  return json{{"code", to_string(e.code)}, {"message", e.message}};
}

std::string dump(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

// A 64-bit hash as a string: JSON readers need not hold 64-bit integers.
std::string hex64(uint64_t v) {
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(v));
  return hex;
}

bool parse_hex64(const std::string& hex, uint64_t& v) {
  if (hex.size() != 16 || hex.find_first_not_of("0123456789abcdef") != std::string::npos)
    return false;
  v = std::stoull(hex, nullptr, 16);
  return true;
}

}  // namespace

std::string to_json(const inference_result& x) {
  json j = header("inference.result");
  j["request_id"] = x.request_id;
  j["user_id"] = x.user_id;
  if (!x.model_id.empty()) j["model_id"] = x.model_id;
  if (x.error) {
    j["error"] = error_json(*x.error);
  } else {
    j["text"] = repair_utf8(x.text);
    j["finish_reason"] = x.finish_reason;
    const auto& t = x.timings;
    j["timings_ms"] = {{"queue", to_microsecond(t.queue)},
                       {"adapter_load", to_microsecond(t.adapter_load)},
                       {"prefill", to_microsecond(t.prefill)},
                       {"decode", to_microsecond(t.decode)},
                       {"total", to_microsecond(t.total)},
                       {"route", to_microsecond(t.route)}};
    j["usage"] = {{"prompt_tokens", x.usage.prompt_tokens},
                  {"completion_tokens", x.usage.completion_tokens}};
  }
  return dump(j);
}

std::string to_json(const job_event& x) {
  json j = header(x.type.c_str());
  j["job_id"] = x.job_id;
  j["request_id"] = x.request_id;
  j["user_id"] = x.user_id;
  if (x.model_id) j["model_id"] = *x.model_id;
  if (x.progress)
    j["progress"] = {
        {"step", x.progress->step}, {"steps", x.progress->steps}, {"loss", x.progress->loss}};
  if (x.error) j["error"] = error_json(*x.error);
  if (x.training) j["training"] = *x.training;
  return dump(j);
}

std::string dlq_key_of(const std::string& key) {
  return key.size() > dlq_key_max_bytes ? key.substr(0, dlq_key_max_bytes) : key;
}

std::string to_json(const dlq_record& x) {
  json j = header("dlq.record");
  j["error"] = error_json(x.error);
  j["source"] = {{"topic", x.topic}, {"partition", x.partition}, {"offset", x.offset}};
  j["key"] = repair_utf8(dlq_key_of(x.key));
  j["key_bytes"] = x.key.size();
  j["key_truncated"] = x.key.size() > dlq_key_max_bytes;
  // Whole, a large unreadable event's base64 would pass the largest record
  // Kafka takes (1 MB by default), and the DLQ record could never be
  // published: its event would wait for it for good.
  const bool cut = x.payload.size() > dlq_payload_max_bytes;
  j["payload_base64"] = base64_encode(cut ? x.payload.substr(0, dlq_payload_max_bytes) : x.payload);
  j["payload_bytes"] = x.payload.size();
  j["payload_truncated"] = cut;
  return dump(j);
}

std::string to_json(const user_deletion& x) {
  json j = header(x.error ? "user.delete_rejected" : "user.deleted");
  j["user_id"] = x.user_id;
  j["request_id"] = x.request_id;
  if (x.error)
    j["error"] = error_json(*x.error);
  else
    j["deleted"] = {{"models", x.models},
                    {"jobs", x.jobs},
                    {"requests", x.requests},
                    {"history", x.history}};
  return dump(j);
}

outgoing_message to_message(const user_deletion& x) {
  return {channel::events, x.user_id, to_json(x)};
}

outgoing_message to_message(const job_event& x) {
  return {channel::events, x.user_id, to_json(x)};
}

std::string to_json(const model_state& x) {
  const auto& m = x.model;
  json j = header("model.state");
  j.update(json{{"model_id", m.model_id},
                {"user_id", m.user_id},
                {"base_model", m.base_model},
                {"artifact", m.artifact_path},
                {"checksum", m.checksum},
                {"status", m.status},
                {"created_ms", m.created_ms},
                {"job_id", m.job_id}});
  if (m.training.recorded()) j["training"] = m.training;
  if (!x.request_id.empty()) {
    j["request_id"] = x.request_id;
    j["payload_hash"] = hex64(x.payload_hash);
  }
  return dump(j);
}

std::string parse_model_state(std::string_view bytes, model_state& x) {
  json j = json::parse(bytes.begin(), bytes.end(), nullptr, false);
  if (!j.is_object()) return "not a JSON object";
  reader r(j);
  std::string type;
  std::optional<int64_t> version, created;
  auto& m = x.model;
  r.string("type", type, true, 64);
  r.integer("schema_version", version);
  r.id("model_id", m.model_id, true);
  r.id("user_id", m.user_id, true);
  r.string("base_model", m.base_model, true, max_id_length);
  r.string("artifact", m.artifact_path, true, 4096);
  r.string("checksum", m.checksum, true, 128);
  r.string("status", m.status, true, 16);
  r.integer("created_ms", created);
  r.id("job_id", m.job_id, false);
  std::string hash;
  r.id("request_id", x.request_id, false);
  r.string("payload_hash", hash, !x.request_id.empty(), 16);
  if (r.failed()) return r.error.message;
  if (!x.request_id.empty()) {
    if (m.job_id.empty()) return "job_id: is required with request_id";
    if (!parse_hex64(hash, x.payload_hash)) return "payload_hash: must be 16 hexadecimal digits";
  }
  if (type != "model.state") return "type: must be model.state, not " + type;
  if (version != schema_version) return "schema_version: must be 1";
  if (!created) return "created_ms: is required";
  m.created_ms = *created;
  if (m.status != "ready") return "status: must be ready, not " + m.status;
  // Only informative: a malformed one leaves it unrecorded rather than the
  // model unserved on this instance.
  if (auto t = j.find("training"); t != j.end()) {
    try {
      t->get_to(m.training);
    } catch (const json::exception&) {
      m.training = {};
    }
  }
  // Confined to the artifact store: relative, and never climbing out of it.
  const auto& a = m.artifact_path;
  if (a.empty() || a.front() == '/' || a == ".." || a.rfind("../", 0) == 0 ||
      a.find("/../") != std::string::npos || a.ends_with("/.."))
    return "artifact: must be a path inside the artifact store";
  return {};
}

request_record queued_record(const std::string& user_id, const std::string& request_id,
                             uint64_t payload_hash, const std::string& job_id,
                             int64_t created_ms) {
  const job_event queued{"job.queued", job_id,       request_id,  user_id,
                         std::nullopt, std::nullopt, std::nullopt};
  return request_record{user_id, request_id,           "onboarding", payload_hash,
                        job_id,  {to_message(queued)}, created_ms, ""};
}

std::optional<request_record> onboarding_record_of(const model_state& x) {
  if (x.request_id.empty()) return std::nullopt;
  const auto& m = x.model;
  return queued_record(m.user_id, x.request_id, x.payload_hash, m.job_id, m.created_ms);
}

bool is_open_job_state(const std::string& status) {
  return status == "queued" || status == "cancelling";
}

std::string to_json(const job_state_record& x) {
  json j = header("job.state");
  j.update(json{{"owner", x.owner},
                {"status", x.status},
                {"job_id", x.job_id},
                {"request_id", x.request_id},
                {"user_id", x.user_id},
                {"base_model", x.base_model},
                {"payload_hash", hex64(x.payload_hash)},
                {"created_ms", x.created_ms}});
  if (auto request = json::parse(x.request, nullptr, false); request.is_object())
    j["request"] = std::move(request);
  return dump(j);
}

std::string to_json(const instance_alive& x) {
  json j = header("instance.alive");
  j.update(json{{"instance_id", x.instance_id}, {"at_ms", x.at_ms}});
  return dump(j);
}

std::string to_json(const user_erasure_record& x) {
  json j = header("user.erasure");
  j.update(json{{"user_id", x.user_id}, {"owner", x.owner}, {"deleted_ms", x.deleted_ms}});
  return dump(j);
}

std::string state_key_of_user(const std::string& user_id) {
  return "user/" + user_id;
}

std::string state_key_of_job(const std::string& job_id) {
  return "job/" + job_id;
}

std::string state_key_of_instance(const std::string& instance_id) {
  return "instance/" + instance_id;
}

namespace {

std::string parse_job_state(const json& j, job_state_record& x) {
  reader r(j);
  std::optional<int64_t> created;
  std::string hash;
  r.id("owner", x.owner, true);
  r.string("status", x.status, true, 16);
  r.id("job_id", x.job_id, true);
  r.id("request_id", x.request_id, true);
  r.id("user_id", x.user_id, true);
  r.string("base_model", x.base_model, true, max_id_length);
  r.string("payload_hash", hash, true, 16);
  r.integer("created_ms", created);
  if (r.failed()) return r.error.message;
  if (!parse_hex64(hash, x.payload_hash)) return "payload_hash: must be 16 hexadecimal digits";
  if (!created) return "created_ms: is required";
  x.created_ms = *created;
  if (!is_open_job_state(x.status) && x.status != "ready" && x.status != "failed" &&
      x.status != "cancelled")
    return "status: must be queued, cancelling, ready, failed or cancelled, not " + x.status;
  // A queued job's request may be left out (too large to publish): such a
  // job cannot be taken over.
  const auto request = j.find("request");
  if (request != j.end() && !request->is_object()) return "request: must be an object";
  if (x.status == "queued" && request != j.end()) x.request = dump(*request);
  return {};
}

std::string parse_instance_alive(const json& j, instance_alive& x) {
  reader r(j);
  std::optional<int64_t> at;
  r.id("instance_id", x.instance_id, true);
  r.integer("at_ms", at);
  if (r.failed()) return r.error.message;
  if (!at) return "at_ms: is required";
  x.at_ms = *at;
  return {};
}

std::string parse_user_erasure(const json& j, user_erasure_record& x) {
  reader r(j);
  std::optional<int64_t> at;
  r.id("user_id", x.user_id, true);
  r.id("owner", x.owner, true);
  r.integer("deleted_ms", at);
  if (r.failed()) return r.error.message;
  if (!at) return "deleted_ms: is required";
  x.deleted_ms = *at;
  return {};
}

}  // namespace

std::string parse_state_record(std::string_view bytes, state_record& x) {
  json j = json::parse(bytes.begin(), bytes.end(), nullptr, false);
  if (!j.is_object()) return "not a JSON object";
  const auto type = j.find("type");
  if (type == j.end() || !type->is_string()) return "type: is required";
  const auto version = j.find("schema_version");
  const bool known = *type == "model.state" || *type == "job.state" ||
                     *type == "instance.alive" || *type == "user.erasure";
  if (version != j.end() && version->is_number_integer() && version->get<int64_t>() >= 1 &&
      (version->get<int64_t>() > schema_version || !known)) {
    x = newer_state_record{type->get<std::string>(), version->get<int64_t>()};
    return {};
  }
  if (!known)
    return "type: must be model.state, job.state, instance.alive or user.erasure, not " +
           type->get<std::string>();
  if (*type == "model.state") {
    model_state ms;
    auto why = parse_model_state(bytes, ms);
    x = std::move(ms);
    return why;
  }
  if (version == j.end() || *version != schema_version) return "schema_version: must be 1";
  if (*type == "job.state") {
    job_state_record js;
    auto why = parse_job_state(j, js);
    x = std::move(js);
    return why;
  }
  if (*type == "instance.alive") {
    instance_alive ia;
    auto why = parse_instance_alive(j, ia);
    x = std::move(ia);
    return why;
  }
  user_erasure_record ue;
  auto why = parse_user_erasure(j, ue);
  x = std::move(ue);
  return why;
}

std::string to_json(const onboarding_request& x) {
  json j = header("onboarding.request");
  j["request_id"] = x.request_id;
  j["user_id"] = x.user_id;
  if (x.base_model) j["base_model"] = *x.base_model;
  if (x.data_ref)
    j["data_ref"] = *x.data_ref;
  else
    j["texts"] = x.texts;
  json hp = json::object();
  const auto& h = x.hparams;
  if (h.rank) hp["rank"] = *h.rank;
  if (h.alpha) hp["alpha"] = *h.alpha;
  if (h.steps) hp["steps"] = *h.steps;
  if (h.learning_rate) hp["learning_rate"] = *h.learning_rate;
  if (h.batch_size) hp["batch_size"] = *h.batch_size;
  if (h.seed) hp["seed"] = *h.seed;
  if (!hp.empty()) j["hyperparameters"] = hp;
  if (!x.prompts.empty()) j["prompts"] = x.prompts;
  return dump(j);
}

std::string to_json(const inference_request& x) {
  json j = header("inference.request");
  j["request_id"] = x.request_id;
  j["user_id"] = x.user_id;
  if (x.model_id) j["model_id"] = *x.model_id;
  j["prompt"] = x.prompt;
  if (x.max_tokens) j["max_tokens"] = *x.max_tokens;
  if (x.temperature) j["temperature"] = *x.temperature;
  if (x.ignore_end_of_text) j["ignore_end_of_text"] = *x.ignore_end_of_text;
  if (x.min_tokens) j["min_tokens"] = *x.min_tokens;
  if (x.top_k) j["top_k"] = *x.top_k;
  if (x.top_p) j["top_p"] = *x.top_p;
  if (x.seed) j["seed"] = *x.seed;
  if (!x.stop.empty()) j["stop"] = x.stop;
  return dump(j);
}

std::string to_json(const job_cancel& x) {
  json j = header("job.cancel");
  j["user_id"] = x.user_id;
  j["job_id"] = x.job_id;
  return dump(j);
}

std::string to_json(const inference_cancel& x) {
  json j = header("inference.cancel");
  j["user_id"] = x.user_id;
  j["request_id"] = x.request_id;
  return dump(j);
}

std::string to_json(const user_delete& x) {
  json j = header("user.delete");
  j["user_id"] = x.user_id;
  j["request_id"] = x.request_id;
  return dump(j);
}

std::string base64_encode(std::string_view bytes) {
  static constexpr char table[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  std::size_t i = 0;
  for (; i + 2 < bytes.size(); i += 3) {
    uint32_t n = (uint8_t(bytes[i]) << 16) | (uint8_t(bytes[i + 1]) << 8) | uint8_t(bytes[i + 2]);
    out += table[(n >> 18) & 63];
    out += table[(n >> 12) & 63];
    out += table[(n >> 6) & 63];
    out += table[n & 63];
  }
  if (i < bytes.size()) {
    uint32_t n = uint8_t(bytes[i]) << 16;
    if (i + 1 < bytes.size()) n |= uint8_t(bytes[i + 1]) << 8;
    out += table[(n >> 18) & 63];
    out += table[(n >> 12) & 63];
    out += (i + 1 < bytes.size()) ? table[(n >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

std::string repair_utf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  std::size_t i = 0;
  while (i < s.size()) {
    auto c = uint8_t(s[i]);
    std::size_t len = 0;
    uint32_t cp = 0, min = 0;
    if (c < 0x80)
      len = 1, cp = c;
    else if ((c & 0xE0) == 0xC0)
      len = 2, cp = c & 0x1F, min = 0x80;
    else if ((c & 0xF0) == 0xE0)
      len = 3, cp = c & 0x0F, min = 0x800;
    else if ((c & 0xF8) == 0xF0)
      len = 4, cp = c & 0x07, min = 0x10000;
    bool ok = len > 0 && i + len <= s.size();
    for (std::size_t k = 1; ok && k < len; ++k) {
      auto cc = uint8_t(s[i + k]);
      if ((cc & 0xC0) != 0x80)
        ok = false;
      else
        cp = (cp << 6) | (cc & 0x3F);
    }
    if (ok && len > 1 && (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))) ok = false;
    if (ok) {
      out.append(s.substr(i, len));
      i += len;
    } else {
      out += "\xEF\xBF\xBD";
      i += 1;
    }
  }
  return out;
}

uint64_t fnv1a64(std::string_view bytes, uint64_t seed) {
  uint64_t h = seed;
  for (char c : bytes) {
    h ^= uint8_t(c);
    h *= 0x100000001b3ULL;
  }
  return h;
}

}  // namespace tailor::messages
