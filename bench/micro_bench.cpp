// Micro-benchmarks (Google Benchmark) of the pieces a serving batch step is
// made of, on the default model shape with random weights (time does not
// depend on their values): the prefill of rows joining a batch, one decode
// step of a full batch, the loop's steady state, placing an adapter in the
// device's bank, two of the step's per-row loops, the store's writes for
// each answer, and a round trip between two cores.
#include <benchmark/benchmark.h>

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <random>
#include <thread>
#include <vector>

#include "messages/events.hpp"
#include "model/checkpoint.hpp"
#include "model/dense.hpp"
#include "model/generate.hpp"
#include "model/pretrain.hpp"
#include "model/row_kernels.hpp"
#include "model/threads.hpp"
#include "storage/artifacts.hpp"
#include "storage/metadata_store.hpp"
#include "zipf.hpp"

namespace {

using namespace tailor::model;

// The cached base as tailord serves it (read from its file), else a fresh one.
base_weights load_or_init(const model_config& cfg) {
  if (auto b = load_base(base_model_path("tailor-base"))) return std::move(*b);
  return base_weights::init(cfg, 1);
}

struct fixture {
  model_config cfg = *named_config("tailor-base");
  base_weights base = load_or_init(cfg);
  adapter_bank bank = adapter_bank::make(cfg, 256, 16, false);
  fixture() {
    for (int64_t i = 1; i <= bank.size; ++i) {
      auto ad = lora_adapter::init(cfg, {8, 16.0, false}, static_cast<uint64_t>(i));
      for (auto& l : ad.layers)
        for (auto& p : l) p.b = torch::randn(p.b.sizes()) * 0.02;
      bank.set(i, ad);
    }
  }
  static fixture& get() {
    static fixture f;
    return f;
  }
};

// tailord's default precision (a float16 key/value cache, serving.products
// auto: AMX's tiles where the machine has them), and the same with AVX-512
// BF16's dot product (serving.products bfloat16).
const serving_precision served{torch::kHalf, product_kind::amx};
const serving_precision dot_bf16{torch::kHalf, product_kind::bfloat16};

// max_tokens leaves the whole prompt in the context (the prefill keeps only
// context - max_tokens of it) and rows running through the steps measured.
sampling temperature_sampling(uint64_t seed) {
  sampling s;
  s.max_tokens = 80;
  s.temperature = 0.7;
  s.seed = seed;
  s.ignore_end_of_text = true;
  return s;
}

std::string prompt_of(int i) {
  return "Tell me something about number " + std::to_string(1000 + i) + ".";
}

// `n` requests numbered from `first`, each with its own adapter.
std::vector<batch_generator::new_sequence> requests(int64_t n, int64_t first) {
  auto& f = fixture::get();
  std::vector<batch_generator::new_sequence> seqs;
  for (int64_t i = first; i < first + n; ++i)
    seqs.push_back({prompt_of(static_cast<int>(i)), 1 + i % f.bank.size,
                    temperature_sampling(static_cast<uint64_t>(i))});
  return seqs;
}

// Times `join` joining the batch `g`: their add and the step that computes
// their prompts, next to the running rows' next tokens (the rows leave
// again untimed).
void time_joins(benchmark::State& state, batch_generator& g,
                const std::vector<batch_generator::new_sequence>& join) {
  for (auto _ : state) {
    auto ids = g.add_batch(join);
    g.step();
    state.PauseTiming();
    for (auto id : ids) g.finish(id, "cancelled");
    g.step();
    for (auto id : ids) g.take(id);
    state.ResumeTiming();
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(join.size()));
}

// Rows joining an empty batch: one step computes all their prompts (37
// tokens each, as the serving bench's) and first tokens.
void bm_prefill(benchmark::State& state) {
  auto& f = fixture::get();
  const auto n = state.range(0);
  batch_generator g(f.base, f.bank, n);  // allocated once, as a GPU actor's
  time_joins(state, g, requests(n, 0));
}
BENCHMARK(bm_prefill)->Arg(1)->Arg(8)->Arg(32)->Unit(benchmark::kMicrosecond);

// Rows joining a batch of 64 places where `rows` already run: the step
// with their prompts and the running rows' next tokens, plus moving the
// running rows' caches together.
void bm_join(benchmark::State& state) {
  auto& f = fixture::get();
  const auto running = state.range(0);
  const int64_t joining = 8;
  batch_generator g(f.base, f.bank, running + joining);
  if (running > 0) g.add_batch(requests(running, 0));
  for (int k = 0; k < 10; ++k) g.step();
  time_joins(state, g, requests(joining, 100));
}
BENCHMARK(bm_join)->Arg(0)->Arg(24)->Arg(56)->Unit(benchmark::kMicrosecond);

// A burst: 32 prompts join 32 running rows at once (as when many users come
// back together), computed whole or `chunk` tokens a step
// (serving.prefill_chunk). Timed: every step until all of them have their
// first token; `longest_step_us`: the longest of those steps, which every
// running row waits for between two of its tokens.
void bm_burst(benchmark::State& state) {
  auto& f = fixture::get();
  const auto chunk = state.range(0);
  batch_generator g(f.base, f.bank, 64, 0, 0, served);
  g.set_prefill_chunk(chunk);
  g.add_batch(requests(32, 0));
  for (int k = 0; k < 10; ++k) g.step();
  double longest = 0;
  for (auto _ : state) {
    auto ids = g.add_batch(requests(32, 100));
    std::size_t started = 0;
    while (started < ids.size()) {
      const auto t0 = std::chrono::steady_clock::now();
      g.step();
      longest = std::max(
          longest,
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
      started += g.started().size();
    }
    state.PauseTiming();
    for (auto id : ids) g.finish(id, "cancelled");
    g.step();
    for (auto id : ids) g.take(id);
    state.ResumeTiming();
  }
  state.counters["longest_step_us"] = longest;
}
BENCHMARK(bm_burst)->Arg(0)->Arg(256)->Unit(benchmark::kMicrosecond);

// A step helper for every step (serving.step_helper), or none.
void help(benchmark::State& state, batch_generator& g, bool helped) {
  std::string err;
  if (helped && !g.start_helper("micro.help", 0, err)) state.SkipWithError(err.c_str());
}

// One decode step of `rows` rows, each with its own adapter.
void decode_step(benchmark::State& state, serving_precision precision, bool helped = false) {
  auto& f = fixture::get();
  const auto rows = state.range(0);
  auto g = std::make_unique<batch_generator>(f.base, f.bank, rows, 0, 0, precision);
  auto fill = [&] {
    g = std::make_unique<batch_generator>(f.base, f.bank, rows, 0, 0, precision);
    help(state, *g, helped);
    g->add_batch(requests(rows, 0));
  };
  fill();
  int steps = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(g->step());
    if (++steps == 64) {  // keep the sequences at serving lengths
      state.PauseTiming();
      fill();
      steps = 0;
      state.ResumeTiming();
    }
  }
  state.SetItemsProcessed(state.iterations() * rows);
}
void bm_decode_step(benchmark::State& state) {
  decode_step(state, {});
}
BENCHMARK(bm_decode_step)->Arg(1)->Arg(8)->Arg(32)->Arg(64)->Unit(benchmark::kMicrosecond);
// The same with a float16 key/value cache (serving.kv_cache), and with
// bfloat16 products too (serving.products).
void bm_decode_step_f16(benchmark::State& state) {
  decode_step(state, {torch::kHalf, product_kind::float32});
}
BENCHMARK(bm_decode_step_f16)->Arg(1)->Arg(64)->Unit(benchmark::kMicrosecond);
void bm_decode_step_bf16(benchmark::State& state) {
  decode_step(state, dot_bf16);
}
BENCHMARK(bm_decode_step_bf16)
    ->Arg(1)
    ->Arg(8)
    ->Arg(16)
    ->Arg(64)
    ->Unit(benchmark::kMicrosecond);
// The same with AMX's tiles (tailord's default where the machine has them).
void bm_decode_step_amx(benchmark::State& state) {
  decode_step(state, served);
}
BENCHMARK(bm_decode_step_amx)->Arg(1)->Arg(8)->Arg(16)->Arg(64)->Unit(benchmark::kMicrosecond);
// The same with a step helper on the other core.
void bm_decode_step_bf16_helped(benchmark::State& state) {
  decode_step(state, dot_bf16, true);
}
BENCHMARK(bm_decode_step_bf16_helped)
    ->Arg(1)
    ->Arg(8)
    ->Arg(16)
    ->Arg(64)
    ->Unit(benchmark::kMicrosecond);

// The counters of a benchmark that ran both bfloat16 kernels in turn (`us`:
// microseconds of the dot product's and of AMX's, in all): each one's mean
// per iteration and how many times faster AMX was.
void report_kernels(benchmark::State& state, const double (&us)[2]) {
  const auto n = static_cast<double>(state.iterations());
  state.counters["dot_us"] = us[0] / n;
  state.counters["amx_us"] = us[1] / n;
  state.counters["amx_over_dot"] = us[0] / us[1];
}

// The two bfloat16 kernels on one of the base's products (its MLP's first:
// d_model inputs, 4 d_model outputs; 128 and 512 in tailor-base) over
// `rows` rows, in turn in one run: `amx_over_dot` is how many times faster
// AMX is (serving.products amx against bfloat16). Items are rows through
// both.
void bm_dense_bf16_kernels(benchmark::State& state) {
  if (!dense_bf16_supported(bf16_isa::amx)) {
    state.SkipWithError("this machine has no AMX");
    return;
  }
  const auto& cfg = fixture::get().cfg;
  const int64_t rows = state.range(0), in = cfg.d_model, out = 4 * cfg.d_model;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> x(static_cast<std::size_t>(rows * in)), wt(static_cast<std::size_t>(in * out)),
      b(static_cast<std::size_t>(out)), y(static_cast<std::size_t>(rows * out));
  for (auto* v : {&x, &wt, &b})
    for (auto& e : *v) e = normal(rng);
  const auto packed = packed_bf16(wt.data(), in, out);
  double us[2] = {0, 0};
  for (auto _ : state)
    for (auto isa : {bf16_isa::dot, bf16_isa::amx}) {
      const auto t0 = std::chrono::steady_clock::now();
      dense_bf16(isa, x.data(), rows, in, packed.data(), out, b.data(), y.data());
      benchmark::DoNotOptimize(y.data());
      us[isa == bf16_isa::amx] +=
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    }
  report_kernels(state, us);
  state.SetItemsProcessed(state.iterations() * rows);
}
BENCHMARK(bm_dense_bf16_kernels)->Arg(1)->Arg(4)->Arg(16)->Arg(64)->Unit(benchmark::kMicrosecond);

// Decode steps of `rows` rows (each with its own adapter) with either
// kernel, a step of each in turn in one run: `amx_over_dot` is how many
// times faster a step is with AMX's tiles (tailord's default).
void bm_decode_step_kernels(benchmark::State& state) {
  if (!dense_bf16_supported(bf16_isa::amx)) {
    state.SkipWithError("this machine has no AMX");
    return;
  }
  auto& f = fixture::get();
  const auto rows = state.range(0);
  std::unique_ptr<batch_generator> g[2];
  auto fill = [&] {
    for (int k = 0; k < 2; ++k) {
      g[k] = std::make_unique<batch_generator>(f.base, f.bank, rows, 0, 0, k ? served : dot_bf16);
      g[k]->add_batch(requests(rows, 0));
    }
  };
  fill();
  double us[2] = {0, 0};
  int steps = 0;
  for (auto _ : state) {
    for (int k = 0; k < 2; ++k) {
      const auto t0 = std::chrono::steady_clock::now();
      benchmark::DoNotOptimize(g[k]->step());
      us[k] +=
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    }
    if (++steps == 64) {  // keep the sequences at serving lengths
      state.PauseTiming();
      fill();
      steps = 0;
      state.ResumeTiming();
    }
  }
  report_kernels(state, us);
  state.SetItemsProcessed(state.iterations() * rows);
}
BENCHMARK(bm_decode_step_kernels)
    ->Arg(1)
    ->Arg(4)
    ->Arg(16)
    ->Arg(64)
    ->Unit(benchmark::kMicrosecond);

// The batch loop in its steady state: `rows` sequences of 32 tokens with
// staggered starts; as each ends, a new one joins (its prefill, and moving
// the caches together, included), with an adapter drawn in turn from
// `adapters` places. Items are generated tokens, counted as sequences end.
void continuous(benchmark::State& state, int64_t prefix_entries,
                serving_precision precision = {}, bool zipf = false, bool helped = false) {
  auto& f = fixture::get();
  const auto rows = state.range(0);
  const auto adapters = std::min(state.range(1), f.bank.size);
  // Zipf(1) over the places, as the serving bench draws its users' adapters.
  const tailor::bench::zipf draw(static_cast<int>(adapters), 1.0);
  std::mt19937_64 rng(42);
  batch_generator g(f.base, f.bank, rows, prefix_entries, 0, precision);
  help(state, g, helped);
  int next = 0;
  auto seq = [&] {
    auto s = temperature_sampling(static_cast<uint64_t>(next));
    s.max_tokens = 32;
    ++next;
    const int64_t place = zipf ? 1 + draw(rng) : 1 + next % adapters;
    return batch_generator::new_sequence{prompt_of(next), place, s};
  };
  // Staggered: row k joins at step k % 32, so that some end at every step.
  for (int k = 0; k < 32; ++k) {
    std::vector<batch_generator::new_sequence> seqs;
    for (int64_t i = k; i < rows; i += 32) seqs.push_back(seq());
    if (!seqs.empty()) g.add_batch(seqs);
    for (auto id : g.step()) g.take(id);
  }
  int64_t tokens = 0;
  for (auto _ : state) {
    auto done = g.step();
    std::vector<batch_generator::new_sequence> seqs;
    for (auto id : done) {
      tokens += static_cast<int64_t>(g.take(id).tokens.size());
      seqs.push_back(seq());
    }
    if (!seqs.empty()) g.add_batch(seqs);
  }
  state.SetItemsProcessed(tokens);
}
void bm_continuous(benchmark::State& state) {
  continuous(state, 0);
}
// Rows, adapters: one adapter for every row against as many as rows.
BENCHMARK(bm_continuous)
    ->Args({8, 8})
    ->Args({32, 32})
    ->Args({64, 1})
    ->Args({64, 64})
    ->Args({64, 256})
    ->Unit(benchmark::kMicrosecond);
// The same with a float16 key/value cache (serving.kv_cache), and with
// bfloat16 products too (serving.products).
void bm_continuous_f16(benchmark::State& state) {
  continuous(state, 0, {torch::kHalf, product_kind::float32});
}
BENCHMARK(bm_continuous_f16)->Args({64, 1})->Args({64, 256})->Unit(benchmark::kMicrosecond);
void bm_continuous_bf16(benchmark::State& state) {
  continuous(state, 0, dot_bf16);
}
BENCHMARK(bm_continuous_bf16)->Args({64, 1})->Args({64, 256})->Unit(benchmark::kMicrosecond);
// The same with adapters drawn from Zipf(1), as the serving bench's.
void bm_continuous_zipf_bf16(benchmark::State& state) {
  continuous(state, 0, dot_bf16, true);
}
BENCHMARK(bm_continuous_zipf_bf16)->Args({64, 100})->Args({64, 256})->Unit(benchmark::kMicrosecond);
void bm_continuous_zipf_bf16_helped(benchmark::State& state) {
  continuous(state, 0, dot_bf16, true, true);
}
BENCHMARK(bm_continuous_zipf_bf16_helped)->Args({64, 100})->Unit(benchmark::kMicrosecond);

// The same with a prefix cache of 256 prompts (as many as the bank's places): the prompts
// share "Tell me something about number ", as the serving bench's do.
void bm_continuous_prefix(benchmark::State& state) {
  continuous(state, 256);
}
BENCHMARK(bm_continuous_prefix)->Args({64, 64})->Args({64, 256})->Unit(benchmark::kMicrosecond);
// bm_continuous_zipf_bf16 (a float16 cache and AVX-512 BF16's products,
// Zipf adapters) with the prefix cache above: the closest to a serving
// run's steps with serving.products bfloat16 (tailord's default before
// AMX; bm_decode_step_kernels compares the two kernels' steps).
void bm_continuous_prefix_bf16(benchmark::State& state) {
  continuous(state, 256, dot_bf16, true);
}
BENCHMARK(bm_continuous_prefix_bf16)
    ->Args({64, 1})
    ->Args({64, 100})
    ->Args({64, 256})
    ->Unit(benchmark::kMicrosecond);

// Caches prompt_of(i) for i < n in `g`, each under its own adapter: identity
// 1000 + i at place 1 + i % the bank's size (the last ones stay placed).
void cache_prompts(adapter_bank& bank, batch_generator& g, int64_t n, const sampling& s) {
  const auto& cfg = fixture::get().cfg;
  const auto packed = packed_adapter::of(lora_adapter::init(cfg, {8, 16.0, false}, 3));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t place = 1 + i % bank.size;
    bank.set(place, packed, static_cast<uint64_t>(1000 + i));
    g.add_batch({{prompt_of(static_cast<int>(i)), place, s}});
    while (!g.idle())
      for (auto id : g.step()) g.take(id);
  }
}

