#include "model/trainer.hpp"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <numeric>
#include <random>
#include <span>
#include <sstream>

#include "model/errc.hpp"
#include "model/generate.hpp"
#include "storage/artifacts.hpp"

namespace tailor::model {

std::string to_string(errc code) {
  switch (code) {
    case errc::none: return "none";
    case errc::invalid_data: return "invalid_data";
    case errc::invalid_options: return "invalid_options";
    case errc::checkpoint_failed: return "checkpoint_failed";
  }
  return "unknown";
}

std::vector<int64_t> token_stream(const std::vector<std::string>& entries) {
  std::vector<int64_t> out;
  for (const auto& e : entries) {
    out.push_back(end_of_text);
    for (unsigned char c : e) out.push_back(c);
  }
  if (!out.empty()) out.push_back(end_of_text);
  return out;
}

namespace {

// Windows of length T + 1 (inputs and next-token targets).
torch::Tensor windows_at(const torch::Tensor& stream, const torch::Tensor& starts, int64_t T) {
  auto idx = starts.view({-1, 1}) + torch::arange(T + 1, torch::kLong).view({1, -1});
  return stream.index_select(0, idx.reshape({-1})).view({starts.size(0), T + 1});
}

torch::Tensor loss_of(const base_weights& base, const lora_adapter* ad, const torch::Tensor& win) {
  auto T = win.size(1) - 1;
  auto logits = forward_single(base, ad, win.narrow(1, 0, T));
  return torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}),
                                              win.narrow(1, 1, T).reshape({-1}));
}

double lr_at(const train_options& o, int64_t step) {
  const int64_t warm =
      std::max<int64_t>(1, std::llround(static_cast<double>(o.steps) * o.warmup_fraction));
  if (step < warm)
    return o.learning_rate * static_cast<double>(step + 1) / static_cast<double>(warm);
  const double p =
      static_cast<double>(step - warm) / static_cast<double>(std::max<int64_t>(1, o.steps - warm));
  return o.learning_rate *
         (o.min_lr_fraction + (1.0 - o.min_lr_fraction) * 0.5 * (1.0 + std::cos(M_PI * p)));
}

struct run_state {
  int64_t step = 0;
  double best_val = std::numeric_limits<double>::infinity();
  int64_t bad_evals = 0;
  int64_t best_step = 0;  // the step `best` is of; 0: the untrained adapter
};

std::vector<std::pair<std::string, torch::Tensor*>> named_of(lora_adapter& ad) {
  return ad.named();
}

caf::error save_checkpoint(const std::string& path, lora_adapter& ad, lora_adapter& best,
                           torch::optim::AdamW& opt, const run_state& st) {
  try {
    torch::serialize::OutputArchive ar;
    for (auto& [n, t] : named_of(ad)) ar.write("adapter." + n, *t);
    for (auto& [n, t] : named_of(best)) ar.write("best." + n, *t);
    ar.write("step", torch::tensor(st.step));
    ar.write("best_val", torch::tensor(st.best_val, torch::kFloat64));
    ar.write("bad_evals", torch::tensor(st.bad_evals));
    ar.write("best_step", torch::tensor(st.best_step));
    torch::serialize::OutputArchive opt_ar;
    opt.save(opt_ar);
    ar.write("optimizer", opt_ar);
    // Into memory, then written by us: LibTorch's own file writer throws
    // from a destructor when a write fails (a full disk), which ends the
    // process. The atomic write takes a temporary name of its own, as two
    // runs of one job (one taken over from an instance that only stalled)
    // may save into the same store at once.
    std::ostringstream bytes;
    ar.save_to(bytes);
    const auto data = std::move(bytes).str();
    if (auto err = storage::write_file_atomic(path, std::as_bytes(std::span(data)))) {
      if (err == storage::errc::no_space) return err;  // its caller waits for room
      const auto& why = err.context();  // the storage error's own message
      return caf::make_error(errc::checkpoint_failed,
                             why.match_elements<std::string>() ? why.get_as<std::string>(0)
                                                               : caf::to_string(err));
    }
  } catch (const std::exception& e) {  // edge: LibTorch reports errors by exception
    return caf::make_error(errc::checkpoint_failed, std::string("save ") + path + ": " + e.what());
  }
  return {};
}

caf::error load_checkpoint(const std::string& path, lora_adapter& ad, lora_adapter& best,
                           torch::optim::AdamW& opt, run_state& st) {
  try {
    torch::NoGradGuard ng;
    torch::serialize::InputArchive ar;
    ar.load_from(path);
    for (auto& [n, t] : named_of(ad)) {
      torch::Tensor v;
      ar.read("adapter." + n, v);
      t->copy_(v);
    }
    for (auto& [n, t] : named_of(best)) {
      torch::Tensor v;
      ar.read("best." + n, v);
      t->copy_(v);
    }
    torch::Tensor s, bv, be, bs;
    ar.read("step", s);
    ar.read("best_val", bv);
    ar.read("bad_evals", be);
    ar.read("best_step", bs);  // missing in an older build's checkpoint: it is dropped
    st.step = s.item<int64_t>();
    st.best_val = bv.item<double>();
    st.bad_evals = be.item<int64_t>();
    st.best_step = bs.item<int64_t>();
    torch::serialize::InputArchive opt_ar;
    ar.read("optimizer", opt_ar);
    opt.load(opt_ar);
  } catch (const std::exception& e) {
    return caf::make_error(errc::checkpoint_failed,
                           std::string("resume from ") + path + ": " + e.what());
  }
  return {};
}

