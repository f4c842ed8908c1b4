// The benches' own arithmetic (bench/run_stats): what a repeated run reports.
#include <gtest/gtest.h>

#include "run_stats.hpp"

using nlohmann::json;
using tailor::bench::median;
using tailor::bench::median_run;
using tailor::bench::round_ratios;
using tailor::bench::parse_cpu_times;
using tailor::bench::read_cpu_times;
using tailor::bench::steal_share;

TEST(MedianRun, PicksTheRunOfMedianValueAndListsEveryValue) {
  std::vector<json> runs{{{"adapters", 100}, {"tokens_per_s", 15000.0}, {"p50_ms", 1}},
                         {{"adapters", 100}, {"tokens_per_s", 11000.0}, {"p50_ms", 2}},
                         {{"adapters", 100}, {"tokens_per_s", 17000.0}, {"p50_ms", 3}}};
  auto m = median_run(runs, "tokens_per_s");
  // The whole median run, so that its other figures belong together.
  EXPECT_EQ(m["tokens_per_s"], 15000.0);
  EXPECT_EQ(m["p50_ms"], 1);
  EXPECT_EQ(m["tokens_per_s_runs"], json({15000.0, 11000.0, 17000.0}));
}

TEST(MedianRun, TakesTheLowerMiddleOfAnEvenCount) {
  std::vector<json> runs{{{"tokens_per_s", 4.0}},
                         {{"tokens_per_s", 1.0}},
                         {{"tokens_per_s", 3.0}},
                         {{"tokens_per_s", 2.0}}};
  EXPECT_EQ(median_run(runs, "tokens_per_s")["tokens_per_s"], 2.0);
  std::vector<json> one{{{"tokens_per_s", 7.0}}};
  EXPECT_EQ(median_run(one, "tokens_per_s")["tokens_per_s"], 7.0);
}

TEST(MedianRun, RefusesNoRunsAndARunWithoutTheField) {
  EXPECT_THROW(median_run({}, "tokens_per_s"), std::invalid_argument);
  std::vector<json> runs{{{"tokens_per_s", 1.0}}, {{"p50_ms", 2.0}}};
  EXPECT_THROW(median_run(runs, "tokens_per_s"), std::invalid_argument);
}

TEST(Median, TakesTheMiddleValueAndTheLowerMiddleOfAnEvenCount) {
  EXPECT_EQ(median({3.0, 1.0, 2.0}), 2.0);
  EXPECT_EQ(median({4.0, 1.0, 3.0, 2.0}), 2.0);
  EXPECT_THROW(median({}), std::invalid_argument);
}

// Round by round: the first run over the first, and so on, not a median
// over a median.
TEST(RoundRatios, PairsEachRoundWithItsOwnRound) {
  std::vector<json> many{
      {{"tokens_per_s", 40.0}}, {{"tokens_per_s", 90.0}}, {{"tokens_per_s", 30.0}}};
  std::vector<json> one{
      {{"tokens_per_s", 50.0}}, {{"tokens_per_s", 100.0}}, {{"tokens_per_s", 40.0}}};
  EXPECT_EQ(round_ratios(many, one, "tokens_per_s"), (std::vector<double>{0.8, 0.9, 0.75}));
  EXPECT_THROW(round_ratios(many, {one[0]}, "tokens_per_s"), std::invalid_argument);
  EXPECT_THROW(round_ratios({}, {}, "tokens_per_s"), std::invalid_argument);
  EXPECT_THROW(round_ratios(many, one, "p50_ms"), std::invalid_argument);
  std::vector<json> zero{{{"tokens_per_s", 0.0}}, {{"tokens_per_s", 1.0}}, {{"tokens_per_s", 1.0}}};
  EXPECT_THROW(round_ratios(many, zero, "tokens_per_s"), std::invalid_argument);
}

// The serving bench reports how much of each run the hypervisor took.
TEST(CpuTimes, StealIsTheEighthFieldOfTheFirstLineOfProcStat) {
  const auto a = parse_cpu_times("cpu  600 0 100 300 5 0 5 10 0 0");
  EXPECT_EQ(a.total, 1020u);
  EXPECT_EQ(a.steal, 10u);
  const auto b = parse_cpu_times("cpu  700 0 150 400 5 0 5 40 7 0");
  EXPECT_DOUBLE_EQ(steal_share(a, b), 30.0 / 280.0);
  EXPECT_EQ(steal_share(b, b), 0.0) << "no time passed";
  EXPECT_EQ(parse_cpu_times("cpu0 1 2 3 4 5 6 7 8").total, 0u) << "one CPU's line, not the sum";
  EXPECT_EQ(parse_cpu_times("cpu  1 2 3").total, 0u) << "a short line";
  const auto now = read_cpu_times();
  EXPECT_GT(now.total, 0u) << "this machine's /proc/stat";
  EXPECT_LE(now.steal, now.total);
}
