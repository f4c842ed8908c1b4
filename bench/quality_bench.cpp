#include "quality_bench.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>

#include "messages/events.hpp"
#include "model/corpus.hpp"
#include "model/pretrain.hpp"
#include "model/trainer.hpp"
#include "progress.hpp"

namespace tailor::bench {

namespace {

using namespace tailor::model;

struct user_data {
  std::string name;
  std::vector<std::string> train, held_out;
};

std::vector<user_data> users(const quality_options& o) {
  std::vector<user_data> out;
  auto add = [&](const std::string& name, const std::vector<std::string>& files) {
    std::vector<std::string> entries;
    for (const auto& f : files) {
      auto e = read_fortune_file(f);
      entries.insert(entries.end(), e.begin(), e.end());
    }
    user_data u;
    u.name = name;
    split_by_hash(entries, 10, u.train, u.held_out);
    if (o.texts > 0 && static_cast<std::size_t>(o.texts) < u.train.size()) {
      std::mt19937_64 rng(o.texts_seed ^ messages::fnv1a64(name));
      std::shuffle(u.train.begin(), u.train.end(), rng);
      u.train.resize(static_cast<std::size_t>(o.texts));
    }
    out.push_back(std::move(u));
  };
  for (const auto& f : held_out_user_files()) add(f, {std::string(fortunes_dir) + "/" + f});
  add("fortunes-de", fortune_files_in(std::string(fortunes_dir) + "/de"));
  add("fortunes-es", fortune_files_in(std::string(fortunes_dir) + "/es"));
  return out;
}

double bpb(const base_weights& base, const lora_adapter* ad,
           const std::vector<std::string>& entries, const quality_options& o) {
  return evaluate(base, ad, token_stream(entries), std::min(o.eval_window, base.cfg.context),
                  o.eval_windows) /
         std::log(2.0);
}

}  // namespace

nlohmann::json run_quality(const quality_options& o) {
  pretrain_options po;
  po.minutes = o.pretrain_minutes;
  cli::progress_bar bar;
  auto base = load_or_pretrain(o.config, po, [&](const pretrain_progress& p) {
    char text[128];
    std::snprintf(text, sizeof(text), "pre-training the base: step %ld loss %.3f",
                  static_cast<long>(p.step), p.loss);
    bar.update(p.elapsed_s / p.budget_s, text);
  });
  if (!base) throw std::runtime_error(caf::to_string(base.error()));
  auto us = users(o);
  for (const auto& u : us)
    if (u.train.empty() || u.held_out.empty())
      throw std::runtime_error("no fortunes for user " + u.name +
                               " (install fortunes, fortunes-de, fortunes-es)");

  std::vector<std::string> pre_train, pre_held;
  pretraining_corpus(5, pre_train, pre_held);
  nlohmann::json j;
  j["config"] = o.config;
  j["base_bits_per_byte"] = bpb(*base, nullptr, pre_held, o);

  train_options to;
  to.steps = o.steps;
  to.batch_size = o.batch_size;
  to.learning_rate = o.learning_rate;
  to.eval_every = o.eval_every;
  to.validation_fraction = o.validation_fraction;
  to.small_data_lr_power = o.small_data_lr_power;
  std::vector<lora_adapter> adapters;
  std::vector<double> job_seconds;
  std::vector<int64_t> steps_done, best_steps;
  std::vector<double> learning_rates;
  for (std::size_t i = 0; i < us.size(); ++i) {
    auto t0 = std::chrono::steady_clock::now();
    auto r =
        train_lora(*base, us[i].train, {o.rank, o.alpha, o.mlp}, to, [&](const train_progress& p) {
          char text[128];
          std::snprintf(text, sizeof(text), "user %zu/%zu (%s): step %ld/%ld loss %.3f", i + 1,
                        us.size(), us[i].name.c_str(), static_cast<long>(p.step),
                        static_cast<long>(p.steps), p.loss);
          bar.update((static_cast<double>(i) + static_cast<double>(p.step) / p.steps) / us.size(),
                     text);
        });
    if (!r) throw std::runtime_error(caf::to_string(r.error()));
    job_seconds.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    adapters.push_back(std::move(r->adapter));
    steps_done.push_back(r->steps_done);
    best_steps.push_back(r->best_step);
    learning_rates.push_back(r->learning_rate);
  }
  bar.done();
  double ratio_sum = 0;
  int own_best = 0;
  nlohmann::json per_user = nlohmann::json::array();
  for (std::size_t u = 0; u < us.size(); ++u) {
    double base_bpb = bpb(*base, nullptr, us[u].held_out, o);
    nlohmann::json under = nlohmann::json::object();
    double own = 0, best_other = INFINITY;
    for (std::size_t a = 0; a < us.size(); ++a) {
      double v = bpb(*base, &adapters[a], us[u].held_out, o);
      under[us[a].name] = v;
      if (a == u)
        own = v;
      else
        best_other = std::min(best_other, v);
    }
    ratio_sum += own / base_bpb;
    if (own < best_other) ++own_best;
    per_user.push_back({{"user", us[u].name},
                        {"train_entries", us[u].train.size()},
                        {"held_out_entries", us[u].held_out.size()},
                        {"steps", steps_done[u]},
                        {"best_step", best_steps[u]},
                        {"learning_rate", learning_rates[u]},
                        {"base", base_bpb},
                        {"own", own},
                        {"best_other", best_other},
                        {"under_adapter", under}});
    std::fprintf(stderr, "%-12s base %.3f  own %.3f  best other %.3f\n", us[u].name.c_str(),
                 base_bpb, own, best_other);
  }
  j["users"] = per_user;
  j["mean_own_over_base"] = ratio_sum / us.size();
  j["own_best_fraction"] = static_cast<double>(own_best) / us.size();
  j["seconds_per_job"] = job_seconds;
  double total = 0;
  for (double s : job_seconds) total += s;
  j["seconds_per_job_mean"] = total / job_seconds.size();
  j["hyperparameters"] = {{"steps", o.steps},      {"batch_size", o.batch_size},
                          {"seq_len", to.seq_len}, {"learning_rate", o.learning_rate},
                          {"rank", o.rank},        {"alpha", o.alpha},
                          {"mlp", o.mlp},
                          {"texts", o.texts},
                          {"texts_seed", o.texts_seed},
                          {"validation_fraction", o.validation_fraction},
                          {"eval_every", o.eval_every},
                          {"small_data_lr_power", o.small_data_lr_power}};
  return j;
}

}  // namespace tailor::bench
