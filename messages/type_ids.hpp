#pragma once

#include <caf/type_id.hpp>
#include <string>
#include <vector>

#include "messages/events.hpp"
#include "messages/records.hpp"

namespace tailor::messages {

// An event read from an input topic, parsed, on its way to its user actor.
// It never leaves the process (scale-out goes through Kafka, not CAF
// remoting), so it is an unsafe-but-local message type without inspect.
struct incoming_event {
  std::string topic;
  int32_t partition = -1;
  int64_t offset = -1;
  std::string key;
  std::string payload;  // the original bytes
  parse_result parsed;
};

}  // namespace tailor::messages

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(tailor::messages::incoming_event)

// Every actor message type and atom of Tailor, in one block.
CAF_BEGIN_TYPE_ID_BLOCK(tailor, caf::first_custom_type_id)

CAF_ADD_TYPE_ID(tailor, (tailor::messages::outgoing_message))
CAF_ADD_TYPE_ID(tailor, (std::vector<tailor::messages::outgoing_message>))
CAF_ADD_TYPE_ID(tailor, (tailor::messages::job_record))
CAF_ADD_TYPE_ID(tailor, (std::vector<tailor::messages::job_record>))
CAF_ADD_TYPE_ID(tailor, (tailor::messages::model_record))
CAF_ADD_TYPE_ID(tailor, (std::vector<tailor::messages::model_record>))
CAF_ADD_TYPE_ID(tailor, (tailor::messages::request_record))
CAF_ADD_TYPE_ID(tailor, (std::vector<tailor::messages::request_record>))

CAF_ADD_ATOM(tailor, tailor::messages, publish_atom, "publish")
CAF_ADD_ATOM(tailor, tailor::messages, route_atom, "route")
CAF_ADD_ATOM(tailor, tailor::messages, handle_atom, "handle")
CAF_ADD_ATOM(tailor, tailor::messages, poll_atom, "poll")
CAF_ADD_ATOM(tailor, tailor::messages, idle_atom, "idle")
CAF_ADD_ATOM(tailor, tailor::messages, lookup_atom, "lookup")
CAF_ADD_ATOM(tailor, tailor::messages, create_atom, "create")
CAF_ADD_ATOM(tailor, tailor::messages, record_atom, "record")
CAF_ADD_ATOM(tailor, tailor::messages, jobs_atom, "jobs")
CAF_ADD_ATOM(tailor, tailor::messages, job_atom, "job")
CAF_ADD_ATOM(tailor, tailor::messages, models_atom, "models")
CAF_ADD_ATOM(tailor, tailor::messages, model_atom, "model")
CAF_ADD_ATOM(tailor, tailor::messages, cancel_atom, "cancel")
CAF_ADD_ATOM(tailor, tailor::messages, users_atom, "users")
CAF_ADD_ATOM(tailor, tailor::messages, stop_atom, "stop")

CAF_END_TYPE_ID_BLOCK(tailor)
