// tailor-pretrain: pre-train a base model and cache it where tailord looks.
// A program of its own, not a tailorctl subcommand, so that tailorctl does
// not load LibTorch (0.6 s of CPU at each start); `tailorctl pretrain`
// runs this.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string>

#include "model/checkpoint.hpp"
#include "model/pretrain.hpp"
#include "model/threads.hpp"
#include "progress.hpp"
#include "storage/safetensors.hpp"

namespace {

[[noreturn]] void fail(const std::string& msg, int code = 1) {
  std::fprintf(stderr, "tailor-pretrain: %s\n", msg.c_str());
  std::exit(code);
}

}  // namespace

int main(int argc, char** argv) {
  namespace tm = tailor::model;
  tm::configure_allocator();
  CLI::App app{"tailor-pretrain - pre-train a base model on the English fortunes and cache it"};
  app.set_version_flag("--version", std::string("tailor-pretrain ") + TAILOR_VERSION);
  std::string name = "tailor-base", out_path;
  tm::pretrain_options po;
  int threads = 1, blas_threads = 2;
  bool force = false;
  app.add_option(
      "--config", name,
      "model configuration: tailor-base (default), tailor-deep, tailor-wide, tailor-test");
  app.add_option("--minutes", po.minutes, "time budget (default: 10)")->check(CLI::PositiveNumber);
  app.add_option("--steps", po.max_steps, "stop after this many steps, if sooner than the budget");
  app.add_option("--learning-rate", po.learning_rate, "peak learning rate (default: 3e-3)")
      ->check(CLI::PositiveNumber);
  app.add_option("--batch-size", po.batch_size, "sequences per step (default: 16)")
      ->check(CLI::PositiveNumber);
  app.add_option("--seq-len", po.seq_len, "tokens per sequence (default: 128)")
      ->check(CLI::Range(2, 4096));
  app.add_option("--seed", po.seed, "seed (default: 0)");
  app.add_option("--threads", threads, "LibTorch intra-op threads (default: 1)")
      ->check(CLI::PositiveNumber);
  app.add_option("--blas-threads", blas_threads, "OpenBLAS threads (default: 2)")
      ->check(CLI::PositiveNumber);
  app.add_option("-o,--out", out_path,
                 "write here instead of the cache ($TAILOR_HOME/models/CONFIG.safetensors)");
  app.add_flag("--force", force, "pre-train even if the cache has this model");
  CLI11_PARSE(app, argc, argv);

  auto cfg = tm::named_config(name);
  if (!cfg) fail(caf::to_string(cfg.error()), 2);
  const auto out = out_path.empty() ? tm::base_model_path(name) : out_path;
  if (!force && std::filesystem::exists(out)) {
    auto f = tailor::storage::safetensors_file::read(out);
    std::string bpb = f && f->metadata().count("pretrain.held_out_bits_per_byte")
                          ? f->metadata().at("pretrain.held_out_bits_per_byte")
                          : "?";
    std::printf("%s is cached at %s (held-out %s bits/byte); --force pre-trains it again\n",
                name.c_str(), out.c_str(), bpb.c_str());
    return 0;
  }
  tm::configure_threads(threads, blas_threads);
  std::fprintf(stderr,
               "pre-training %s (%ld layers x d_model %ld, context %ld) for %.1f min; BLAS %s, "
               "%d+%d threads\n",
               name.c_str(), static_cast<long>(cfg->n_layer), static_cast<long>(cfg->d_model),
               static_cast<long>(cfg->context), po.minutes, tm::blas_library().c_str(),
               tm::intra_op_threads(), tm::blas_threads());
  tailor::cli::progress_bar bar;
  auto res = tm::pretrain(*cfg, po, [&](const tm::pretrain_progress& p) {
    char text[160];
    double frac = p.budget_s > 0 ? p.elapsed_s / p.budget_s : 0;
    if (po.max_steps > 0)
      frac = std::max(frac, static_cast<double>(p.step) / static_cast<double>(po.max_steps));
    double eta = frac > 0 ? p.elapsed_s / frac - p.elapsed_s : 0;
    std::snprintf(text, sizeof(text), "step %ld  loss %.3f  %.0f tokens/s  ETA %s",
                  static_cast<long>(p.step), p.loss, p.tokens_per_s,
                  tailor::cli::format_duration(eta).c_str());
    bar.update(frac, text);
  });
  bar.done();
  if (!res) fail(caf::to_string(res.error()));
  std::filesystem::create_directories(std::filesystem::path(out).parent_path());
  if (auto err = tm::save_base(out, res->base, tm::pretrain_metadata(*res, po)))
    fail(caf::to_string(err));
  std::printf(
      "pre-trained %s: %ld steps, %ld tokens in %.0f s; held-out %.3f bits/byte (%zu held-out "
      "entries); saved to %s\n",
      name.c_str(), static_cast<long>(res->steps), static_cast<long>(res->tokens), res->seconds,
      res->held_out_bits_per_byte, res->held_out_entries, out.c_str());
  return 0;
}
