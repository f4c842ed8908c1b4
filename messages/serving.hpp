#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "messages/events.hpp"
#include "messages/records.hpp"

// What a user actor hands a GPU actor, and what the adapter loader hands back.
namespace tailor::messages {

// One inference request, resolved to the model that serves it. Local only.
struct inference_order {
  inference_request request;
  model_record model;
  std::chrono::steady_clock::time_point received;    // when the user actor took it
  std::chrono::steady_clock::time_point dispatched;  // when it sent it to the GPU actor
};

// A decoded adapter, ready to copy into a device bank. The pointee is a
// model::packed_adapter: messages/ must not include LibTorch, so it travels
// type-erased and only the GPU actor casts it back. Local only.
struct loaded_adapter {
  std::shared_ptr<const void> adapter;
};

}  // namespace tailor::messages
