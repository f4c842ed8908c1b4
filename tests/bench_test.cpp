// The benches' own arithmetic (bench/run_stats): what a repeated run reports.
#include <gtest/gtest.h>

#include "run_stats.hpp"

using nlohmann::json;
using tailor::bench::median;
using tailor::bench::median_run;
using tailor::bench::round_ratios;

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