lora_adapter clone_adapter(const lora_adapter& ad) {
  lora_adapter c = ad;
  for (auto& l : c.layers)
    for (auto& p : l) {
      p.a = p.a.detach().clone();
      p.b = p.b.detach().clone();
    }
  return c;
}

}  // namespace

double evaluate(const base_weights& base, const lora_adapter* adapter,
                const std::vector<int64_t>& stream, int64_t seq_len, int64_t max_windows) {
  torch::NoGradGuard ng;
  if (stream.size() < 2) return std::numeric_limits<double>::quiet_NaN();
  const int64_t T = std::min<int64_t>(seq_len, static_cast<int64_t>(stream.size()) - 1);
  auto s = torch::tensor(stream, torch::kLong);
  std::vector<int64_t> starts;
  for (int64_t p = 0; p + T + 1 <= static_cast<int64_t>(stream.size()) &&
                      static_cast<int64_t>(starts.size()) < max_windows;
       p += T)
    starts.push_back(p);
  auto win = windows_at(s, torch::tensor(starts, torch::kLong), T);
  return loss_of(base, adapter, win).item<double>();
}

int64_t steps_for_data(const train_options& o, int64_t train_tokens) {
  const double per_step = static_cast<double>(std::max<int64_t>(1, o.batch_size)) *
                          static_cast<double>(std::max<int64_t>(1, o.seq_len));
  const auto steps =
      static_cast<int64_t>(std::ceil(o.data_epochs * static_cast<double>(train_tokens) / per_step));
  return std::clamp(steps, o.min_data_steps, std::max(o.min_data_steps, o.max_data_steps));
}

double learning_rate_for_data(const train_options& o, int64_t train_tokens) {
  const int64_t steps = steps_for_data(o, train_tokens);
  // Only where the floor set the steps: elsewhere they are the data's own
  // data_epochs passes, rounded up to a whole step.
  if (steps != o.min_data_steps || train_tokens < 1) return o.learning_rate;
  const double passes = static_cast<double>(steps) *
                        static_cast<double>(std::max<int64_t>(1, o.batch_size)) *
                        static_cast<double>(std::max<int64_t>(1, o.seq_len)) /
                        static_cast<double>(train_tokens);
  if (passes <= o.data_epochs) return o.learning_rate;
  return o.learning_rate * std::pow(o.data_epochs / passes, o.small_data_lr_power);
}

