#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tailor::bench {

// The median of `values`: the lower of the two middle values for an even
// count. Throws std::invalid_argument when there are none.
double median(std::vector<double> values);

// Of repeated runs of one configuration, the run whose `field` is the median
// (by the rule of `median`), with every run's
// value of `field` added to it as "<field>_runs", in run order. One run on a
// shared machine can be off by a fifth; the median run is what a repeat is
// for. Throws std::invalid_argument on no runs or a run without `field`.
nlohmann::json median_run(const std::vector<nlohmann::json>& runs, const std::string& field);

// `field` of each run in `num` over the same round's run in `den` (runs in
// round order, one per round): a ratio of two figures measured minutes
// apart, where the ratio of two medians may pair a calm round with a noisy
// one. Throws std::invalid_argument on unequal counts, no runs, a run
// without a number `field`, or a zero denominator.
std::vector<double> round_ratios(const std::vector<nlohmann::json>& num,
                                 const std::vector<nlohmann::json>& den, const std::string& field);

// The machine's CPU time so far, in clock ticks, from the first line of
// /proc/stat ("cpu  user nice system idle iowait irq softirq steal ..."):
// all of it, and the steal, the time this guest wanted a CPU and the
// hypervisor ran another guest. A figure measured while a tenth is stolen
// is not the machine's.
struct cpu_times {
  uint64_t total = 0, steal = 0;
};
// Zeros for a line that is not such a line.
cpu_times parse_cpu_times(std::string_view line);
cpu_times read_cpu_times();  // zeros where /proc/stat cannot be read
// The share of the time between two readings that was stolen; 0 when no
// time passed.
double steal_share(const cpu_times& from, const cpu_times& to);

// A thread's name and CPU time so far (user + system, clock ticks) from its
// /proc/PID/task/TID/stat line; nullopt for a line that is not one. The
// name is what pthread_setname_np gave it (tailor.batch.0, caf.multiplexer,
// rdk:broker1, ...), and may hold spaces and parentheses.
std::optional<std::pair<std::string, uint64_t>> parse_thread_stat(std::string_view line);
// The CPU time of each thread of process `pid`, summed by thread name;
// empty where /proc cannot be read. Threads that ended are not in it.
std::map<std::string, uint64_t> thread_cpu_ticks(pid_t pid);
// Microseconds of CPU a request, by thread name, between two readings of
// thread_cpu_ticks (`ticks_per_second` a clock tick's rate), and their sum
// under "total": where a process's time per request went. A thread new
// since `before` counts from zero.
nlohmann::json cpu_us_per_request(const std::map<std::string, uint64_t>& before,
                                  const std::map<std::string, uint64_t>& after, double requests,
                                  double ticks_per_second);

// Of cpu_us_per_request's figures for tailord, the batch loops' and their
// step helpers' (threads tailor.batch.N and tailor.help.N): the engine's
// compute a request, apart from Kafka, the actors and the client.
double step_cpu_us(const nlohmann::json& tailord_us_per_request);

// A thread's context switches so far (voluntary and not) from the text of
// its /proc/PID/task/TID/status; nullopt where neither count is in it.
std::optional<uint64_t> parse_context_switches(std::string_view status);
// The context switches of each thread of process `pid`, summed by thread
// name (as thread_cpu_ticks). A switch costs CPU of its own, in the kernel
// and, on a virtual machine, the hypervisor: each hand-over of work between
// threads, and each sleep, is one.
std::map<std::string, uint64_t> thread_context_switches(pid_t pid);
// Context switches a request, by thread name, between two readings of
// thread_context_switches, and their sum under "total".
nlohmann::json switches_per_request(const std::map<std::string, uint64_t>& before,
                                    const std::map<std::string, uint64_t>& after,
                                    double requests);

}  // namespace tailor::bench
