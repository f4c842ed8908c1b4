#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace tailor::bench {

struct serving_options {
  std::vector<int> adapters = {1, 100, 1000};
  // A run long enough for its steady state: at ~1,700 requests/s, 1,000
  // were 0.6 s, where one burst of the machine's noise, or every user's
  // first request, made the figures (docs/measurements.md, 2026-12-03).
  int requests = 10000;
  int max_tokens = 32;
  double zipf = 1.0;
  int concurrency = 64;  // closed loop: requests always outstanding
  double rate = 0;       // > 0: open loop, Poisson arrivals per second instead
  int max_batch = 64;
  std::string batch_thread = "shared";  // tailord's serving.batch_thread
  std::string kv_cache = "float16";     // tailord's serving.kv_cache
  std::string products = "auto";        // tailord's serving.products
  // The baseline's: AVX-512 BF16's dot product, the fastest at one row
  // (AMX's tiles, the batched runs' default, take ~1.15x as long there,
  // and up to ~1.25x for a whole one-row step: tailor-micro).
  std::string baseline_products = "bfloat16";
  int rank = 8;
  std::string base_model = "tailor-base";
  std::string bootstrap;  // empty: start a broker, one for every run
  bool keep_topics = false;  // on the broker, after each run (engine_run_options)
  std::string tailord = TAILORD_PATH;
  // An operator's tailord configuration each run starts from (its `config`,
  // read by run_serving); the bench's own options are merged over it.
  std::string tailord_config;
  nlohmann::json config = nlohmann::json::object();
  bool baseline = true;
  int repeats = 1;  // rounds of every run; each figure is the median round's
  // Partitions of the topics each run's tailord creates; 4 as tailord's
  // default. librdkafka sends one partition per produce request, so with 4,
  // one user's run costs the broker (on this machine, beside tailord) up to
  // a quarter of the requests of many users' runs; 1 takes that difference
  // out of a comparison of adapter counts (docs/measurements.md).
  int partitions = 4;
  // linger.ms of the producer that sends the requests, as a client's: 5 is
  // librdkafka's default. Less sends each request sooner but in more
  // produce requests, which the broker pays for beside tailord; how much
  // depends on the partitions (docs/measurements.md, 2026-12-04).
  int client_linger_ms = 5;
  int store_memory_mb = -1;  // tailord's store_memory_mb; -1: its default
};

// Many personal models on one base through a real broker and a tailord of
// its own: adapters (random weights of the trained shape) are registered
// before tailord starts, then requests drawn from Zipf(A) over them are
// served with cross-user batching, and once more one request at a time
// (the per-model-endpoint baseline). With `repeats` > 1 the runs go in
// rounds (every adapter count, then the baseline, again), so that a drift
// in the machine's speed falls on all of them, and each reported run is the
// one of median tokens/s, its ratios taken between medians.
nlohmann::json run_serving(const serving_options& o);

}  // namespace tailor::bench
