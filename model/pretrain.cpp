#include "model/pretrain.hpp"

#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <cmath>
#include <filesystem>

#include "model/checkpoint.hpp"
#include "model/corpus.hpp"
#include "model/errc.hpp"
#include "model/trainer.hpp"
#include "storage/paths.hpp"

namespace tailor::model {

caf::expected<model_config> named_config(const std::string& name) {
  model_config c;
  // tailor-base won the pre-training sweep of docs/models.md: on 2 cores the
  // number of steps in the budget matters more than width or depth.
  if (name == "tailor-base") {
    c.n_layer = 2, c.n_head = 4, c.d_model = 128, c.context = 128;
  } else if (name == "tailor-deep") {
    c.n_layer = 4, c.n_head = 4, c.d_model = 192, c.context = 128;
  } else if (name == "tailor-wide") {
    c.n_layer = 4, c.n_head = 4, c.d_model = 256, c.context = 128;
  } else if (name == "tailor-test") {
    c.n_layer = 2, c.n_head = 2, c.d_model = 32, c.context = 64;
  } else {
    return caf::make_error(errc::invalid_options,
                           "unknown model configuration '" + name +
                               "' (known: tailor-base, tailor-deep, tailor-wide, tailor-test)");
  }
  return c;
}

void pretraining_corpus(int held_out_percent, std::vector<std::string>& train,
                        std::vector<std::string>& held_out) {
  std::vector<std::string> all;
  for (const auto& f : english_fortune_files(fortunes_dir, held_out_user_files())) {
    auto e = read_fortune_file(f);
    all.insert(all.end(), e.begin(), e.end());
  }
  split_by_hash(all, held_out_percent, train, held_out);
}

std::string base_model_path(const std::string& name) {
  return storage::tailor_home() + "/models/" + name + ".safetensors";
}

double bits_per_byte(const base_weights& base, const std::vector<std::string>& entries,
                     int64_t seq_len, int64_t max_windows) {
  return evaluate(base, nullptr, token_stream(entries), seq_len, max_windows) / std::log(2.0);
}

caf::expected<pretrain_result> pretrain(
    const model_config& cfg, const pretrain_options& o,
    const std::function<void(const pretrain_progress&)>& progress) {
  std::vector<std::string> train, held_out;
  pretraining_corpus(o.held_out_percent, train, held_out);
  if (train.empty())
    return caf::make_error(errc::invalid_data,
                           std::string("no fortunes under ") + fortunes_dir +
                               " (install Debian's fortunes package: scripts/install-deps)");
  if (o.batch_size < 1 || o.seq_len < 2 || o.learning_rate <= 0 ||
      (o.minutes <= 0 && o.max_steps <= 0))
    return caf::make_error(errc::invalid_options,
                           "batch_size, seq_len, learning_rate and a budget must be positive");
  pretrain_result res;
  res.train_entries = train.size();
  res.held_out_entries = held_out.size();
  res.base = base_weights::init(cfg, o.seed);
  std::vector<torch::Tensor> params;
  for (auto& [name, t] : res.base.named()) {
    t->set_requires_grad(true);
    params.push_back(*t);
  }
  const auto stream_v = token_stream(train);
  auto stream = torch::tensor(stream_v, torch::kLong);
  const int64_t T = std::min(o.seq_len, cfg.context);
  const int64_t max_start = static_cast<int64_t>(stream_v.size()) - T - 1;
  torch::optim::AdamW opt(params,
                          torch::optim::AdamWOptions(o.learning_rate).weight_decay(o.weight_decay));
  const double budget_s = o.minutes * 60.0;
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  while (true) {
    const double e = elapsed();
    double f =
        o.max_steps > 0 ? static_cast<double>(res.steps) / static_cast<double>(o.max_steps) : 0.0;
    if (o.minutes > 0) f = std::max(f, e / budget_s);
    if (f >= 1.0) break;
    // Warm-up, then cosine decay over the budget's fraction spent.
    double lr =
        f < o.warmup_fraction
            ? o.learning_rate * std::max(f / o.warmup_fraction, 0.01)
            : o.learning_rate *
                  (o.min_lr_fraction +
                   (1 - o.min_lr_fraction) * 0.5 *
                       (1 + std::cos(M_PI * (f - o.warmup_fraction) / (1 - o.warmup_fraction))));
    for (auto& g : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
    auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed * 0x9E3779B97F4A7C15ULL +
                                                        static_cast<uint64_t>(res.steps) + 1);
    auto starts = torch::randint(0, max_start + 1, {o.batch_size}, gen, torch::kLong);
    auto idx = starts.view({-1, 1}) + torch::arange(T + 1, torch::kLong).view({1, -1});
    auto win = stream.index_select(0, idx.reshape({-1})).view({o.batch_size, T + 1});
    opt.zero_grad();
    // Windows shorter than the context start at a random position, so that
    // every position embedding is trained at the cost of short windows.
    const int64_t offset =
        cfg.context > T
            ? torch::randint(0, cfg.context - T + 1, {1}, gen, torch::kLong).item<int64_t>()
            : 0;
    auto logits = forward_single(res.base, nullptr, win.narrow(1, 0, T), offset);
    auto loss = torch::nn::functional::cross_entropy(logits.reshape({-1, cfg.vocab}),
                                                     win.narrow(1, 1, T).reshape({-1}));
    loss.backward();
    if (o.grad_clip > 0) torch::nn::utils::clip_grad_norm_(params, o.grad_clip);
    opt.step();
    ++res.steps;
    res.tokens += o.batch_size * T;
    if (progress) {
      auto now = elapsed();
      progress({res.steps, now, budget_s, loss.item<double>(),
                static_cast<double>(res.tokens) / std::max(now, 1e-9)});
    }
  }
  res.seconds = elapsed();
  for (auto& [name, t] : res.base.named()) *t = t->detach().set_requires_grad(false);
  res.held_out_bits_per_byte = bits_per_byte(res.base, held_out, T);
  return res;
}

}  // namespace tailor::model

namespace tailor::model {

caf::expected<base_weights> load_or_pretrain(
    const std::string& name, const pretrain_options& opt,
    const std::function<void(const pretrain_progress&)>& progress, const std::string& at) {
  auto path = at.empty() ? base_model_path(name) : at;
  if (std::filesystem::exists(path)) return load_base(path);
  auto cfg = named_config(name);
  if (!cfg) return cfg.error();
  auto res = pretrain(*cfg, opt, progress);
  if (!res) return res.error();
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  if (auto err = save_base(path, res->base, pretrain_metadata(*res, opt))) return err;
  return std::move(res->base);
}

std::map<std::string, std::string> pretrain_metadata(const pretrain_result& r,
                                                     const pretrain_options& o) {
  return {{"pretrain.held_out_bits_per_byte", std::to_string(r.held_out_bits_per_byte)},
          {"pretrain.steps", std::to_string(r.steps)},
          {"pretrain.tokens", std::to_string(r.tokens)},
          {"pretrain.seconds", std::to_string(r.seconds)},
          {"pretrain.learning_rate", std::to_string(o.learning_rate)},
          {"pretrain.batch_size", std::to_string(o.batch_size)},
          {"pretrain.seq_len", std::to_string(o.seq_len)},
          {"pretrain.seed", std::to_string(o.seed)},
          {"pretrain.corpus", "fortunes (English, minus the quality benchmark's user files)"}};
}

}  // namespace tailor::model
