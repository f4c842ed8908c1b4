#pragma once

#include <caf/typed_actor.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "actors/config.hpp"
#include "actors/fault.hpp"
#include "actors/metrics.hpp"
#include "actors/trainer.hpp"
#include "messages/type_ids.hpp"

namespace tailor::model {
struct packed_adapter;
}

namespace tailor::actors {

using namespace tailor::messages;

// The host tier of the adapter cache: the most recently used decoded
// adapters in memory (LRU, `serving.host_adapters`; 0 keeps none). Shared and
// thread-safe: the loader fills it from disk, and a GPU actor places a host
// hit in its bank at once (a copy of tens of KB) instead of queueing behind
// the loader's mailbox and its own batch steps for the answer.
class host_tier {
 public:
  // Adapters packed for a bank: a device miss then costs the batch loop a copy.
  using adapter_ptr = std::shared_ptr<const model::packed_adapter>;
  host_tier(std::size_t capacity, std::shared_ptr<metrics> stats);
  // The adapter of `model_id`, now the most recently used; null when absent.
  adapter_ptr find(const std::string& model_id);
  // Keeps `adapter`, evicting the least recently used beyond the capacity.
  void insert(const std::string& model_id, adapter_ptr adapter);
  // Drops the adapter of `model_id` (its user was deleted); false when absent.
  bool erase(const std::string& model_id);
  std::size_t capacity() const { return capacity_; }

 private:
  std::mutex mutex_;
  const std::size_t capacity_;
  std::shared_ptr<metrics> stats_;
  std::list<std::string> order_;  // most recently used first
  std::unordered_map<std::string, std::pair<adapter_ptr, std::list<std::string>::iterator>> cache_;
};

// Reads an adapter's file, verifies its checksum, decodes it and keeps it in
// the host tier. Detached, so a load from disk never stalls a batch loop.
// `prefetch` (no answer; errors are the later `load`'s to report) is sent by
// the user actor as it routes a request, so that a cold adapter is on its
// way before the request reaches a GPU actor busy with a batch step.
using loader_actor =
    caf::typed_actor<caf::replies_to<load_atom, model_record>::with<loaded_adapter>,
                     caf::reacts_to<prefetch_atom, model_record>>;

struct loader_state {
  engine_config cfg;
  std::shared_ptr<const base_models> bases;
  std::shared_ptr<metrics> stats;
  std::shared_ptr<host_tier> host;
  fault_point fault_load;  // TAILOR_FAULT_LOAD: the Nth load from disk throws
  static inline const char* name = "tailor.adapter_loader";
};

loader_actor::behavior_type adapter_loader(loader_actor::stateful_pointer<loader_state> self,
                                           engine_config cfg,
                                           std::shared_ptr<const base_models> bases,
                                           std::shared_ptr<host_tier> host,
                                           std::shared_ptr<metrics> stats);

// One per compute device and base model (a CPU device slot here): owns the
// base weights, a bank of resident adapters (the device tier, LRU among
// adapters no request is using) and the batch loop. Requests join the batch
// at the next step and leave when they end (end-of-text, stop sequence,
// max_tokens, deadline, cancellation); a request's adapter is fetched from
// the host tier, or else the loader, as soon as it arrives. Among waiting
// requests whose adapter is resident, the one whose user has received the
// least service goes first (a virtual token counter, as in S-LoRA). Answers
// each request with its result (the struct; its user actor serializes it,
// off the batch loop). `forget` drops a model's adapter (its user was
// deleted): its place zeroed and its prompts' cached keys and values gone.
// Detached.
using gpu_actor =
    caf::typed_actor<caf::replies_to<infer_atom, inference_order>::with<inference_result>,
                     caf::reacts_to<cancel_atom, std::string, std::string>,
                     caf::reacts_to<forget_atom, model_record>, caf::reacts_to<step_atom>>;

struct gpu_core;  // the batch, the bank and the waiting requests (gpu.cpp)

struct gpu_state {
  int device = 0;
  std::string base_model;
  std::string label;  // "<base model>/<device>": the device label of its gauges
  engine_config cfg;
  std::shared_ptr<const base_models> bases;  // outlive the core's pointers into them
  std::shared_ptr<metrics> stats;
  loader_actor loader;
  std::shared_ptr<host_tier> host;
  std::unique_ptr<gpu_core> core;
  gpu_state();  // out of line: gpu_core is complete only in gpu.cpp
  ~gpu_state();
  static inline const char* name = "tailor.gpu";
};

gpu_actor::behavior_type gpu(gpu_actor::stateful_pointer<gpu_state> self, int device,
                             std::string base_model, engine_config cfg,
                             std::shared_ptr<const base_models> bases,
                             std::shared_ptr<host_tier> host, loader_actor loader,
                             std::shared_ptr<metrics> stats);

// The GPU actors of each base model, shared: the supervisor puts a fresh
// one in the place of one that failed, and every user actor routes by the
// same table, so that none keeps sending to the failed one.
class device_table {
 public:
  // Puts `gpu` in place `device` of `base_model` (a new place, or a restart).
  void set(const std::string& base_model, int device, gpu_actor gpu);
  // The actor of `user_id` (the same one each time, so that their adapter
  // stays warm there); null when no actor serves `base_model`.
  gpu_actor route(const std::string& base_model, const std::string& user_id) const;
  // Which base model and device `gpu` serves; false when it is not in the table.
  bool find(const caf::actor_addr& gpu, std::string& base_model, int& device) const;
  std::vector<gpu_actor> all() const;

 private:
  mutable std::shared_mutex mutex_;
  std::map<std::string, std::vector<gpu_actor>> by_base_;
};

// Where a user actor sends a request: the devices, and the host tier and
// loader that a cold adapter is prefetched through.
struct serving_routes {
  std::shared_ptr<device_table> devices;  // the supervisor's
  // A routed request's adapter, when a host tier exists and lacks it, is
  // prefetched into it.
  std::shared_ptr<host_tier> host;
  loader_actor loader;
  gpu_actor route(const std::string& base_model, const std::string& user_id) const {
    return devices->route(base_model, user_id);
  }
};

}  // namespace tailor::actors