// Admitting a request whose prompt the prefix cache holds (its lookup and
// the copy into the row's slot), with E prompts of E adapters cached: what
// a returning user's request costs the batch loop before its first step,
// as the cache (serving.prefix_cache_entries) grows. The row then leaves.
void bm_prefix_admit(benchmark::State& state) {
  auto& f = fixture::get();
  const auto entries = state.range(0);
  auto bank = adapter_bank::make(f.cfg, 256, 16, false);
  batch_generator g(f.base, bank, 4, entries, 0, served);
  auto s = temperature_sampling(1);
  s.max_tokens = 1;
  cache_prompts(bank, g, entries, s);
  // The adapters placed now are the last 256: admit their requests in turn.
  const auto first = std::max<int64_t>(0, entries - bank.size);
  const auto reused = g.prompt_tokens_reused();
  int64_t i = first;
  for (auto _ : state) {
    const auto ids = g.add_batch({{prompt_of(static_cast<int>(i)), 1 + i % bank.size, s}});
    g.finish(ids.front(), "cancelled");
    g.step();  // the row leaves
    g.take(ids.front());
    i = i + 1 < entries ? i + 1 : first;
  }
  if (g.prompt_tokens_reused() == reused) state.SkipWithError("no prompt came from the cache");
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(bm_prefix_admit)->Arg(256)->Arg(4096)->Unit(benchmark::kMicrosecond);

// B requests of returning users joining at once, as a closed loop's wave
// does, their cached prompts out of every cache (64 MB read between
// iterations, not timed): the copies into their slots, per request.
void bm_prefix_admit_cold(benchmark::State& state) {
  auto& f = fixture::get();
  const auto batch = state.range(0);
  auto bank = adapter_bank::make(f.cfg, 256, 16, false);
  batch_generator g(f.base, bank, batch, 1024, 0, served);
  auto s = temperature_sampling(1);
  s.max_tokens = 1;
  cache_prompts(bank, g, bank.size, s);
  std::vector<char> sweep(64 << 20, 1);
  std::mt19937_64 rng(5);
  int64_t sum = 0;
  for (auto _ : state) {
    state.PauseTiming();
    for (std::size_t o = 0; o < sweep.size(); o += 64) sum += sweep[o]++;
    std::vector<batch_generator::new_sequence> seqs;
    for (int64_t b = 0; b < batch; ++b) {
      const auto i = static_cast<int64_t>(rng() % static_cast<uint64_t>(bank.size));
      seqs.push_back({prompt_of(static_cast<int>(i)), 1 + i, s});
    }
    state.ResumeTiming();
    const auto ids = g.add_batch(seqs);
    for (auto id : ids) g.finish(id, "cancelled");
    g.step();
    for (auto id : ids) g.take(id);
  }
  benchmark::DoNotOptimize(sum);
  state.SetItemsProcessed(state.iterations() * batch);
}
BENCHMARK(bm_prefix_admit_cold)->Arg(32)->Unit(benchmark::kMicrosecond);

// Placing a rank-R adapter into a place of the device's bank: what a device
// miss costs the batch loop, whose thread does it. P 1: packed, as the host
// tier keeps adapters (a copy); P 0: decoded, packed on the loop's thread
// (what a miss cost before the host tier kept them packed).
void bm_place_adapter(benchmark::State& state) {
  auto& f = fixture::get();
  auto bank = adapter_bank::make(f.cfg, 256, 16, false);
  auto ad = lora_adapter::init(f.cfg, {state.range(0), 16.0, false}, 7);
  const auto packed = packed_adapter::of(ad);
  int64_t index = 0;
  for (auto _ : state) {
    const int64_t place = 1 + index++ % bank.size;
    benchmark::DoNotOptimize(state.range(1) == 1 ? bank.set(place, packed)
                                                  : bank.set(place, ad));
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(bm_place_adapter)
    ->Args({8, 0})
    ->Args({8, 1})
    ->Args({16, 0})
    ->Args({16, 1})
    ->Unit(benchmark::kMicrosecond);

// One (row, head) of decode attention over n positions of a float16 cache,
// tailor-base's head width: in the cache's own layout (Arg 1: consecutive
// positions, the unrolled loop) against the same positions further apart
// (Arg 0: the loop for any strides, which the cache's layout took before).
// 256 (row, head) streams, 4 MB of keys and values, as a 64-row step reads.
void bm_attend(benchmark::State& state) {
  const int64_t hd = 32, context = 128, streams = 256, n = state.range(1);
  const int64_t stride = state.range(0) == 1 ? hd : hd + 16;
  auto keys = torch::randn({streams, context, stride}).to(torch::kHalf);
  auto values = torch::randn({streams, context, stride}).to(torch::kHalf);
  auto q = torch::randn({hd});
  std::vector<float> p(static_cast<std::size_t>(n)), out(static_cast<std::size_t>(hd));
  const auto* k = reinterpret_cast<const float16*>(keys.data_ptr<c10::Half>());
  const auto* v = reinterpret_cast<const float16*>(values.data_ptr<c10::Half>());
  int64_t s = 0;
  for (auto _ : state) {
    const int64_t at = (s++ % streams) * context * stride;
    attend(q.data_ptr<float>(), k + at, stride, v + at, stride, n, hd, 0.17f, p.data(),
           out.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations() * n);  // positions
}
BENCHMARK(bm_attend)->Args({0, 40})->Args({1, 40})->Args({0, 100})->Args({1, 100});

// Four rows' LoRA product on tailor-base's widest site (in 128, out 384,
// rank 8) with one adapter: each row alone (Arg 0: lora_row, as every row
// ran before) against the four together (Arg 1: lora_rows, B read once).
void bm_lora_rows(benchmark::State& state) {
  const int64_t in = 128, n_out = 384, rank = 8, rows = 4;
  auto x = torch::randn({rows, in});
  auto a = torch::randn({in, rank}).to(torch::kBFloat16);
  auto b = torch::randn({rank, n_out}).to(torch::kBFloat16);
  auto out = torch::zeros({rows, n_out});
  const auto* ab = reinterpret_cast<const uint16_t*>(a.data_ptr());
  const auto* bb = reinterpret_cast<const uint16_t*>(b.data_ptr());
  const float* xs[rows];
  float* outs[rows];
  for (int64_t r = 0; r < rows; ++r) {
    xs[r] = x[r].data_ptr<float>();
    outs[r] = out[r].data_ptr<float>();
  }
  for (auto _ : state) {
    if (state.range(0) == 1)
      lora_rows(xs, rows, ab, bb, in, rank, n_out, outs);
    else
      for (int64_t r = 0; r < rows; ++r) lora_row(xs[r], ab, bb, in, rank, n_out, outs[r]);
    benchmark::DoNotOptimize(outs[0]);
  }
  state.SetItemsProcessed(state.iterations() * rows);
}
BENCHMARK(bm_lora_rows)->Arg(0)->Arg(1);

// What the adapter loader does for a cold adapter (a disk load), part by
// part: S 0 reads the file and checks its checksum; 1 also decodes it
// (safetensors into LibTorch tensors); 2 also packs it for the bank
// (bfloat16, as the host tier keeps it). A rank-8 adapter of tailor-base,
// as the serving bench registers them, its file in the page cache as a
// warm artifact store's are.
void bm_load_adapter(benchmark::State& state) {
  namespace fs = std::filesystem;
  auto& f = fixture::get();
  auto ad = lora_adapter::init(f.cfg, {8, 16.0, false}, 7);
  auto bytes = encode_adapter(ad, f.cfg);
  if (!bytes) return state.SkipWithError(caf::to_string(bytes.error()).c_str());
  const auto path = (fs::temp_directory_path() /
                     ("tailor-micro-adapter-" + std::to_string(::getpid()) + ".safetensors"))
                        .string();
  if (auto err = tailor::storage::write_file_atomic(path, *bytes))
    return state.SkipWithError(caf::to_string(err).c_str());
  const auto checksum = tailor::storage::checksum_of(*bytes);
  const auto stage = state.range(0);
  for (auto _ : state) {
    auto read = tailor::storage::read_file(path, checksum);
    if (!read) {
      state.SkipWithError(caf::to_string(read.error()).c_str());
      break;
    }
    if (stage == 0) {
      benchmark::DoNotOptimize(read->data());
      continue;
    }
    auto decoded = decode_adapter(std::move(*read), f.cfg, path);
    if (!decoded) {
      state.SkipWithError(caf::to_string(decoded.error()).c_str());
      break;
    }
    if (stage == 2) benchmark::DoNotOptimize(packed_adapter::of(*decoded).layers.data());
  }
  state.counters["file_kb"] = static_cast<double>(bytes->size()) / 1024.0;
  fs::remove(path);
}
BENCHMARK(bm_load_adapter)->Arg(0)->Arg(1)->Arg(2)->Unit(benchmark::kMicrosecond);

// Runs `body` on a metadata store in a fresh temporary directory (named
// after `name` and the benchmark's argument), removed afterwards.
template <class Body>
void with_temp_store(benchmark::State& state, const char* name, Body body) {
  namespace fs = std::filesystem;
  const auto dir = fs::temp_directory_path() /
                   (std::string("tailor-micro-") + name + "-" + std::to_string(::getpid()) + "-" +
                    std::to_string(state.range(0)));
  fs::remove_all(dir);
  {
    auto store = tailor::storage::metadata_store::open(dir.string());
    if (store)
      body(**store);
    else
      state.SkipWithError(caf::to_string(store.error()).c_str());
  }
  fs::remove_all(dir);
}

// What the store does for each inference request a user actor answers: the
// lookup of its request id (new, so absent) and one write of its record and
// history entry, for users drawn from Zipf(1) over `users` as the serving
// bench draws them. The ratio of /1000 to /1 is what many users add.
void bm_answer_record(benchmark::State& state) {
  using namespace tailor::messages;
  with_temp_store(state, "store", [&](tailor::storage::metadata_store& store) {
    const tailor::bench::zipf draw(static_cast<int>(state.range(0)), 1.0);
    std::mt19937_64 rng(11);
    // Sizes of the serving bench's: a short prompt in, 32 tokens out.
    const std::string input(180, 'i'), output(420, 'o');
    int64_t n = 0;
    for (auto _ : state) {
      const auto user = "user-" + std::to_string(draw(rng));
      const auto id = "req-" + std::to_string(n++);
      auto found = store.find_request(user, id);
      if (!found || found->has_value()) {
        state.SkipWithError("a new request id was found, or the lookup failed");
        break;
      }
      request_record rec{
          user, id, "inference.request", 42, "", {{channel::results, user, output}}, n, ""};
      history_entry entry{user, n, id, input, ""};  // its output is the record's, as tailord's
      if (auto err = store.put_request(rec, &entry)) {
        state.SkipWithError(caf::to_string(err).c_str());
        break;
      }
    }
  });
}
BENCHMARK(bm_answer_record)->Arg(1)->Arg(1000)->Unit(benchmark::kMicrosecond);

// Deleting a user (user.delete) who has `answers` inference answers (each a
// request record and a history entry, of the serving bench's sizes) and a
// model, beside the users deleted before: the store's one batch, what the
// user's events wait for. Filling the user is not timed.
void bm_delete_user(benchmark::State& state) {
  using namespace tailor::messages;
  with_temp_store(state, "delete", [&](tailor::storage::metadata_store& store) {
    const auto answers = state.range(0);
    const std::string input(180, 'i'), output(420, 'o');
    int64_t round = 0;
    for (auto _ : state) {
      state.PauseTiming();
      const auto user = "user-" + std::to_string(round++);
      caf::error err;
      for (int64_t i = 0; i < answers && !err; ++i) {
        const auto id = "req-" + std::to_string(i);
        request_record rec{user, id, "inference", 42, "", {{channel::results, user, output}}, i,
                           ""};
        history_entry entry{user, i, id, input, ""};
        err = store.put_request(rec, &entry);
      }
      if (!err)
        err = store.register_model(
            {"model-" + user, user, "tailor-base", "/a", "sha256:", "ready", 1, "job"});
      if (err) {
        state.SkipWithError(caf::to_string(err).c_str());
        break;
      }
      state.ResumeTiming();
      auto erased = store.delete_user(user, unix_ms());
      if (!erased || erased->history != static_cast<uint64_t>(answers)) {
        state.SkipWithError("the user's answers were not all deleted");
        break;
      }
    }
  });
}
BENCHMARK(bm_delete_user)->Arg(100)->Arg(10000)->Iterations(20)->Unit(benchmark::kMillisecond);

// What an instance does for each record of the state topic it reads as it
// starts (design section 6): parse a ready model's record and import it
// into the store with its request's dedup record, two models a user. /1: a
// model new here; /0: one it knows already, as at every later start (the
// topic is read whole).
void bm_state_record(benchmark::State& state) {
  using namespace tailor::messages;
  const bool fresh = state.range(0) == 1;
  with_temp_store(state, "state", [&](tailor::storage::metadata_store& store) {
    auto record = [](int64_t n) {
      const auto user = "user-" + std::to_string(n / 2), model = "model-" + std::to_string(n);
      return to_json(model_state{{model, user, "tailor-base",
                                  "adapters/" + user + "/" + model + ".safetensors",
                                  "sha256:" + std::string(64, 'a'), "ready", n, "job-" + model},
                                 "signup-" + model,
                                 static_cast<uint64_t>(n)});
    };
    // What the state follower does with each record.
    auto import = [&](const std::string& bytes) -> caf::expected<bool> {
      model_state ms;
      if (auto why = parse_model_state(bytes, ms); !why.empty())
        return caf::make_error(tailor::storage::errc::corrupt_record, why);
      const auto made_by = onboarding_record_of(ms);
      return store.import_model(ms.model, made_by ? &*made_by : nullptr);
    };
    constexpr int64_t known = 4096;  // what /0 reads again and again
    for (int64_t n = 0; !fresh && n < known; ++n) {
      if (auto added = import(record(n)); !added || !*added) {
        state.SkipWithError("cannot import");
        return;
      }
    }
    int64_t n = 0;
    for (auto _ : state) {
      auto added = import(record(fresh ? n : n % known));
      ++n;
      if (!added || *added != fresh) {
        state.SkipWithError("imported, or not, against expectation");
        break;
      }
    }
  });
}
BENCHMARK(bm_state_record)->Arg(1)->Arg(0)->Unit(benchmark::kMicrosecond);

// A cache line passed between two threads on the first two CPUs this
// process may use, there and back: what every chunk the step helper shares
// with the loop pays. Tens of ns where the cores share a cache, hundreds
// where they do not; then the helper may cost a step more than it saves
// (serving.step_helper auto finds out by timing steps).
void bm_core_round_trip(benchmark::State& state) {
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0 || CPU_COUNT(&allowed) < 2) {
    state.SkipWithError("needs two CPUs");
    return;
  }
  std::vector<int> cpus;
  for (int c = 0; c < CPU_SETSIZE && cpus.size() < 2; ++c)
    if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
  auto pin = [](int cpu) {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    pthread_setaffinity_np(pthread_self(), sizeof(one), &one);
  };
  std::atomic<int64_t> ball{0};
  std::atomic<bool> stop{false};
  std::thread other([&] {
    pin(cpus[1]);
    // Returns each odd value as the next even one.
    for (int64_t seen = 0; !stop.load(std::memory_order_relaxed);) {
      const auto v = ball.load(std::memory_order_acquire);
      if (v != seen && v % 2 == 1) {
        ball.store(v + 1, std::memory_order_release);
        seen = v + 1;
      }
    }
  });
  pin(cpus[0]);
  int64_t v = 0;
  for (auto _ : state) {
    ball.store(v + 1, std::memory_order_release);
    while (ball.load(std::memory_order_acquire) != v + 2) {
    }
    v += 2;
  }
  stop = true;
  other.join();
  pthread_setaffinity_np(pthread_self(), sizeof(allowed), &allowed);
}
BENCHMARK(bm_core_round_trip)->Unit(benchmark::kNanosecond);

}  // namespace

int main(int argc, char** argv) {
  tailor::model::configure_threads(1, 1);  // as tailord serves by default
  tailor::model::configure_allocator();    // as every Tailor executable
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
