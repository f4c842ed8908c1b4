// The benches' own arithmetic (bench/run_stats): what a repeated run reports.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <string>
#include <thread>

#include "run_stats.hpp"

using nlohmann::json;
using tailor::bench::median;
using tailor::bench::median_run;
using tailor::bench::round_ratios;
using tailor::bench::parse_cpu_times;
using tailor::bench::read_cpu_times;
using tailor::bench::steal_share;
using tailor::bench::cpu_us_per_request;
using tailor::bench::step_cpu_us;
using tailor::bench::parse_context_switches;
using tailor::bench::switches_per_request;
using tailor::bench::thread_context_switches;
using tailor::bench::parse_thread_stat;
using tailor::bench::thread_cpu_ticks;

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

namespace {

// A per-thread reading's total over the process's threads.
uint64_t sum_of(const std::map<std::string, uint64_t>& by_thread) {
  uint64_t s = 0;
  for (const auto& [name, n] : by_thread) s += n;
  return s;
}

}  // namespace

// The serving bench reports each tailord thread's CPU time per request.
TEST(ThreadCpu, ANameAndItsUserPlusSystemTicksFromAThreadsStatLine) {
  // Fields after the name: state, ppid, pgrp, session, tty, tpgid, flags,
  // minflt, cminflt, majflt, cmajflt, then utime 250 and stime 50.
  auto t = parse_thread_stat("4242 (tailor.batch.0) R 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20");
  ASSERT_TRUE(t);
  EXPECT_EQ(t->first, "tailor.batch.0");
  EXPECT_EQ(t->second, 300u);
  // A name with a space and a parenthesis of its own ends at the last ')'.
  t = parse_thread_stat("7 (odd) name)) S 1 2 3 4 5 6 7 8 9 10 3 4 0");
  ASSERT_TRUE(t);
  EXPECT_EQ(t->first, "odd) name)");
  EXPECT_EQ(t->second, 7u);
  EXPECT_FALSE(parse_thread_stat("7 (short) S 1 2 3")) << "no times";
  EXPECT_FALSE(parse_thread_stat("no name here")) << "no parentheses";
}

// ... and each thread's context switches per request, which cost this
// machine's threads CPU of their own.
TEST(ThreadSwitches, VoluntaryAndInvoluntaryFromAStatusTextAndPerRequestByName) {
  EXPECT_EQ(parse_context_switches("Name:\tcaf.clock\nState:\tS (sleeping)\n"
                                   "voluntary_ctxt_switches:\t120\n"
                                   "nonvoluntary_ctxt_switches:\t7\n"),
            127u);
  // Either line alone counts; the other one's name inside it does not.
  EXPECT_EQ(parse_context_switches("nonvoluntary_ctxt_switches:\t5\n"), 5u);
  EXPECT_FALSE(parse_context_switches("Name:\tx\nState:\tR\n")) << "no counts";
  const std::map<std::string, uint64_t> before{{"caf.clock", 100}, {"idle", 3}};
  const std::map<std::string, uint64_t> after{{"caf.clock", 600}, {"idle", 3}, {"new", 50}};
  const auto j = switches_per_request(before, after, 1000);
  EXPECT_DOUBLE_EQ(j["caf.clock"].get<double>(), 0.5);
  EXPECT_DOUBLE_EQ(j["new"].get<double>(), 0.05);
  EXPECT_FALSE(j.contains("idle"));
  EXPECT_DOUBLE_EQ(j["total"].get<double>(), 0.55);
  EXPECT_TRUE(switches_per_request(before, after, 0).empty()) << "no requests";
  // This process: a thread that hands a turn to another and waits for it
  // back, ten times, switches at least ten times. It holds the lock from its
  // hand-over to its wait, so every wait blocks.
  const auto a = thread_context_switches(::getpid());
  ASSERT_FALSE(a.empty());
  std::mutex mx;
  std::condition_variable cv;
  int turn = 0;  // 0: this thread's, 1: the other's, 2: the other ends
  std::thread other([&] {
    std::unique_lock lock(mx);
    for (;;) {
      if (!cv.wait_for(lock, std::chrono::seconds(10), [&] { return turn != 0; })) return;
      if (turn == 2) return;
      turn = 0;
      cv.notify_all();
    }
  });
  bool answered = true;
  {
    std::unique_lock lock(mx);
    for (int i = 0; i < 10 && answered; ++i) {
      turn = 1;
      cv.notify_all();
      answered = cv.wait_for(lock, std::chrono::seconds(10), [&] { return turn == 0; });
    }
  }
  const auto b = thread_context_switches(::getpid());
  {
    std::lock_guard lock(mx);
    turn = 2;
  }
  cv.notify_all();
  other.join();
  ASSERT_TRUE(answered) << "the other thread did not answer within 10 s";
  EXPECT_GE(sum_of(b), sum_of(a) + 10);
}

TEST(ThreadCpu, MicrosecondsPerRequestByNameAndTheirSum) {
  const std::map<std::string, uint64_t> before{{"tailor.batch.0", 100}, {"caf.actor", 40},
                                               {"gone", 5}};
  const std::map<std::string, uint64_t> after{{"tailor.batch.0", 300}, {"caf.actor", 40},
                                              {"new", 10}};
  // 100 ticks a second over 1,000 requests: a tick is 10 us a request.
  const auto j = cpu_us_per_request(before, after, 1000, 100);
  EXPECT_DOUBLE_EQ(j["tailor.batch.0"].get<double>(), 2000.0);
  EXPECT_FALSE(j.contains("caf.actor")) << "no time spent";
  EXPECT_DOUBLE_EQ(j["new"].get<double>(), 100.0) << "a new thread counts from zero";
  EXPECT_FALSE(j.contains("gone"));
  EXPECT_DOUBLE_EQ(j["total"].get<double>(), 2100.0);
  EXPECT_TRUE(cpu_us_per_request(before, after, 0, 100).empty()) << "no requests";
  // This process's threads, by name: busy work shows in them within a
  // deadline (the counts move by clock ticks).
  const auto a = thread_cpu_ticks(::getpid());
  ASSERT_FALSE(a.empty());
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  volatile double x = 0;
  while (sum_of(thread_cpu_ticks(::getpid())) == sum_of(a) &&
         std::chrono::steady_clock::now() < deadline)
    for (int i = 0; i < 1000000; ++i) x = x + 1e-9 * i;
  EXPECT_GT(sum_of(thread_cpu_ticks(::getpid())), sum_of(a))
      << "busy for 10 s and no CPU time counted";
}

// Of a run's tailord threads, the engine's compute: its batch loops and
// their step helpers, every device's, and nothing else.
TEST(ThreadCpu, StepCpuIsTheBatchLoopsAndTheirHelpersAlone) {
  const nlohmann::json us{{"tailor.batch.0", 300.0}, {"tailor.help.0", 40.0},
                          {"tailor.batch.1", 200.0}, {"caf.actor", 50.0},
                          {"rdk:broker1", 20.0},     {"total", 610.0}};
  EXPECT_DOUBLE_EQ(step_cpu_us(us), 540.0);
  EXPECT_DOUBLE_EQ(step_cpu_us(nlohmann::json::object()), 0.0) << "no /proc: nothing measured";
}
