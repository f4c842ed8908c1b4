// Unit tests of messages/: every validation rule of design section 3 and the
// round trips of what Tailor writes.
#include <gtest/gtest.h>

#include <functional>
#include <nlohmann/json.hpp>

#include "messages/events.hpp"
#include "messages/ids.hpp"
#include "messages/records.hpp"

using namespace tailor::messages;
using json = nlohmann::json;

namespace {

limits lim;

json onboarding() {
  return {{"type", "onboarding.request"},
          {"schema_version", 1},
          {"request_id", "r1"},
          {"user_id", "u1"},
          {"texts", {"hello", "world"}}};
}

json inference() {
  return {{"type", "inference.request"},
          {"schema_version", 1},
          {"request_id", "q1"},
          {"user_id", "u1"},
          {"prompt", "hi"}};
}

rejection reject_bytes(input_topic topic, const std::string& bytes) {
  auto r = parse_event(topic, bytes, lim);
  EXPECT_TRUE(std::holds_alternative<rejection>(r)) << bytes;
  return std::holds_alternative<rejection>(r) ? std::get<rejection>(r) : rejection{};
}

rejection reject(input_topic topic, const json& j) {
  return reject_bytes(topic, j.dump());
}

template <class T>
T accept(input_topic topic, const json& j) {
  auto r = parse_event(topic, j.dump(), lim);
  if (auto* rej = std::get_if<rejection>(&r)) {
    ADD_FAILURE() << j.dump() << " rejected: " << rej->message;
    return T{};
  }
  return std::get<T>(std::get<parsed_request>(r).value);
}

}  // namespace

TEST(Ids, AcceptsTheIdAlphabetUpTo128) {
  EXPECT_TRUE(is_valid_id("a"));
  EXPECT_TRUE(is_valid_id("User_1.x:y-z"));
  EXPECT_TRUE(is_valid_id(std::string(128, 'a')));
  EXPECT_FALSE(is_valid_id(""));
  EXPECT_FALSE(is_valid_id(std::string(129, 'a')));
  EXPECT_FALSE(is_valid_id("a b"));
  EXPECT_FALSE(is_valid_id("a#1"));
  EXPECT_FALSE(is_valid_id("a/b"));
  EXPECT_FALSE(is_valid_id("é"));
}

TEST(Parse, UnreadableEventsAreDlqWithCodeAndField) {
  auto r = reject_bytes(input_topic::onboarding, "{not json");
  EXPECT_EQ(r.code, errc::invalid_json);
  EXPECT_FALSE(r.answerable());
  EXPECT_EQ(reject_bytes(input_topic::onboarding, "[1,2]").code, errc::not_an_object);
  EXPECT_EQ(reject_bytes(input_topic::onboarding, "\"x\"").code, errc::not_an_object);

  auto j = onboarding();
  j.erase("type");
  r = reject(input_topic::onboarding, j);
  EXPECT_EQ(r.code, errc::missing_field);
  EXPECT_EQ(r.message, "type: is required");

  j = onboarding();
  j["type"] = 5;
  EXPECT_EQ(reject(input_topic::onboarding, j).code, errc::wrong_type);

  j = onboarding();
  j.erase("schema_version");
  EXPECT_EQ(reject(input_topic::onboarding, j).code, errc::missing_field);
  j["schema_version"] = 2;
  r = reject(input_topic::onboarding, j);
  EXPECT_EQ(r.code, errc::unsupported_schema_version);
  EXPECT_NE(r.message.find("schema_version"), std::string::npos);
  j["schema_version"] = "1";
  EXPECT_EQ(reject(input_topic::onboarding, j).code, errc::wrong_type);
}

TEST(Parse, EachTopicAcceptsOnlyItsTypes) {
  auto r = reject(input_topic::inference, onboarding());
  EXPECT_EQ(r.code, errc::unknown_type);
  EXPECT_NE(r.message.find("inference.request"), std::string::npos);
  EXPECT_EQ(reject(input_topic::onboarding, inference()).code, errc::unknown_type);
  EXPECT_EQ(reject(input_topic::control, inference()).code, errc::unknown_type);
}

TEST(Parse, IdsAreRequiredAndChecked) {
  for (const char* field : {"user_id", "request_id"}) {
    auto j = onboarding();
    j.erase(field);
    auto r = reject(input_topic::onboarding, j);
    EXPECT_EQ(r.code, errc::missing_field) << field;
    EXPECT_EQ(r.message, std::string(field) + ": is required");
    j[field] = "bad id";
    r = reject(input_topic::onboarding, j);
    EXPECT_EQ(r.code, errc::invalid_id) << field;
    EXPECT_FALSE(r.answerable());
    j[field] = 7;
    EXPECT_EQ(reject(input_topic::onboarding, j).code, errc::wrong_type);
    j[field] = "x#1";  // '#' is reserved for generated ids
    EXPECT_EQ(reject(input_topic::onboarding, j).code, errc::invalid_id);
  }
  auto j = inference();
  j["model_id"] = "";
  EXPECT_EQ(reject(input_topic::inference, j).code, errc::invalid_id);
  j = onboarding();
  j["base_model"] = "a/b";
  EXPECT_EQ(reject(input_topic::onboarding, j).code, errc::invalid_id);
}

