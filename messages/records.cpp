#include "messages/records.hpp"

#include <nlohmann/json.hpp>

namespace tailor::messages {

namespace {

using json = nlohmann::json;

std::string dump(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

// Parses `s` and hands the object to `fill`; false on any malformed input.
template <class F>
bool load(std::string_view s, F fill) {
  json j = json::parse(s.begin(), s.end(), nullptr, false);
  if (!j.is_object()) return false;
  try {
    fill(j);
  } catch (const json::exception&) {
    return false;  // edge: a corrupt record is reported, never thrown further
  }
  return true;
}

json messages_json(const std::vector<outgoing_message>& xs) {
  json out = json::array();
  for (const auto& a : xs)
    out.push_back({{"to", static_cast<int>(a.to)}, {"key", a.key}, {"payload", a.payload}});
  return out;
}

void messages_from(const json& j, std::vector<outgoing_message>& out) {
  out.clear();
  for (const auto& a : j) {
    auto to = a.at("to").get<int>();
    if (to < 0 || to > static_cast<int>(channel::state))
      throw json::other_error::create(501, "bad channel", &a);
    out.push_back({static_cast<channel>(to), a.at("key").get<std::string>(),
                   a.at("payload").get<std::string>()});
  }
}

}  // namespace

std::string to_json(const job_record& x) {
  return dump(json{{"job_id", x.job_id},
                   {"request_id", x.request_id},
                   {"user_id", x.user_id},
                   {"base_model", x.base_model},
                   {"status", x.status},
                   {"request", x.request},
                   {"payload_hash", x.payload_hash},
                   {"attempts", x.attempts},
                   {"created_ms", x.created_ms},
                   {"updated_ms", x.updated_ms},
                   {"error_code", x.error_code},
                   {"error_message", x.error_message},
                   {"model_id", x.model_id},
                   {"announced", x.announced},
                   {"outcome", messages_json(x.outcome)}});
}

bool from_json(std::string_view s, job_record& x) {
  return load(s, [&](const json& j) {
    j.at("job_id").get_to(x.job_id);
    j.at("request_id").get_to(x.request_id);
    j.at("user_id").get_to(x.user_id);
    j.at("base_model").get_to(x.base_model);
    j.at("status").get_to(x.status);
    j.at("request").get_to(x.request);
    x.payload_hash = j.value("payload_hash", uint64_t{0});  // absent in older records
    j.at("attempts").get_to(x.attempts);
    j.at("created_ms").get_to(x.created_ms);
    j.at("updated_ms").get_to(x.updated_ms);
    j.at("error_code").get_to(x.error_code);
    j.at("error_message").get_to(x.error_message);
    j.at("model_id").get_to(x.model_id);
    x.announced = j.value("announced", std::string{});
    if (j.contains("outcome")) messages_from(j.at("outcome"), x.outcome);
  });
}

void to_json(json& j, const training_summary& x) {
  j = {{"steps", x.steps},
       {"best_step", x.best_step},
       {"train_texts", x.train_texts},
       {"validation_texts", x.validation_texts},
       {"loss", x.loss}};
  if (x.learning_rate > 0) j["learning_rate"] = x.learning_rate;
  if (x.validation_texts > 0) {
    j["validation_loss"] = x.validation_loss;
    j["base_validation_loss"] = x.base_validation_loss;
  }
}

void from_json(const json& j, training_summary& x) {
  j.at("steps").get_to(x.steps);
  j.at("best_step").get_to(x.best_step);
  j.at("train_texts").get_to(x.train_texts);
  j.at("validation_texts").get_to(x.validation_texts);
  j.at("loss").get_to(x.loss);
  // Records written before it was recorded have none.
  x.learning_rate = j.contains("learning_rate") ? j.at("learning_rate").get<double>() : 0.0;
  x.validation_loss = x.base_validation_loss = 0;
  if (x.validation_texts > 0) {
    j.at("validation_loss").get_to(x.validation_loss);
    j.at("base_validation_loss").get_to(x.base_validation_loss);
  }
}

std::string to_json(const model_record& x) {
  json j{{"model_id", x.model_id},     {"user_id", x.user_id},
         {"base_model", x.base_model}, {"artifact_path", x.artifact_path},
         {"checksum", x.checksum},     {"status", x.status},
         {"created_ms", x.created_ms}, {"job_id", x.job_id}};
  if (x.training.recorded()) j["training"] = x.training;
  return dump(j);
}

bool from_json(std::string_view s, model_record& x) {
  return load(s, [&](const json& j) {
    j.at("model_id").get_to(x.model_id);
    j.at("user_id").get_to(x.user_id);
    j.at("base_model").get_to(x.base_model);
    j.at("artifact_path").get_to(x.artifact_path);
    j.at("checksum").get_to(x.checksum);
    j.at("status").get_to(x.status);
    j.at("created_ms").get_to(x.created_ms);
    j.at("job_id").get_to(x.job_id);
    if (j.contains("training")) j.at("training").get_to(x.training);
  });
}

std::string to_json(const request_record& x) {
  json j{{"user_id", x.user_id},
         {"request_id", x.request_id},
         {"kind", x.kind},
         {"payload_hash", x.payload_hash},
         {"job_id", x.job_id},
         {"answers", messages_json(x.answers)},
         {"created_ms", x.created_ms}};
  if (!x.announced_by.empty()) j["announced_by"] = x.announced_by;
  return dump(j);
}

bool from_json(std::string_view s, request_record& x) {
  return load(s, [&](const json& j) {
    j.at("user_id").get_to(x.user_id);
    j.at("request_id").get_to(x.request_id);
    j.at("kind").get_to(x.kind);
    j.at("payload_hash").get_to(x.payload_hash);
    j.at("job_id").get_to(x.job_id);
    j.at("created_ms").get_to(x.created_ms);
    messages_from(j.at("answers"), x.answers);
    x.announced_by = j.value("announced_by", "");
  });
}

std::string to_json(const history_entry& x) {
  return dump(json{{"user_id", x.user_id},
                   {"time_ms", x.time_ms},
                   {"request_id", x.request_id},
                   {"input", x.input},
                   {"output", x.output}});
}

bool from_json(std::string_view s, history_entry& x) {
  return load(s, [&](const json& j) {
    j.at("user_id").get_to(x.user_id);
    j.at("time_ms").get_to(x.time_ms);
    j.at("request_id").get_to(x.request_id);
    j.at("input").get_to(x.input);
    j.at("output").get_to(x.output);
  });
}

}  // namespace tailor::messages
