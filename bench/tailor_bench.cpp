// tailor-bench: Tailor's benchmarks. Each prints its figures (ratios are
// measured within one run) and writes them as JSON with --json.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "interrupt.hpp"
#include "lora_bench.hpp"
#include "model/threads.hpp"
#include "onboarding_bench.hpp"
#include "quality_bench.hpp"
#include "serving_bench.hpp"

namespace {

// The options of the benches that run a tailord of their own.
void add_tailord_options(CLI::App* bench, std::string& tailord, int& store_memory_mb,
                         std::string& tailord_config) {
  bench->add_option("--tailord", tailord, "the tailord binary (default: this build's)");
  bench
      ->add_option("--store-memory-mb", store_memory_mb,
                   "tailord's store_memory_mb; 0: RocksDB's defaults (default: tailord's, 128)")
      ->check(CLI::NonNegativeNumber);
  bench
      ->add_option("--tailord-config", tailord_config,
                   "tailord's configuration each run starts from (JSON, "
                   "docs/configuration.md); this bench's other options are merged over it")
      ->check(CLI::ExistingFile);
}

}  // namespace

int main(int argc, char** argv) {
  tailor::model::configure_allocator();
  CLI::App app{"tailor-bench - Tailor's benchmarks"};
  app.require_subcommand(1);
  app.footer(
      "Ctrl-C (SIGINT) or SIGTERM during onboarding-spike or serving stops the run's tailord,\n"
      "deletes its topics and consumer groups, stops the broker it started and exits with\n"
      "128 + the signal; a second signal ends it at once.");
  std::string json_out;
  int threads = 1, blas_threads = 2;
  app.add_option("--json", json_out, "also write the figures to this file");
  app.add_option("--threads", threads, "LibTorch intra-op threads (default: 1)")
      ->check(CLI::PositiveNumber);
  app.add_option("--blas-threads", blas_threads, "OpenBLAS threads (default: 2)")
      ->check(CLI::PositiveNumber);

  tailor::bench::lora_options lo;
  auto* lora = app.add_subcommand(
      "lora", "batched multi-adapter decode against merged and sequential serving");
  lora->add_option("--batch", lo.batch, "sequences in the batch (default: 32)")
      ->check(CLI::PositiveNumber);
  lora->add_option("--adapters", lo.adapters, "distinct adapters (default: 32)")
      ->check(CLI::PositiveNumber);
  lora->add_option("--rank", lo.rank, "LoRA rank (default: 8)")->check(CLI::PositiveNumber);
  lora->add_flag("--mlp", lo.mlp, "adapters on the MLP projections too (default: attention only)");
  lora->add_option("--prompt-tokens", lo.prompt_tokens, "prompt length (default: 32)")
      ->check(CLI::Range(2, 4096));
  lora->add_option("--new-tokens", lo.new_tokens, "tokens generated per sequence (default: 32)")
      ->check(CLI::Range(2, 4096));
  lora->add_option("--repeats", lo.repeats, "runs per figure; the median is reported (default: 3)")
      ->check(CLI::PositiveNumber);
  lora->add_option("--loads", lo.loads, "adapter loads timed (default: 200)")
      ->check(CLI::PositiveNumber);
  lora->add_option("--config", lo.config, "base model configuration (default: tailor-base)");

  tailor::bench::quality_options qo;
  auto* quality = app.add_subcommand(
      "quality", "per-user adapters on fortunes: own vs base vs other users' adapters");
  quality->add_option("--config", qo.config, "base model configuration (default: tailor-base)");
  quality
      ->add_option(
          "--steps", qo.steps,
          "fine-tuning steps per user (default: onboarding's, from the data: two passes, 100-1200)")
      ->check(CLI::PositiveNumber);
  quality->add_option("--batch-size", qo.batch_size, "sequences per step (default: 8)")
      ->check(CLI::PositiveNumber);
  quality
      ->add_option("--learning-rate", qo.learning_rate,
                   "peak learning rate (default: onboarding's, 3e-3)")
      ->check(CLI::PositiveNumber);
  quality->add_option("--rank", qo.rank, "LoRA rank (default: 8)")->check(CLI::PositiveNumber);
  quality->add_option("--alpha", qo.alpha, "LoRA alpha (default: 16)")->check(CLI::PositiveNumber);
  quality->add_flag("--mlp", qo.mlp, "adapt the MLP projections too (default: attention only)");
  quality
      ->add_option("--texts", qo.texts,
                   "each user gives only this many of their texts, drawn by --texts-seed "
                   "(default: all)")
      ->check(CLI::PositiveNumber);
  quality->add_option("--texts-seed", qo.texts_seed, "which texts --texts draws (default: 0)");
  quality
      ->add_option("--validation-fraction", qo.validation_fraction,
                   "share of a user's texts held out to choose the best adapter (default: 0.1)")
      ->check(CLI::Range(0.0, 0.9));
  quality
      ->add_option("--eval-every", qo.eval_every,
                   "steps between evaluations on the held-out texts (default: onboarding's, " +
                       std::to_string(qo.eval_every) + ")")
      ->check(CLI::PositiveNumber);
  quality
      ->add_option("--small-data-lr-power", qo.small_data_lr_power,
                   "steps from the data: the learning rate times (2 / passes)^P when the "
                   "100-step floor makes more than two passes over a user's texts; 0: never "
                   "(default: onboarding's, " +
                       nlohmann::json(qo.small_data_lr_power).dump() + ")")
      ->check(CLI::NonNegativeNumber);
  quality
      ->add_option("--pretrain-minutes", qo.pretrain_minutes,
                   "budget if the base must be pre-trained first (default: 10)")
      ->check(CLI::PositiveNumber);

  tailor::bench::onboarding_options oo;
  auto* spike = app.add_subcommand(
      "onboarding-spike",
      "N sign-ups at once through a real broker and a tailord of its own: lost, duplicated, "
      "memory, slot utilization");
  spike->add_option("--jobs", oo.jobs, "onboarding requests (default: 1000)")
      ->check(CLI::PositiveNumber);
  spike->add_option("--slots", oo.slots, "training slots (default: 2)")->check(CLI::PositiveNumber);
  spike->add_option("--steps", oo.steps, "fine-tuning steps per job (default: 5)")
      ->check(CLI::PositiveNumber);
  spike
      ->add_option("--admission-queue", oo.admission_queue,
                   "jobs waiting for a slot before onboarding pauses (default: 32)")
      ->check(CLI::PositiveNumber);
  spike->add_option("--bootstrap", oo.bootstrap,
                    "Kafka bootstrap servers (default: start a broker with scripts/kafka-broker)");
  spike->add_flag("--keep-topics", oo.keep_topics,
                  "leave the run's topics and consumer groups on the --bootstrap broker "
                  "(default: deleted when the run ends)");
  add_tailord_options(spike, oo.tailord, oo.store_memory_mb, oo.tailord_config);
  spike
      ->add_option("--text-bytes", oo.text_bytes,
                   "one more text of this many bytes in each request, as a user's own writing "
                   "(default: 0; at most 500000, within the texts' limit of 512 KiB)")
      ->check(CLI::Range(0, 500000));
  spike
      ->add_option("--settle-seconds", oo.settle_seconds,
                   "after the spike, wait up to this long for tailord's first idle trim of its "
                   "heap (memory_trim_idle_seconds), then report settled_rss_mb (default: 30)")
      ->check(CLI::NonNegativeNumber);
  spike
      ->add_option("--timeout-minutes", oo.timeout_minutes,
                   "give up waiting for the jobs after this long (default: 60)")
      ->check(CLI::PositiveNumber);

  tailor::bench::serving_options so;
  auto* serving = app.add_subcommand(
      "serving",
      "personal models served through a real broker and a tailord of its own, with cross-user "
      "batching and without (baseline)");
  serving
      ->add_option("--adapters", so.adapters, "adapter counts, one run each (default: 1,100,1000)")
      ->delimiter(',')
      ->check(CLI::PositiveNumber);
  serving->add_option("--requests", so.requests, "requests per run (default: 10000)")
      ->check(CLI::PositiveNumber);
  serving->add_option("--max-tokens", so.max_tokens, "tokens per request at most (default: 32)")
      ->check(CLI::PositiveNumber);
  serving->add_option("--zipf", so.zipf, "Zipf exponent of adapter popularity (default: 1)")
      ->check(CLI::NonNegativeNumber);
  auto* conc = serving
                   ->add_option("--concurrency", so.concurrency,
                                "closed loop: requests always outstanding (default: 64)")
                   ->check(CLI::PositiveNumber);
  serving
      ->add_option("--rate", so.rate,
                   "open loop: Poisson arrivals per second (instead of --concurrency)")
      ->check(CLI::PositiveNumber)
      ->excludes(conc);
  serving->add_option("--max-batch", so.max_batch, "tailord's serving.max_batch (default: 64)")
      ->check(CLI::PositiveNumber);
  serving
      ->add_option("--batch-thread", so.batch_thread,
                   "tailord's serving.batch_thread: shared, or realtime (SCHED_FIFO, needs "
                   "CAP_SYS_NICE) (default: shared)")
      ->check(CLI::IsMember({"shared", "realtime"}));
  serving
      ->add_option("--kv-cache", so.kv_cache,
                   "tailord's serving.kv_cache: float16 or float32 (default: float16)")
      ->check(CLI::IsMember({"float16", "float32"}));
  serving
      ->add_option("--products", so.products,
                   "tailord's serving.products in the batched runs: auto, amx, bfloat16 or "
                   "float32 (default: auto)")
      ->check(CLI::IsMember({"auto", "amx", "bfloat16", "float32"}));
  serving
      ->add_option("--baseline-products", so.baseline_products,
                   "tailord's serving.products in the baseline (default: bfloat16, the fastest "
                   "at one row)")
      ->check(CLI::IsMember({"auto", "amx", "bfloat16", "float32"}));
  serving->add_option("--rank", so.rank, "LoRA rank of the adapters (default: 8)")
      ->check(CLI::Range(1, 16));
  serving->add_option("--base-model", so.base_model,
                      "base model every run serves: tailor-base (default), tailor-deep, "
                      "tailor-wide; one not in the model cache is pre-trained by the first "
                      "run's tailord (up to 10 min; tailor-pretrain --config NAME does it ahead)");
  serving->add_option(
      "--bootstrap", so.bootstrap,
      "Kafka bootstrap servers (default: start one broker with scripts/kafka-broker for all "
      "runs)");
  serving->add_flag("--keep-topics", so.keep_topics,
                    "leave each run's topics and consumer groups on the broker (default: "
                    "deleted when the run ends)");
  add_tailord_options(serving, so.tailord, so.store_memory_mb, so.tailord_config);
  serving->add_flag("!--no-baseline", so.baseline, "skip the one-request-at-a-time baseline");
  serving
      ->add_option("--partitions", so.partitions,
                   "partitions of the topics each run's tailord creates (default: 4, as "
                   "tailord's kafka.topic_partitions; see bench/README.md)")
      ->check(CLI::PositiveNumber);
  serving
      ->add_option("--client-linger-ms", so.client_linger_ms,
                   "linger.ms of the producer sending the requests, as a client's (default: "
                   "5, librdkafka's default; see bench/README.md)")
      ->check(CLI::Range(0, 900000));  // librdkafka's range
  serving
      ->add_option("--repeats", so.repeats,
                   "rounds of all runs; each figure is the median round's (default: 1)")
      ->check(CLI::PositiveNumber);

  CLI11_PARSE(app, argc, argv);
  tailor::model::configure_threads(threads, blas_threads);
  nlohmann::json out;
  out["blas"] = tailor::model::blas_library();
  out["blas_threads"] = tailor::model::blas_threads();
  out["intra_op_threads"] = tailor::model::intra_op_threads();
  out["cuda_kernels"] = tailor::model::cuda_kernels();
  std::fprintf(stderr, "BLAS: %s (%d threads); LibTorch intra-op threads: %d; CUDA kernels: %s\n",
               out["blas"].get<std::string>().c_str(), tailor::model::blas_threads(),
               tailor::model::intra_op_threads(), out["cuda_kernels"].get<std::string>().c_str());
  // The runs that own a tailord, topics or a broker clean them up on Ctrl-C.
  if (spike->parsed() || serving->parsed()) tailor::bench::catch_interrupts();
  try {
    if (lora->parsed()) out["lora"] = tailor::bench::run_lora(lo);
    if (quality->parsed()) out["quality"] = tailor::bench::run_quality(qo);
    if (spike->parsed()) out["onboarding_spike"] = tailor::bench::run_onboarding_spike(oo);
    if (serving->parsed()) out["serving"] = tailor::bench::run_serving(so);
  } catch (const tailor::bench::interrupted_error& e) {
    std::fprintf(stderr, "\ntailor-bench: %s\n", e.what());
    return 128 + e.signal;
  } catch (const std::exception& e) {  // edge: report and fail
    std::fprintf(stderr, "tailor-bench: %s\n", e.what());
    return 1;
  }
  std::cout << out.dump(2) << std::endl;
  if (!json_out.empty()) {
    std::ofstream f(json_out);
    f << out.dump(2) << '\n';
    if (!f) {
      std::fprintf(stderr, "tailor-bench: cannot write %s\n", json_out.c_str());
      return 1;
    }
  }
  return 0;
}