TEST(Parse, OnboardingAcceptsAFullRequest) {
  auto j = onboarding();
  j["base_model"] = "tiny";
  j["prompts"] = {"p1"};
  j["hyperparameters"] = {{"rank", 8},       {"alpha", 16.0},
                          {"steps", 100},    {"learning_rate", 0.001},
                          {"batch_size", 8}, {"seed", 42}};
  auto x = accept<onboarding_request>(input_topic::onboarding, j);
  EXPECT_EQ(x.user_id, "u1");
  EXPECT_EQ(x.request_id, "r1");
  EXPECT_EQ(x.base_model.value_or(""), "tiny");
  EXPECT_EQ(x.texts, (std::vector<std::string>{"hello", "world"}));
  EXPECT_EQ(x.prompts, std::vector<std::string>{"p1"});
  EXPECT_EQ(x.hparams.rank.value_or(0), 8);
  EXPECT_DOUBLE_EQ(x.hparams.alpha.value_or(0), 16.0);
  EXPECT_EQ(x.hparams.steps.value_or(0), 100);
  EXPECT_EQ(x.hparams.batch_size.value_or(0), 8);
  EXPECT_EQ(x.hparams.seed.value_or(0), 42u);
  // Serializing and parsing again gives the same request.
  auto again = accept<onboarding_request>(input_topic::onboarding, json::parse(to_json(x)));
  EXPECT_EQ(to_json(again), to_json(x));
}

TEST(Parse, OnboardingDataRules) {
  auto j = onboarding();
  j.erase("texts");
  auto r = reject(input_topic::onboarding, j);
  EXPECT_EQ(r.code, errc::missing_field);
  EXPECT_NE(r.message.find("data_ref"), std::string::npos);

  j["data_ref"] = "users/u1.txt";
  EXPECT_EQ(accept<onboarding_request>(input_topic::onboarding, j).data_ref.value_or(""),
            "users/u1.txt");

  j["texts"] = {"a"};
  r = reject(input_topic::onboarding, j);
  EXPECT_EQ(r.code, errc::invalid_argument);
  EXPECT_TRUE(r.answerable());
  EXPECT_EQ(r.user_id, "u1");
  EXPECT_EQ(r.request_id, "r1");

  for (const char* escape : {"../x", "/etc/passwd", "a/../../b", "a/.."}) {
    auto k = onboarding();
    k.erase("texts");
    k["data_ref"] = escape;
    r = reject(input_topic::onboarding, k);
    EXPECT_EQ(r.code, errc::path_escape) << escape;
    EXPECT_TRUE(r.answerable());
  }

  j = onboarding();
  j["texts"] = json::array();
  EXPECT_EQ(reject(input_topic::onboarding, j).code, errc::invalid_argument);
  j["texts"] = {"a", 3};
  r = reject(input_topic::onboarding, j);
  EXPECT_EQ(r.code, errc::wrong_type);
  EXPECT_EQ(r.message, "texts[1]: must be a string");
  j["texts"] = "a";
  EXPECT_EQ(reject(input_topic::onboarding, j).code, errc::wrong_type);
  j["texts"] = {std::string(lim.max_texts_bytes + 1, 'x')};
  EXPECT_EQ(reject(input_topic::onboarding, j).code, errc::too_large);
  j = onboarding();
  j["prompts"] = json::array();
  for (std::size_t i = 0; i <= lim.max_prompts; ++i) j["prompts"].push_back("p");
  EXPECT_EQ(reject(input_topic::onboarding, j).code, errc::too_large);
}

TEST(Parse, HyperparametersTypesAndBounds) {
  auto j = onboarding();
  j["hyperparameters"] = 3;
  EXPECT_EQ(reject(input_topic::onboarding, j).code, errc::wrong_type);
  j["hyperparameters"] = {{"rank", "8"}};
  auto r = reject(input_topic::onboarding, j);
  EXPECT_EQ(r.code, errc::wrong_type);
  EXPECT_EQ(r.message, "hyperparameters.rank: must be an integer");
  j["hyperparameters"] = {{"rank", 8.5}};
  EXPECT_EQ(reject(input_topic::onboarding, j).code, errc::wrong_type);
  j["hyperparameters"] = {{"learning_rate", "fast"}};
  EXPECT_EQ(reject(input_topic::onboarding, j).code, errc::wrong_type);

  const auto& b = lim.hyperparameters;
  std::vector<std::pair<std::string, json>> out_of_bounds = {{"rank", b.max_rank + 1},
                                                             {"rank", 0},
                                                             {"alpha", -1.0},
                                                             {"steps", b.max_steps + 1},
                                                             {"learning_rate", 2.0},
                                                             {"batch_size", 0},
                                                             {"batch_size", b.max_batch_size + 1}};
  for (const auto& [field, value] : out_of_bounds) {
    j["hyperparameters"] = {{field, value}};
    r = reject(input_topic::onboarding, j);
    EXPECT_EQ(r.code, errc::out_of_bounds) << field << "=" << value;
    EXPECT_TRUE(r.answerable());
    EXPECT_EQ(r.message.rfind("hyperparameters." + field + ": must be", 0), 0u) << r.message;
  }
  j["hyperparameters"] = {{"rank", 65}};
  r = reject(input_topic::onboarding, j);
  EXPECT_EQ(r.message, "hyperparameters.rank: must be an integer in [1, 16]");
  j["hyperparameters"] = {{"seed", -1}};
  EXPECT_EQ(reject(input_topic::onboarding, j).code, errc::invalid_argument);
}

