#pragma once

#include <caf/type_id.hpp>
#include <chrono>
#include <string>
#include <vector>

#include "messages/events.hpp"
#include "messages/jobs.hpp"
#include "messages/records.hpp"
#include "messages/serving.hpp"

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
  std::chrono::steady_clock::time_point consumed;  // when the ingress read it
  // Its Kafka timestamp (the producer's CreateTime, or the broker's
  // LogAppendTime), in ms since the epoch; -1 when it has none.
  int64_t timestamp_ms = -1;
};

}  // namespace tailor::messages

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(tailor::messages::incoming_event)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(tailor::messages::training_order)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(tailor::messages::inference_order)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(tailor::messages::inference_result)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(tailor::messages::loaded_adapter)

// Every actor message type and atom of Tailor, in one block.
CAF_BEGIN_TYPE_ID_BLOCK(tailor, caf::first_custom_type_id)

CAF_ADD_TYPE_ID(tailor, (tailor::messages::outgoing_message))
CAF_ADD_TYPE_ID(tailor, (std::vector<tailor::messages::outgoing_message>))
CAF_ADD_TYPE_ID(tailor, (tailor::messages::input_offset))
CAF_ADD_TYPE_ID(tailor, (tailor::messages::job_record))
CAF_ADD_TYPE_ID(tailor, (std::vector<tailor::messages::job_record>))
CAF_ADD_TYPE_ID(tailor, (tailor::messages::model_record))
CAF_ADD_TYPE_ID(tailor, (std::vector<tailor::messages::model_record>))
CAF_ADD_TYPE_ID(tailor, (tailor::messages::request_record))
CAF_ADD_TYPE_ID(tailor, (std::vector<tailor::messages::request_record>))
CAF_ADD_TYPE_ID(tailor, (tailor::messages::training_outcome))
CAF_ADD_TYPE_ID(tailor, (tailor::messages::history_entry))
CAF_ADD_TYPE_ID(tailor, (std::vector<tailor::messages::history_entry>))

CAF_ADD_ATOM(tailor, tailor::messages, publish_atom, "publish")
CAF_ADD_ATOM(tailor, tailor::messages, route_atom, "route")
CAF_ADD_ATOM(tailor, tailor::messages, handle_atom, "handle")
CAF_ADD_ATOM(tailor, tailor::messages, poll_atom, "poll")
CAF_ADD_ATOM(tailor, tailor::messages, idle_atom, "idle")
CAF_ADD_ATOM(tailor, tailor::messages, create_atom, "create")
CAF_ADD_ATOM(tailor, tailor::messages, record_atom, "record")
CAF_ADD_ATOM(tailor, tailor::messages, jobs_atom, "jobs")
CAF_ADD_ATOM(tailor, tailor::messages, job_atom, "job")
CAF_ADD_ATOM(tailor, tailor::messages, models_atom, "models")
CAF_ADD_ATOM(tailor, tailor::messages, cancel_atom, "cancel")
CAF_ADD_ATOM(tailor, tailor::messages, users_atom, "users")
CAF_ADD_ATOM(tailor, tailor::messages, stop_atom, "stop")
CAF_ADD_ATOM(tailor, tailor::messages, submit_atom, "submit")
CAF_ADD_ATOM(tailor, tailor::messages, admit_atom, "admit")
CAF_ADD_ATOM(tailor, tailor::messages, train_atom, "train")
CAF_ADD_ATOM(tailor, tailor::messages, started_atom, "started")
CAF_ADD_ATOM(tailor, tailor::messages, progress_atom, "progress")
CAF_ADD_ATOM(tailor, tailor::messages, saving_atom, "saving")
CAF_ADD_ATOM(tailor, tailor::messages, release_atom, "release")
CAF_ADD_ATOM(tailor, tailor::messages, requeue_atom, "requeue")
CAF_ADD_ATOM(tailor, tailor::messages, done_atom, "done")
CAF_ADD_ATOM(tailor, tailor::messages, count_atom, "count")
CAF_ADD_ATOM(tailor, tailor::messages, announce_atom, "announce")
CAF_ADD_ATOM(tailor, tailor::messages, transit_atom, "transit")
CAF_ADD_ATOM(tailor, tailor::messages, register_atom, "register")
CAF_ADD_ATOM(tailor, tailor::messages, recover_atom, "recover")
CAF_ADD_ATOM(tailor, tailor::messages, infer_atom, "infer")
CAF_ADD_ATOM(tailor, tailor::messages, step_atom, "step")
CAF_ADD_ATOM(tailor, tailor::messages, load_atom, "load")
CAF_ADD_ATOM(tailor, tailor::messages, history_atom, "history")
CAF_ADD_ATOM(tailor, tailor::messages, tick_atom, "tick")
CAF_ADD_ATOM(tailor, tailor::messages, prefetch_atom, "prefetch")
CAF_ADD_ATOM(tailor, tailor::messages, restart_atom, "restart")
CAF_ADD_ATOM(tailor, tailor::messages, catch_up_atom, "catchup")
CAF_ADD_ATOM(tailor, tailor::messages, follow_atom, "follow")
CAF_ADD_ATOM(tailor, tailor::messages, moved_atom, "moved")
CAF_ADD_ATOM(tailor, tailor::messages, forget_atom, "forget")
CAF_ADD_ATOM(tailor, tailor::messages, erase_atom, "erase")
CAF_ADD_ATOM(tailor, tailor::messages, commit_atom, "commit")
CAF_ADD_ATOM(tailor, tailor::messages, trim_atom, "trim")

CAF_END_TYPE_ID_BLOCK(tailor)
