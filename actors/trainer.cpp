#include "actors/trainer.hpp"

#include <spdlog/spdlog.h>

#include <cerrno>
#include <chrono>
#include <filesystem>
#include <map>

#include "actors/base_models.hpp"
#include "actors/error_text.hpp"
#include "actors/job.hpp"
#include "actors/training_data.hpp"
#include "model/checkpoint.hpp"
#include "model/errc.hpp"
#include "model/generate.hpp"
#include "model/pretrain.hpp"
#include "model/threads.hpp"
#include "model/trainer.hpp"
#include "storage/artifacts.hpp"
#include "storage/paths.hpp"

namespace tailor::actors {

namespace {

namespace fs = std::filesystem;
using clock = std::chrono::steady_clock;

bool is_disk_full(const std::error_code& ec) {
  return ec == std::errc::no_space_on_device || ec.value() == EDQUOT;
}

training_outcome failure(errc code, std::string message, bool transient) {
  training_outcome o;
  o.status = "failed";
  o.code = code;
  o.message = std::move(message);
  o.transient = transient;
  return o;
}

training_outcome with_status(const char* status) {
  training_outcome o;
  o.status = status;
  return o;
}

std::vector<outgoing_message> prompt_results(const engine_config& cfg,
                                             const model::base_weights& base,
                                             const model::lora_adapter& adapter,
                                             const training_order& o) {
  std::vector<outgoing_message> out;
  if (o.prompts.empty()) return out;
  // A prompt the context cannot hold gets an error result, as a request would.
  std::vector<std::string> prompts;
  std::vector<model::sampling> settings;
  std::map<std::size_t, std::string> misfits;
  for (std::size_t i = 0; i < o.prompts.size(); ++i) {
    if (auto why = model::prompt_misfit(base.cfg, o.prompts[i]); !why.empty()) {
      misfits[i] = "prompts[" + std::to_string(i) + "]: " + why + " (base model " +
                   o.base_model + ")";
      continue;
    }
    model::sampling s;
    s.max_tokens = cfg.training.prompt_max_tokens;
    s.temperature = 0.7;
    s.top_k = 40;
    s.min_tokens = cfg.serving.default_min_tokens;
    s.seed = o.hp.seed + i;
    prompts.push_back(o.prompts[i]);
    settings.push_back(s);
  }
  std::vector<model::generation> gens;
  double ms = 0;
  if (!prompts.empty()) {
    auto bank = model::adapter_bank::build(base.cfg, {&adapter});
    auto t0 = clock::now();
    gens = model::generate_all(base, bank, prompts, std::vector<int64_t>(prompts.size(), 1),
                               settings);
    ms = std::chrono::duration<double, std::milli>(clock::now() - t0).count();
  }
  for (std::size_t i = 0, next = 0; i < o.prompts.size(); ++i) {
    inference_result r;
    r.request_id = o.request_id + "#" + std::to_string(i);
    r.user_id = o.user_id;
    r.model_id = o.model_id;
    if (auto m = misfits.find(i); m != misfits.end()) {
      r.error = error_info{errc::prompt_too_long, m->second};
    } else {
      const auto& g = gens[next++];
      r.text = g.text;
      r.finish_reason = g.finish_reason;
      r.usage.prompt_tokens = model::prompt_tokens(o.prompts[i]);
      r.usage.completion_tokens = static_cast<int64_t>(g.tokens.size());
      // One batch generated every prompt: each reports the batch's time.
      r.timings.decode = ms;
      r.timings.total = ms;
    }
    out.push_back({channel::results, o.user_id, to_json(r)});
  }
  return out;
}

training_outcome run_order(trainer_actor::stateful_pointer<trainer_state> self, training_order& o) {
  auto& st = self->state;
  auto job = caf::actor_cast<job_actor>(self->current_sender());
  if (o.cancel && o.cancel->load()) return with_status("cancelled");
  if (o.abandon && o.abandon->load()) return with_status("interrupted");
  if (st.shutdown->load()) return with_status("interrupted");
  auto it = st.bases->by_name.find(o.base_model);
  if (it == st.bases->by_name.end())
    return failure(errc::unknown_base_model,
                   "base_model: '" + o.base_model + "' is not loaded here", false);
  const auto& base = it->second;
  auto texts = o.texts;
  if (!o.data_ref.empty()) {
    const auto& root = st.cfg.training.data_dir;
    auto path = resolve_data_ref(root, o.data_ref);
    if (!path)
      return failure(static_cast<errc>(path.error().code()), error_text(path.error()), false);
    auto entries = read_training_file(*path, o.data_ref, st.cfg.training.max_data_bytes);
    if (!entries)
      return failure(static_cast<errc>(entries.error().code()), error_text(entries.error()), false);
    texts = std::move(*entries);
  }
  self->send(job, started_atom_v);

  model::lora_config lc;
  lc.rank = o.hp.rank;
  lc.alpha = o.hp.alpha;
  model::train_options opt;
  opt.steps = o.hp.steps;
  opt.learning_rate = o.hp.learning_rate;
  opt.batch_size = o.hp.batch_size;
  opt.seed = o.hp.seed;
  opt.checkpoint_every = st.cfg.training.checkpoint_every;
  opt.checkpoint_path = checkpoint_path(st.cfg, o.job_id);
  std::error_code ec;
  const auto checkpoints = fs::path(opt.checkpoint_path).parent_path();
  // As for the adapter (storage::store_adapter): a store that cannot be
  // written fails the job with its reason, not later as a torch error.
  if (fs::create_directories(checkpoints, ec); ec)
    return failure(is_disk_full(ec) ? errc::storage_full : errc::training_failed,
                   "creating " + checkpoints.string() + ": " + ec.message(), true);
  // Progress at a bounded rate: the first step, then at most one per
  // interval, and the last one.
  const auto interval = std::chrono::milliseconds(st.cfg.training.progress_interval_ms);
  auto last_report = clock::time_point{};
  auto progress = [&](const model::train_progress& p) {
    auto now = clock::now();
    if (p.step != 1 && p.step != p.steps && now - last_report < interval) return;
    last_report = now;
    self->send(job, progress_atom_v, p.step, p.steps, p.loss);
  };
  auto stop = [&] {
    return (o.cancel && o.cancel->load()) || (o.abandon && o.abandon->load()) ||
           st.shutdown->load();
  };
  auto t0 = clock::now();
  auto res = model::train_lora(base, texts, lc, opt, progress, stop);
  st.stats->add_training_seconds(std::chrono::duration<double>(clock::now() - t0).count());
  if (!res) {
    const auto& err = res.error();
    if (err.category() == caf::atom("tailor_mdl") &&
        err.code() == static_cast<uint8_t>(model::errc::invalid_data))
      return failure(errc::invalid_data, "texts: " + error_text(err), false);
    if (err.category() == caf::atom("tailor_mdl") &&
        err.code() == static_cast<uint8_t>(model::errc::invalid_options))
      return failure(errc::out_of_bounds, "hyperparameters: " + error_text(err), false);
    if (err == storage::errc::no_space)
      return failure(errc::storage_full, "saving a checkpoint: " + error_text(err), true);
    return failure(errc::training_failed, error_text(err), true);
  }
  if (!res->checkpoint_dropped.empty())
    spdlog::warn("job {}: its checkpoint could not be read ({}); it was dropped and the job ran "
                 "from its first step",
                 o.job_id, res->checkpoint_dropped);
  if (res->cancelled) {
    if (o.cancel && o.cancel->load()) {
      fs::remove(opt.checkpoint_path, ec);
      return with_status("cancelled");
    }
    return with_status("interrupted");
  }
  self->send(job, saving_atom_v);
  auto bytes = model::encode_adapter(res->adapter, base.cfg,
                                     {{"tailor.user_id", o.user_id},
                                      {"tailor.model_id", o.model_id},
                                      {"tailor.job_id", o.job_id},
                                      {"tailor.base_model", o.base_model}});
  if (!bytes)
    return failure(errc::training_failed, "encoding the adapter: " + error_text(bytes.error()),
                   true);
  auto stored = storage::store_adapter(st.cfg.artifact_dir, o.user_id, o.model_id, *bytes);
  if (!stored)
    return failure(stored.error() == storage::errc::no_space ? errc::storage_full
                                                             : errc::training_failed,
                   "writing the adapter: " + error_text(stored.error()), true);
  training_outcome out;
  out.status = "done";
  out.artifact_path = stored->path;
  out.checksum = stored->checksum;
  out.training = {.steps = res->steps_done,
                  .best_step = res->best_step,
                  .train_texts = res->train_texts,
                  .validation_texts = res->validation_texts,
                  .loss = res->train_loss,
                  .validation_loss = res->validation_loss.value_or(0),
                  .base_validation_loss = res->initial_validation_loss,
                  .learning_rate = res->learning_rate};
  out.results = prompt_results(st.cfg, base, res->adapter, o);
  fs::remove(opt.checkpoint_path, ec);
  return out;
}

}  // namespace

std::string checkpoint_path(const engine_config& cfg, const std::string& job_id) {
  return cfg.artifact_dir + "/checkpoints/" + job_id + ".ckpt";
}

std::shared_ptr<const base_models> load_base_models(const engine_config& cfg, std::string& err) {
  model::configure_threads(cfg.compute.intra_op_threads, cfg.compute.blas_threads);
  auto bases = std::make_shared<base_models>();
  auto dir = cfg.models.dir.empty() ? storage::tailor_home() + "/models" : cfg.models.dir;
  for (const auto& name : cfg.base_models) {
    auto path = dir + "/" + name + ".safetensors";
    model::pretrain_options po;
    po.minutes = cfg.models.pretrain_minutes > 0 ? cfg.models.pretrain_minutes : 1e9;
    po.max_steps = cfg.models.pretrain_steps;
    if (!fs::exists(path))
      spdlog::warn(
          "base model {} is not at {}: pre-training it now ({} min budget; "
          "`tailorctl pretrain` does this ahead of time)",
          name, path, cfg.models.pretrain_minutes);
    auto last = clock::now();
    auto base = model::load_or_pretrain(
        name, po,
        [&](const model::pretrain_progress& p) {
          if (clock::now() - last < std::chrono::seconds(10)) return;
          last = clock::now();
          spdlog::info("pre-training {}: step {}, loss {:.3f}, {:.0f}/{:.0f} s", name, p.step,
                       p.loss, p.elapsed_s, p.budget_s);
        },
        path);
    if (!base) {
      err = "base model " + name + " (" + path + "): " + error_text(base.error());
      return nullptr;
    }
    spdlog::info("base model {} loaded from {} ({} layers, d_model {})", name, path,
                 base->cfg.n_layer, base->cfg.d_model);
    bases->by_name.emplace(name, std::move(*base));
  }
  return bases;
}

trainer_actor::behavior_type trainer(trainer_actor::stateful_pointer<trainer_state> self, int slot,
                                     engine_config cfg, std::shared_ptr<const base_models> bases,
                                     std::shared_ptr<metrics> stats,
                                     std::shared_ptr<std::atomic<bool>> shutdown) {
  auto& st = self->state;
  st.slot = slot;
  st.cfg = std::move(cfg);
  st.bases = std::move(bases);
  st.stats = std::move(stats);
  st.shutdown = std::move(shutdown);
  return {
      [self](train_atom, training_order& o) -> training_outcome {
        // LibTorch reports its failures as exceptions: this is their edge.
        try {
          return run_order(self, o);
        } catch (const std::exception& e) {
          spdlog::error("training slot {}: job {}: {}", self->state.slot, o.job_id, e.what());
          return failure(errc::training_failed, e.what(), true);
        }
      },
  };
}

}  // namespace tailor::actors
