#include "lora_bench.hpp"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>

#include "model/checkpoint.hpp"
#include "model/generate.hpp"
#include "model/pretrain.hpp"
#include "run_stats.hpp"

namespace tailor::bench {

namespace {

using namespace tailor::model;
using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point t) {
  return std::chrono::duration<double>(clock_type::now() - t).count();
}

// Decode tokens per second of `prompts` run as one batch; prefill is excluded.
double decode_rate(const base_weights& base, const adapter_bank& bank,
                   const std::vector<std::string>& prompts, const std::vector<int64_t>& adapters,
                   const sampling& s) {
  batch_generator g(base, bank, static_cast<int64_t>(prompts.size()));
  for (std::size_t i = 0; i < prompts.size(); ++i) g.add(prompts[i], adapters[i], s);
  // add() already produced each row's first token; the steps make the rest.
  const auto rows = static_cast<double>(g.active());
  int64_t steps = 0;
  auto t0 = clock_type::now();
  while (!g.idle()) {
    g.step();
    ++steps;
  }
  return rows * static_cast<double>(steps) / seconds_since(t0);
}

}  // namespace

nlohmann::json run_lora(const lora_options& o) {
  auto cfg = named_config(o.config);
  if (!cfg) throw std::runtime_error(caf::to_string(cfg.error()));
  // Generation ends at the context: past it the runs would decode nothing.
  if (o.prompt_tokens >= cfg->context)
    throw std::runtime_error("--prompt-tokens: " + std::to_string(o.prompt_tokens) +
                             " leaves no room in the context of " + o.config + " (" +
                             std::to_string(cfg->context) + " tokens)");
  // Throughput does not depend on weight values: the cached base if there is
  // one, otherwise a freshly initialized one of the same shape.
  base_weights base;
  std::string base_source = "random init";
  if (std::filesystem::exists(base_model_path(o.config))) {
    auto b = load_base(base_model_path(o.config));
    if (!b) throw std::runtime_error(caf::to_string(b.error()));
    base = std::move(*b);
    base_source = base_model_path(o.config);
  } else {
    base = base_weights::init(*cfg, 1);
  }
  std::vector<lora_adapter> adapters;
  for (int i = 0; i < o.adapters; ++i) {
    auto ad = lora_adapter::init(*cfg, {o.rank, 2.0 * o.rank, o.mlp}, 100 + i);
    for (auto& l : ad.layers)
      for (auto& p : l) p.b = torch::randn(p.b.sizes()) * 0.02;
    adapters.push_back(std::move(ad));
  }
  std::vector<const lora_adapter*> ptrs;
  for (auto& a : adapters) ptrs.push_back(&a);
  auto bank = adapter_bank::build(*cfg, ptrs);
  auto empty_bank = adapter_bank::build(*cfg, {});
  std::mt19937 rng(7);
  std::vector<std::string> prompts;
  std::vector<int64_t> mixed_idx, zero_idx;
  for (int i = 0; i < o.batch; ++i) {
    std::string p;
    for (int k = 0; k < o.prompt_tokens - 1; ++k)
      p.push_back(static_cast<char>('a' + rng() % 26));  // + end-of-text
    prompts.push_back(p);
    mixed_idx.push_back(1 + i % o.adapters);
    zero_idx.push_back(0);
  }
  sampling s;
  s.max_tokens = o.new_tokens;
  s.ignore_end_of_text = true;
  auto merged0 = merge(base, adapters[0]);

  std::vector<double> mixed, merged, sequential;
  for (int r = 0; r < o.repeats; ++r) {
    std::fprintf(stderr, "lora bench: run %d of %d\n", r + 1, o.repeats);
    mixed.push_back(decode_rate(base, bank, prompts, mixed_idx, s));
    merged.push_back(decode_rate(merged0, empty_bank, prompts, zero_idx, s));
    // One request after another at batch 1, each with its own adapter merged.
    double seq_tokens = 0, seq_seconds = 0;
    for (int i = 0; i < o.batch; ++i) {
      auto m = merge(base, adapters[static_cast<std::size_t>(mixed_idx[i] - 1)]);
      auto rate = decode_rate(m, empty_bank, {prompts[i]}, {0}, s);
      seq_tokens += o.new_tokens - 1;
      seq_seconds += (o.new_tokens - 1) / rate;
    }
    sequential.push_back(seq_tokens / seq_seconds);
  }

  // Adapter load: safetensors file to ready tensors.
  auto path = std::filesystem::temp_directory_path() /
              ("tailor-bench-adapter-" + std::to_string(::getpid()) + ".safetensors");
  if (auto err = save_adapter(path.string(), adapters[0], *cfg))
    throw std::runtime_error(caf::to_string(err));
  auto bytes = std::filesystem::file_size(path);
  std::vector<double> loads;
  for (int i = 0; i < o.loads; ++i) {
    auto t0 = clock_type::now();
    auto ad = load_adapter(path.string(), *cfg);
    loads.push_back(seconds_since(t0) * 1000.0);
    if (!ad) throw std::runtime_error(caf::to_string(ad.error()));
  }
  std::filesystem::remove(path);

  nlohmann::json j;
  j["config"] = o.config;
  j["base"] = base_source;
  j["batch"] = o.batch;
  j["adapters"] = o.adapters;
  j["rank"] = o.rank;
  j["mlp"] = o.mlp;
  j["prompt_tokens"] = o.prompt_tokens;
  j["new_tokens"] = o.new_tokens;
  j["repeats"] = o.repeats;
  j["tokens_per_s_mixed"] = median(mixed);
  j["tokens_per_s_merged"] = median(merged);
  j["tokens_per_s_sequential"] = median(sequential);
  j["mixed_over_merged"] = median(mixed) / median(merged);
  j["mixed_over_sequential"] = median(mixed) / median(sequential);
  j["adapter_bytes"] = bytes;
  j["adapter_load_ms_p50"] = median(loads);
  j["runs"] = {{"mixed", mixed}, {"merged", merged}, {"sequential", sequential}};
  return j;
}

}  // namespace tailor::bench