TEST(Parse, InferenceFieldsAndRanges) {
  auto j = inference();
  j["model_id"] = "m1";
  j["max_tokens"] = 64;
  j["min_tokens"] = 8;
  j["temperature"] = 0.7;
  j["top_k"] = 40;
  j["top_p"] = 0.9;
  j["seed"] = 7;
  j["stop"] = {"\n\n"};
  auto x = accept<inference_request>(input_topic::inference, j);
  EXPECT_EQ(x.prompt, "hi");
  EXPECT_EQ(x.model_id.value_or(""), "m1");
  EXPECT_EQ(x.max_tokens.value_or(0), 64);
  EXPECT_EQ(x.min_tokens.value_or(0), 8);
  EXPECT_EQ(x.top_k.value_or(0), 40);
  EXPECT_EQ(x.seed.value_or(0), 7u);
  EXPECT_EQ(x.stop, std::vector<std::string>{"\n\n"});
  auto again = accept<inference_request>(input_topic::inference, json::parse(to_json(x)));
  EXPECT_EQ(to_json(again), to_json(x));

  j = inference();
  j.erase("prompt");
  EXPECT_EQ(reject(input_topic::inference, j).code, errc::missing_field);
  j["prompt"] = std::string(lim.max_prompt_bytes + 1, 'p');
  EXPECT_EQ(reject(input_topic::inference, j).code, errc::too_large);

  j = inference();
  j["max_tokens"] = "10";
  EXPECT_EQ(reject(input_topic::inference, j).code, errc::wrong_type);
  for (int bad : {0, 4097}) {
    j["max_tokens"] = bad;
    auto r = reject(input_topic::inference, j);
    EXPECT_EQ(r.code, errc::invalid_argument);
    EXPECT_EQ(r.message, "max_tokens: must be an integer in [1, 4096]");
    EXPECT_TRUE(r.answerable());
  }
  // min_tokens: 0 up to max_tokens, and up to the limit without one.
  j = inference();
  j["min_tokens"] = 4096;
  EXPECT_EQ(accept<inference_request>(input_topic::inference, j).min_tokens.value_or(0), 4096);
  j["min_tokens"] = -1;
  EXPECT_EQ(reject(input_topic::inference, j).message,
            "min_tokens: must be an integer in [0, 4096]");
  j["min_tokens"] = 1.5;
  EXPECT_EQ(reject(input_topic::inference, j).code, errc::wrong_type);
  j["max_tokens"] = 10;
  j["min_tokens"] = 10;
  EXPECT_EQ(accept<inference_request>(input_topic::inference, j).min_tokens.value_or(0), 10);
  j["min_tokens"] = 11;
  auto over = reject(input_topic::inference, j);
  EXPECT_EQ(over.code, errc::invalid_argument);
  EXPECT_EQ(over.message, "min_tokens: must not exceed max_tokens (10)");
  EXPECT_TRUE(over.answerable());
  j = inference();
  j["temperature"] = -0.1;
  EXPECT_EQ(reject(input_topic::inference, j).code, errc::invalid_argument);
  j = inference();
  j["top_p"] = 0.0;
  EXPECT_EQ(reject(input_topic::inference, j).message, "top_p: must be a number in (0, 1]");
  j = inference();
  j["top_k"] = -1;
  EXPECT_EQ(reject(input_topic::inference, j).code, errc::invalid_argument);
  j = inference();
  j["stop"] = {""};
  EXPECT_EQ(reject(input_topic::inference, j).code, errc::invalid_argument);
  j["stop"] = {"a", "b", "c", "d", "e"};
  EXPECT_EQ(reject(input_topic::inference, j).code, errc::too_large);
}

