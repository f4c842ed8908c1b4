#pragma once

#include <caf/typed_actor.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "actors/config.hpp"
#include "actors/metrics.hpp"
#include "actors/trainer.hpp"
#include "messages/type_ids.hpp"

namespace tailor::actors {

using namespace tailor::messages;

// The host tier of the adapter cache: reads an adapter's file, verifies its
// checksum, decodes it, and keeps the most recently used decoded adapters in
// memory (LRU, `serving.host_adapters`). Detached, so a load from disk never
// stalls a batch loop.
using loader_actor =
    caf::typed_actor<caf::replies_to<load_atom, model_record>::with<loaded_adapter>>;

struct loader_core;  // the LRU of decoded adapters (gpu.cpp: LibTorch types)

struct loader_state {
  engine_config cfg;
  std::shared_ptr<const base_models> bases;
  std::shared_ptr<metrics> stats;
  std::unique_ptr<loader_core> core;
  loader_state();  // out of line: loader_core is complete only in gpu.cpp
  ~loader_state();
  static inline const char* name = "tailor.adapter_loader";
};

loader_actor::behavior_type adapter_loader(loader_actor::stateful_pointer<loader_state> self,
                                           engine_config cfg,
                                           std::shared_ptr<const base_models> bases,
                                           std::shared_ptr<metrics> stats);

// One per compute device and base model (a CPU device slot here): owns the
// base weights, a bank of resident adapters (the device tier, LRU among
// adapters no request is using) and the batch loop. Requests join the batch
// at the next step and leave when they end (end-of-text, stop sequence,
// max_tokens, deadline, cancellation); a request's adapter is fetched from
// the loader as soon as it arrives. Among waiting requests whose adapter is
// resident, the one whose user has received the least service goes first
// (a virtual token counter, as in S-LoRA). Answers each request with its
// result (inference.result JSON). Detached.
using gpu_actor =
    caf::typed_actor<caf::replies_to<infer_atom, inference_order>::with<outgoing_message>,
                     caf::reacts_to<cancel_atom, std::string, std::string>,
                     caf::reacts_to<step_atom>>;

struct gpu_core;  // the batch, the bank and the waiting requests (gpu.cpp)

struct gpu_state {
  int device = 0;
  std::string base_model;
  engine_config cfg;
  std::shared_ptr<const base_models> bases;  // outlive the core's pointers into them
  std::shared_ptr<metrics> stats;
  loader_actor loader;
  std::unique_ptr<gpu_core> core;
  gpu_state();  // out of line: gpu_core is complete only in gpu.cpp
  ~gpu_state();
  static inline const char* name = "tailor.gpu";
};

gpu_actor::behavior_type gpu(gpu_actor::stateful_pointer<gpu_state> self, int device,
                             std::string base_model, engine_config cfg,
                             std::shared_ptr<const base_models> bases, loader_actor loader,
                             std::shared_ptr<metrics> stats);

// The GPU actors of each base model; a user always goes to the same one, so
// that their adapter stays warm there.
struct serving_routes {
  std::map<std::string, std::vector<gpu_actor>> by_base;
  gpu_actor route(const std::string& base_model, const std::string& user_id) const;
};

}  // namespace tailor::actors