caf::expected<train_result> train_lora(const base_weights& base,
                                       const std::vector<std::string>& texts, const lora_config& lc,
                                       const train_options& given, const progress_fn& progress,
                                       const cancel_fn& cancelled) {
  std::vector<std::string> usable;
  for (const auto& t : texts)
    if (!t.empty()) usable.push_back(t);
  if (usable.empty()) return caf::make_error(errc::invalid_data, "no non-empty training text");
  if (given.steps < 0 || given.batch_size < 1 || given.seq_len < 1 || given.learning_rate <= 0 ||
      lc.rank < 1)
    return caf::make_error(
        errc::invalid_options,
        "batch_size, seq_len, learning_rate and rank must be positive, steps not negative");
  if (given.steps == 0 && (given.data_epochs <= 0 || given.min_data_steps < 1 ||
                           given.max_data_steps < 1 || given.small_data_lr_power < 0))
    return caf::make_error(errc::invalid_options,
                           "data_epochs, min_data_steps and max_data_steps must be positive, "
                           "small_data_lr_power not negative");
  train_options o = given;
  // Deterministic split: shuffle entries by the seed, hold out a fraction.
  std::vector<std::size_t> order(usable.size());
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(o.seed);
  std::shuffle(order.begin(), order.end(), rng);
  std::size_t n_val = 0;
  if (usable.size() >= 2 && o.validation_fraction > 0)
    n_val = std::clamp<std::size_t>(
        static_cast<std::size_t>(std::llround(o.validation_fraction * usable.size())), 1,
        usable.size() - 1);
  std::vector<std::string> train_texts, val_texts;
  for (std::size_t i = 0; i < order.size(); ++i)
    (i < n_val ? val_texts : train_texts).push_back(usable[order[i]]);
  const auto train_stream = token_stream(train_texts);
  const auto val_stream = token_stream(val_texts);
  if (o.steps == 0) {
    const auto tokens = static_cast<int64_t>(train_stream.size());
    o.steps = steps_for_data(o, tokens);
    o.learning_rate = learning_rate_for_data(o, tokens);
  }
  const int64_t T = std::min<int64_t>(
      {o.seq_len, base.cfg.context, static_cast<int64_t>(train_stream.size()) - 1});
  auto stream = torch::tensor(train_stream, torch::kLong);
  const int64_t max_start = static_cast<int64_t>(train_stream.size()) - T - 1;

  train_result res;
  res.adapter = lora_adapter::init(base.cfg, lc, o.seed);
  for (auto& l : res.adapter.layers)
    for (auto& p : l) {
      p.a.set_requires_grad(true);
      p.b.set_requires_grad(true);
    }
  lora_adapter best = clone_adapter(res.adapter);
  torch::optim::AdamW opt(res.adapter.parameters(),
                          torch::optim::AdamWOptions(o.learning_rate).weight_decay(o.weight_decay));
  const bool has_val = !val_stream.empty();
  res.initial_validation_loss = has_val ? evaluate(base, nullptr, val_stream, T) : 0.0;
  // The untrained adapter (B = 0: the base's outputs) is a candidate too: a
  // user whose few texts only teach the adapter to overfit keeps the base's
  // answers rather than worse ones (docs/models.md, "A few texts").
  const auto first_state = [&] {
    run_state s;
    if (has_val) s.best_val = res.initial_validation_loss;
    return s;
  };
  run_state st = first_state();
  if (!o.checkpoint_path.empty() && std::filesystem::exists(o.checkpoint_path)) {
    const auto initial = clone_adapter(res.adapter);
    if (auto err = load_checkpoint(o.checkpoint_path, res.adapter, best, opt, st)) {
      // A checkpoint only saves time: one that cannot be read (cut short,
      // or not a checkpoint) is dropped, and the run starts over, to the
      // result of an uninterrupted run, rather than failing the job.
      res.checkpoint_dropped = caf::to_string(err);
      torch::NoGradGuard ng;
      auto from = clone_adapter(initial);
      auto to = named_of(res.adapter);
      auto fresh = named_of(from);
      for (std::size_t i = 0; i < to.size(); ++i) to[i].second->copy_(*fresh[i].second);
      best = clone_adapter(initial);
      st = first_state();
      opt.state().clear();
      std::error_code ec;
      std::filesystem::remove(o.checkpoint_path, ec);
    }
  }

  auto params = res.adapter.parameters();
  while (st.step < o.steps) {
    if (cancelled && cancelled()) {
      res.cancelled = true;
      // A stop may be a shutdown that resumes later: keep the progress.
      if (o.checkpoint_every > 0 && !o.checkpoint_path.empty() && st.step > 0)
        if (auto err = save_checkpoint(o.checkpoint_path, res.adapter, best, opt, st)) return err;
      break;
    }
    // Each step's batch depends only on (seed, step): a resumed run sees the same data.
    auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed * 0x9E3779B97F4A7C15ULL +
                                                        static_cast<uint64_t>(st.step) + 1);
    auto starts = torch::randint(0, max_start + 1, {o.batch_size}, gen, torch::kLong);
    auto win = windows_at(stream, starts, T);
    for (auto& g : opt.param_groups())
      static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr_at(o, st.step));
    opt.zero_grad();
    auto loss = loss_of(base, &res.adapter, win);
    loss.backward();
    if (o.grad_clip > 0) torch::nn::utils::clip_grad_norm_(params, o.grad_clip);
    opt.step();
    ++st.step;
    res.train_loss = loss.item<double>();
    train_progress pr{st.step, o.steps, res.train_loss, std::nullopt};
    bool eval_now =
        has_val && (st.step % std::max<int64_t>(1, o.eval_every) == 0 || st.step == o.steps);
    if (eval_now) {
      auto v = evaluate(base, &res.adapter, val_stream, T);
      pr.validation_loss = v;
      if (v < st.best_val) {
        st.best_val = v;
        st.bad_evals = 0;
        st.best_step = st.step;
        best = clone_adapter(res.adapter);
      } else {
        ++st.bad_evals;
      }
    }
    if (progress) progress(pr);
    if (o.checkpoint_every > 0 && !o.checkpoint_path.empty() && st.step % o.checkpoint_every == 0)
      if (auto err = save_checkpoint(o.checkpoint_path, res.adapter, best, opt, st)) return err;
    if (o.patience > 0 && st.bad_evals >= o.patience) {
      res.stopped_early = true;
      break;
    }
  }
  res.steps_done = st.step;
  res.best_step = st.step;
  res.train_texts = static_cast<int64_t>(train_texts.size());
  res.validation_texts = static_cast<int64_t>(val_texts.size());
  res.learning_rate = o.learning_rate;
  if (has_val) {
    res.adapter = std::move(best);
    res.validation_loss = st.best_val;
    res.best_step = st.best_step;
  }
  for (auto& l : res.adapter.layers)
    for (auto& p : l) {
      p.a = p.a.detach();
      p.b = p.b.detach();
    }
  return res;
}

}  // namespace tailor::model