TEST(Parse, ControlEvents) {
  json c = {{"type", "job.cancel"}, {"schema_version", 1}, {"user_id", "u1"}, {"job_id", "j1"}};
  auto jc = accept<job_cancel>(input_topic::control, c);
  EXPECT_EQ(jc.job_id, "j1");
  c.erase("job_id");
  EXPECT_EQ(reject(input_topic::control, c).code, errc::missing_field);
  json ic = {
      {"type", "inference.cancel"}, {"schema_version", 1}, {"user_id", "u1"}, {"request_id", "q1"}};
  EXPECT_EQ(accept<inference_cancel>(input_topic::control, ic).request_id, "q1");
  EXPECT_EQ(to_json(accept<inference_cancel>(input_topic::control, ic)), ic.dump());
  json del = {
      {"type", "user.delete"}, {"schema_version", 1}, {"user_id", "u1"}, {"request_id", "d1"}};
  EXPECT_EQ(accept<user_delete>(input_topic::control, del).request_id, "d1");
  EXPECT_EQ(to_json(accept<user_delete>(input_topic::control, del)), del.dump());
  EXPECT_EQ(reject(input_topic::inference, del).code, errc::unknown_type) << "control only";
  del.erase("request_id");
  EXPECT_EQ(reject(input_topic::control, del).code, errc::missing_field);
}

// The answers to user.delete and the erasure record other instances read.
TEST(Serialize, UserDeletion) {
  user_deletion d{"u1", "d1", 1, 2, 3, 4, std::nullopt};
  const auto done = json::parse(to_json(d));
  EXPECT_EQ(done["type"], "user.deleted");
  EXPECT_EQ(done["deleted"], json({{"models", 1}, {"jobs", 2}, {"requests", 3}, {"history", 4}}));
  EXPECT_EQ(to_message(d).to, channel::events);
  EXPECT_EQ(to_message(d).key, "u1");
  d.error = error_info{errc::unavailable, "busy"};
  const auto refused = json::parse(to_json(d));
  EXPECT_EQ(refused["type"], "user.delete_rejected");
  EXPECT_EQ(refused["error"]["code"], "unavailable");
  EXPECT_FALSE(refused.contains("deleted"));
  EXPECT_EQ(to_string(errc::user_deleted), "user_deleted");
  EXPECT_FALSE(is_unreadable(errc::user_deleted));
  // A stored job's error code reads back as the code it was, the last ones too.
  for (auto c : {errc::invalid_json, errc::prompt_too_long, errc::user_deleted,
                 errc::storage_full})
    EXPECT_EQ(errc_of(to_string(c)), c) << to_string(c);
  EXPECT_EQ(errc_of("no such code"), errc::internal);
  state_record any;
  ASSERT_EQ(parse_state_record(to_json(user_erasure_record{"u1", "tailord-a", 99}), any), "");
  ASSERT_TRUE(std::holds_alternative<user_erasure_record>(any));
  EXPECT_EQ(std::get<user_erasure_record>(any).deleted_ms, 99);
  EXPECT_EQ(std::get<user_erasure_record>(any).owner, "tailord-a");
  EXPECT_EQ(state_key_of_user("u1"), "user/u1");
  auto j = json::parse(to_json(user_erasure_record{"u1", "tailord-a", 99}));
  j.erase("deleted_ms");
  EXPECT_NE(parse_state_record(j.dump(), any).find("deleted_ms"), std::string::npos);
}

TEST(Parse, EventSizeLimit) {
  limits small;
  small.max_event_bytes = 64;
  auto j = onboarding();
  j["texts"] = {std::string(100, 'x')};
  auto r = parse_event(input_topic::onboarding, j.dump(), small);
  ASSERT_TRUE(std::holds_alternative<rejection>(r));
  EXPECT_EQ(std::get<rejection>(r).code, errc::too_large);
}

TEST(Parse, PayloadHashIgnoresKeyOrderButNotContent) {
  std::string a =
      R"({"type":"inference.request","schema_version":1,"request_id":"q","user_id":"u","prompt":"x"})";
  std::string b =
      R"({"prompt":"x","user_id":"u","request_id":"q","schema_version":1,"type":"inference.request"})";
  std::string c =
      R"({"type":"inference.request","schema_version":1,"request_id":"q","user_id":"u","prompt":"y"})";
  auto h = [](const std::string& s) {
    return std::get<parsed_request>(parse_event(input_topic::inference, s, lim)).payload_hash;
  };
  EXPECT_EQ(h(a), h(b));
  EXPECT_NE(h(a), h(c));
}

TEST(Write, ResultsEventsAndDlqCarryTheContractFields) {
  inference_result ok{"q1", "u1", "m1", "hello", "stop", {1, 2, 3, 4, 10}, {6, 5}, std::nullopt};
  auto j = json::parse(to_json(ok));
  EXPECT_EQ(j["type"], "inference.result");
  EXPECT_EQ(j["schema_version"], 1);
  EXPECT_EQ(j["text"], "hello");
  EXPECT_EQ(j["finish_reason"], "stop");
  EXPECT_EQ(j["timings_ms"]["total"], 10.0);
  // Timings to the microsecond, without a double's trailing noise.
  ok.timings.decode = 2.5975669999999997;
  ok.timings.queue = 0.40074800000000005;
  const auto text = to_json(ok);
  EXPECT_NE(text.find(R"("decode":2.598,)"), std::string::npos) << text;
  EXPECT_NE(text.find(R"("queue":0.401,)"), std::string::npos) << text;
  EXPECT_EQ(j["usage"]["prompt_tokens"], 6);
  EXPECT_EQ(j["usage"]["completion_tokens"], 5);

  inference_result err{
      "q1", "u1", "", "",
      "",   {},   {}, error_info{errc::no_ready_model, "user u1 has no ready model"}};
  j = json::parse(to_json(err));
  EXPECT_EQ(j["error"]["code"], "no_ready_model");
  EXPECT_EQ(j["error"]["message"], "user u1 has no ready model");
  EXPECT_FALSE(j.contains("text"));
  EXPECT_FALSE(j.contains("usage"));

  job_event ev{"job.failed",
               "j1",
               "r1",
               "u1",
               std::nullopt,
               std::nullopt,
               error_info{errc::out_of_bounds, "hyperparameters.rank: ..."}};
  j = json::parse(to_json(ev));
  EXPECT_EQ(j["type"], "job.failed");
  EXPECT_EQ(j["job_id"], "j1");
  EXPECT_EQ(j["error"]["code"], "out_of_bounds");
  job_event prog{"job.progress", "j1", "r1", "u1", std::nullopt, progress_info{3, 10, 1.5},
                 std::nullopt};
  EXPECT_EQ(json::parse(to_json(prog))["progress"]["steps"], 10);
  EXPECT_FALSE(json::parse(to_json(prog)).contains("training"));
  // model.ready says how training went; without held-out texts, it has no
  // validation figures rather than zeros that read as a perfect model.
  job_event ready{"model.ready", "j1", "r1", "u1", "m1", std::nullopt, std::nullopt,
                  training_summary{100, 0, 1, 1, 0.25, 2.5, 2.5, 0.003}};
  j = json::parse(to_json(ready));
  EXPECT_EQ(j["model_id"], "m1");
  EXPECT_EQ(j["training"], json::parse(R"({"steps":100,"best_step":0,"train_texts":1,
      "validation_texts":1,"loss":0.25,"validation_loss":2.5,"base_validation_loss":2.5,
      "learning_rate":0.003})"));
  ready.training = training_summary{100, 100, 1, 0, 0.5, 0, 0, 0};
  EXPECT_EQ(json::parse(to_json(ready))["training"],
            json::parse(R"({"steps":100,"best_step":100,"train_texts":1,"validation_texts":0,
      "loss":0.5})"));

  dlq_record d;
  d.error = {errc::invalid_json, "event: is not valid JSON"};
  d.topic = "tailor.inference";
  d.partition = 2;
  d.offset = 17;
  d.key = "k";
  d.payload = "\xff{";
  j = json::parse(to_json(d));
  EXPECT_EQ(j["type"], "dlq.record");
  EXPECT_EQ(j["source"]["topic"], "tailor.inference");
  EXPECT_EQ(j["source"]["partition"], 2);
  EXPECT_EQ(j["source"]["offset"], 17);
  EXPECT_EQ(j["payload_base64"], "/3s=");
  EXPECT_EQ(j["payload_bytes"], 2);
  EXPECT_EQ(j["payload_truncated"], false);
  EXPECT_EQ(j["key"], "k");
  EXPECT_EQ(j["key_bytes"], 1);
  EXPECT_EQ(j["key_truncated"], false);
  // A key as large as a record: its first dlq_key_max_bytes, there and as
  // the record's own Kafka key.
  d.key = std::string(dlq_key_max_bytes, 'k') + std::string(900 * 1024, 'l');
  j = json::parse(to_json(d));
  EXPECT_EQ(j["key"], std::string(dlq_key_max_bytes, 'k'));
  EXPECT_EQ(j["key_bytes"], d.key.size());
  EXPECT_EQ(j["key_truncated"], true);
  EXPECT_EQ(dlq_key_of(d.key), std::string(dlq_key_max_bytes, 'k'));
  EXPECT_EQ(dlq_key_of("k"), "k");
  d.key = "k";
  // A large event: its first dlq_payload_max_bytes, and a record that a
  // broker takes (under 1 MB).
  d.payload = std::string(dlq_payload_max_bytes, 'a') + std::string(700 * 1024, 'b');
  const auto big = to_json(d);
  EXPECT_LT(big.size(), 1000000u);
  j = json::parse(big);
  EXPECT_EQ(j["payload_bytes"], d.payload.size());
  EXPECT_EQ(j["payload_truncated"], true);
  d.payload.resize(dlq_payload_max_bytes);
  EXPECT_EQ(json::parse(to_json(d))["payload_base64"], j["payload_base64"]);
}

TEST(Write, Base64) {
  EXPECT_EQ(base64_encode(""), "");
  EXPECT_EQ(base64_encode("f"), "Zg==");
  EXPECT_EQ(base64_encode("fo"), "Zm8=");
  EXPECT_EQ(base64_encode("foo"), "Zm9v");
  EXPECT_EQ(base64_encode("foobar"), "Zm9vYmFy");
}

TEST(Write, InvalidUtf8IsRepaired) {
  EXPECT_EQ(repair_utf8("abc"), "abc");
  EXPECT_EQ(repair_utf8("h\xc3\xa9"), "h\xc3\xa9");
  EXPECT_EQ(repair_utf8("a\xff"
                        "b"),
            "a\xEF\xBF\xBD"
            "b");
  EXPECT_EQ(repair_utf8("\xc3"), "\xEF\xBF\xBD");                                  // truncated
  EXPECT_EQ(repair_utf8("\xc0\xaf"), "\xEF\xBF\xBD\xEF\xBF\xBD");                  // overlong
  EXPECT_EQ(repair_utf8("\xed\xa0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate
  inference_result r{"q", "u", "m", "bad\xfe", "stop", {}, {}, std::nullopt};
  EXPECT_EQ(json::parse(to_json(r))["text"], "bad\xEF\xBF\xBD");
}

TEST(Records, RoundTripThroughJson) {
  request_record rr{
      "u1",         "r1",
      "onboarding", 0xdeadbeefcafef00dULL,
      "j1",         {{channel::events, "u1", "{\"a\":1}"}, {channel::results, "u1", "x"}},
      123,          ""};
  request_record back;
  ASSERT_TRUE(from_json(to_json(rr), back));
  EXPECT_EQ(to_json(back), to_json(rr));
  EXPECT_EQ(back.payload_hash, rr.payload_hash);
  ASSERT_EQ(back.answers.size(), 2u);
  EXPECT_EQ(back.answers[0].to, channel::events);
  job_record jr;
  EXPECT_FALSE(from_json("{}", jr));
  EXPECT_FALSE(from_json("nope", jr));
}

// A model's record keeps how it was trained (model.ready's `training`), in
// the store and on tailor.state; records of an older version have none.
TEST(Records, AModelKeepsHowItWasTrainedAndOlderRecordsReadWithout) {
  model_record m{"model-1", "u1", "tiny", "adapters/u1/model-1.safetensors", "sha256:ab", "ready",
                 42, "job-1", training_summary{100, 40, 18, 2, 1.25, 1.75, 2.0, 0.0015}};
  auto j = json::parse(to_json(m));
  EXPECT_EQ(j["training"], json::parse(R"({"steps":100,"best_step":40,"train_texts":18,
      "validation_texts":2,"loss":1.25,"validation_loss":1.75,"base_validation_loss":2.0,
      "learning_rate":0.0015})"));
  model_record back;
  ASSERT_TRUE(from_json(to_json(m), back));
  EXPECT_EQ(back.training.best_step, 40);
  EXPECT_EQ(back.training.base_validation_loss, 2.0);
  EXPECT_EQ(back.training.learning_rate, 0.0015);
  EXPECT_EQ(to_json(back), to_json(m));
  // Written before the learning rate was recorded: read without it.
  auto before_rate = j;
  before_rate["training"].erase("learning_rate");
  ASSERT_TRUE(from_json(before_rate.dump(), back = {}));
  EXPECT_EQ(back.training.best_step, 40);
  EXPECT_EQ(back.training.learning_rate, 0.0);
  EXPECT_FALSE(json::parse(to_json(back))["training"].contains("learning_rate"));
  j.erase("training");  // as an older version wrote it
  ASSERT_TRUE(from_json(j.dump(), back = {}));
  EXPECT_EQ(back.training.steps, 0);
  EXPECT_FALSE(json::parse(to_json(back)).contains("training"));
  // A single text: nothing held out, no validation losses.
  m.training = {100, 100, 1, 0, 0.5, 0, 0, 0.003};
  ASSERT_TRUE(from_json(to_json(m), back = {}));
  EXPECT_EQ(back.training.validation_texts, 0);
  EXPECT_FALSE(json::parse(to_json(back))["training"].contains("validation_loss"));

  m.training = {100, 40, 18, 2, 1.25, 1.75, 2.0, 0.0015};
  model_state ms{m, "signup", 7};
  model_state read;
  ASSERT_EQ(parse_model_state(to_json(ms), read), "");
  EXPECT_EQ(to_json(read.model), to_json(m));
  // Only informative there: a malformed one leaves it unrecorded, and the
  // model is still read (and served).
  auto state = json::parse(to_json(ms));
  state["training"].erase("loss");
  ASSERT_EQ(parse_model_state(state.dump(), read = {}), "");
  EXPECT_EQ(read.model.model_id, "model-1");
  EXPECT_EQ(read.model.training.steps, 0);
  state["training"] = "much";
  ASSERT_EQ(parse_model_state(state.dump(), read = {}), "");
  EXPECT_EQ(read.model.training.steps, 0);
}

// What instances share on tailor.state: a ready model, its artifact relative
// to the artifact store. A record that could make an instance read outside
// its store, or that is not a ready model, is refused with the reason.
TEST(Records, AModelStateRecordRoundTripsAndStaysInsideTheArtifactStore) {
  model_state ms{{"model-1", "u1", "tiny", "adapters/u1/model-1.safetensors", "sha256:ab",
                  "ready", 42, "job-1"},
                 "signup",
                 0xfedcba9876543210ULL};
  model_state back;
  ASSERT_EQ(parse_model_state(to_json(ms), back), "");
  EXPECT_EQ(to_json(back.model), to_json(ms.model));
  EXPECT_EQ(back.request_id, "signup");
  EXPECT_EQ(back.payload_hash, 0xfedcba9876543210ULL) << "all 64 bits, through a JSON string";
  EXPECT_EQ(to_json(back), to_json(ms));
  // The dedup record another instance stores for the request that made it.
  const auto made_by = onboarding_record_of(back);
  ASSERT_TRUE(made_by);
  EXPECT_EQ(made_by->user_id, "u1");
  EXPECT_EQ(made_by->request_id, "signup");
  EXPECT_EQ(made_by->payload_hash, 0xfedcba9876543210ULL);
  EXPECT_EQ(made_by->job_id, "job-1");
  ASSERT_EQ(made_by->answers.size(), 1u);
  EXPECT_EQ(json::parse(made_by->answers[0].payload)["type"], "job.queued");
  model_state unknown{ms.model, "", 0};  // a model not made by a known request
  ASSERT_EQ(parse_model_state(to_json(unknown), back = {}), "");
  EXPECT_EQ(back.request_id, "");
  EXPECT_FALSE(onboarding_record_of(back));
  auto refused = [&](const std::function<void(json&)>& change) {
    auto j = json::parse(to_json(ms));
    change(j);
    model_state x;
    return parse_model_state(j.dump(), x);
  };
  EXPECT_NE(refused([](json& j) { j["artifact"] = "/etc/passwd"; }).find("artifact"),
            std::string::npos);
  EXPECT_NE(refused([](json& j) { j["artifact"] = "adapters/../../x"; }).find("artifact"),
            std::string::npos);
  EXPECT_NE(refused([](json& j) { j["artifact"] = ".."; }).find("artifact"), std::string::npos);
  EXPECT_NE(refused([](json& j) { j["status"] = "deleted"; }).find("status"), std::string::npos);
  EXPECT_NE(refused([](json& j) { j["type"] = "model.ready"; }).find("type"), std::string::npos);
  EXPECT_NE(refused([](json& j) { j["schema_version"] = 2; }).find("schema_version"),
            std::string::npos);
  EXPECT_NE(refused([](json& j) { j.erase("created_ms"); }).find("created_ms"), std::string::npos);
  EXPECT_NE(refused([](json& j) { j["user_id"] = "a b"; }).find("user_id"), std::string::npos);
  EXPECT_NE(refused([](json& j) { j["payload_hash"] = "xyz"; }).find("payload_hash"),
            std::string::npos);
  EXPECT_NE(refused([](json& j) { j.erase("payload_hash"); }).find("payload_hash"),
            std::string::npos);
  model_state x;
  EXPECT_EQ(parse_model_state("nope", x), "not a JSON object");
}

// The other records of tailor.state: a job as another instance needs it to
// take the job over (its request while open, nothing of it once closed),
// and an instance's heartbeat. Any record parses by its type.
TEST(Records, JobStateAndHeartbeatRecordsRoundTripAndParseByType) {
  onboarding_request req;
  req.request_id = "signup";
  req.user_id = "u1";
  req.texts = {"hello", "world"};
  job_state_record open{"tailord-a", "queued", "job-1", "signup", "u1", "tiny", to_json(req),
                        0x8000000000000001ULL, 42};
  state_record any;
  ASSERT_EQ(parse_state_record(to_json(open), any), "");
  ASSERT_TRUE(std::holds_alternative<job_state_record>(any));
  auto back = std::get<job_state_record>(any);
  EXPECT_EQ(to_json(back), to_json(open));
  EXPECT_EQ(back.payload_hash, 0x8000000000000001ULL);
  EXPECT_EQ(json::parse(back.request), json::parse(to_json(req))) << "the request, to run it";
  EXPECT_TRUE(json::parse(to_json(open))["request"].is_object()) << "readable with kcat";
  auto closed = open;
  closed.status = "ready";
  closed.request.clear();
  ASSERT_EQ(parse_state_record(to_json(closed), any), "");
  EXPECT_EQ(std::get<job_state_record>(any).status, "ready");
  EXPECT_FALSE(json::parse(to_json(closed)).contains("request"));
  EXPECT_EQ(state_key_of_job("job-1"), "job/job-1") << "no model id has a '/'";
  instance_alive alive{"tailord-a", 1234567};
  ASSERT_EQ(parse_state_record(to_json(alive), any), "");
  ASSERT_TRUE(std::holds_alternative<instance_alive>(any));
  EXPECT_EQ(std::get<instance_alive>(any).instance_id, "tailord-a");
  EXPECT_EQ(std::get<instance_alive>(any).at_ms, 1234567);
  EXPECT_EQ(state_key_of_instance("tailord-a"), "instance/tailord-a");
  model_state ms{{"model-1", "u1", "tiny", "a/m.safetensors", "sha256:ab", "ready", 42, "job-1"},
                 "",
                 0};
  ASSERT_EQ(parse_state_record(to_json(ms), any), "");
  EXPECT_TRUE(std::holds_alternative<model_state>(any));
  // The queued answer an instance stores for the request of a job it takes over.
  const auto made_by = queued_record("u1", "signup", 7, "job-1", 42);
  EXPECT_EQ(made_by.kind, "onboarding");
  ASSERT_EQ(made_by.answers.size(), 1u);
  EXPECT_EQ(json::parse(made_by.answers[0].payload)["type"], "job.queued");
  EXPECT_EQ(json::parse(made_by.answers[0].payload)["job_id"], "job-1");
  auto refused = [&](const std::string& of, const std::function<void(json&)>& change) {
    auto j = json::parse(of);
    change(j);
    state_record x;
    return parse_state_record(j.dump(), x);
  };
  const auto job = to_json(open), heartbeat = to_json(alive);
  EXPECT_NE(refused(job, [](json& j) { j["owner"] = "a b"; }).find("owner"), std::string::npos);
  EXPECT_NE(refused(job, [](json& j) { j["status"] = "training"; }).find("status"),
            std::string::npos);
  EXPECT_NE(refused(job, [](json& j) { j["request"] = "text"; }).find("request"),
            std::string::npos);
  EXPECT_NE(refused(job, [](json& j) { j.erase("job_id"); }).find("job_id"), std::string::npos);
  EXPECT_NE(refused(job, [](json& j) { j["payload_hash"] = "12"; }).find("payload_hash"),
            std::string::npos);
  EXPECT_NE(refused(job, [](json& j) { j["schema_version"] = 0; }).find("schema_version"),
            std::string::npos);
  EXPECT_NE(refused(job, [](json& j) { j["schema_version"] = "2"; }).find("schema_version"),
            std::string::npos);
  EXPECT_NE(refused(heartbeat, [](json& j) { j.erase("at_ms"); }).find("at_ms"),
            std::string::npos);
  // A type it does not know is refused when nothing says a newer version
  // wrote it; with a schema_version, it is (a rolling upgrade) and skipped.
  EXPECT_NE(refused(heartbeat,
                    [](json& j) {
                      j["type"] = "instance.gone";
                      j.erase("schema_version");
                    })
                .find("type"),
            std::string::npos);
  auto newer = [&](const std::string& of, const std::function<void(json&)>& change) {
    auto j = json::parse(of);
    change(j);
    state_record x;
    EXPECT_EQ(parse_state_record(j.dump(), x), "") << j.dump();
    return std::holds_alternative<newer_state_record>(x) ? std::get<newer_state_record>(x)
                                                         : newer_state_record{"(read)", -1};
  };
  const auto gone = newer(heartbeat, [](json& j) { j["type"] = "instance.gone"; });
  EXPECT_EQ(gone.type, "instance.gone");
  EXPECT_EQ(gone.schema_version, 1);
  // A known type of a newer schema, even one this version could not read.
  const auto job2 = newer(job, [](json& j) {
    j["schema_version"] = 2;
    j.erase("job_id");
  });
  EXPECT_EQ(job2.type, "job.state");
  EXPECT_EQ(job2.schema_version, 2);
  EXPECT_EQ(newer(to_json(ms), [](json& j) { j["schema_version"] = 3; }).schema_version, 3);
  // Open without its request (too large to publish): read, and not taken over.
  EXPECT_EQ(refused(job, [](json& j) { j.erase("request"); }), "");
  // A cancel passed on to the owner: still open, and it carries no request
  // (a request in it is not kept: nobody runs a job to be cancelled).
  auto cancelling = open;
  cancelling.status = "cancelling";
  ASSERT_EQ(parse_state_record(to_json(cancelling), any), "");
  EXPECT_EQ(std::get<job_state_record>(any).status, "cancelling");
  EXPECT_TRUE(std::get<job_state_record>(any).request.empty());
  EXPECT_TRUE(is_open_job_state("queued"));
  EXPECT_TRUE(is_open_job_state("cancelling"));
  for (const char* closed_status : {"ready", "failed", "cancelled"})
    EXPECT_FALSE(is_open_job_state(closed_status)) << closed_status;
}
