#include "run_stats.hpp"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>

namespace tailor::bench {

namespace {

// Where the median sits among `n` sorted values.
std::size_t median_position(std::size_t n) {
  return (n - 1) / 2;
}

}  // namespace

double median(std::vector<double> values) {
  if (values.empty()) throw std::invalid_argument("median: no values");
  std::sort(values.begin(), values.end());
  return values[median_position(values.size())];
}

nlohmann::json median_run(const std::vector<nlohmann::json>& runs, const std::string& field) {
  if (runs.empty()) throw std::invalid_argument("median_run: no runs");
  std::vector<double> values;
  for (const auto& r : runs) {
    if (!r.contains(field) || !r[field].is_number())
      throw std::invalid_argument("median_run: a run without a number " + field);
    values.push_back(r[field].get<double>());
  }
  std::vector<std::size_t> order(runs.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return values[a] < values[b]; });
  auto out = runs[order[median_position(order.size())]];
  out[field + "_runs"] = values;
  return out;
}

std::vector<double> round_ratios(const std::vector<nlohmann::json>& num,
                                 const std::vector<nlohmann::json>& den, const std::string& field) {
  if (num.empty() || num.size() != den.size())
    throw std::invalid_argument("round_ratios: " + std::to_string(num.size()) + " runs over " +
                                std::to_string(den.size()));
  auto value = [&](const nlohmann::json& r) {
    if (!r.contains(field) || !r[field].is_number())
      throw std::invalid_argument("round_ratios: a run without a number " + field);
    return r[field].get<double>();
  };
  std::vector<double> out;
  for (std::size_t i = 0; i < num.size(); ++i) {
    const double d = value(den[i]);
    if (d == 0) throw std::invalid_argument("round_ratios: " + field + " is 0 in round " +
                                            std::to_string(i + 1));
    out.push_back(value(num[i]) / d);
  }
  return out;
}

cpu_times parse_cpu_times(std::string_view line) {
  std::istringstream in{std::string(line)};
  std::string name;
  in >> name;
  if (name != "cpu") return {};
  cpu_times t;
  // user nice system idle iowait irq softirq steal; guest time is already
  // in user and nice.
  for (int field = 0; field < 8; ++field) {
    uint64_t v = 0;
    if (!(in >> v)) return {};
    t.total += v;
    if (field == 7) t.steal = v;
  }
  return t;
}

cpu_times read_cpu_times() {
  std::ifstream f("/proc/stat");
  std::string line;
  if (!std::getline(f, line)) return {};
  return parse_cpu_times(line);
}

double steal_share(const cpu_times& from, const cpu_times& to) {
  if (to.total <= from.total || to.steal < from.steal) return 0.0;
  return static_cast<double>(to.steal - from.steal) / static_cast<double>(to.total - from.total);
}

std::optional<std::pair<std::string, uint64_t>> parse_thread_stat(std::string_view line) {
  // "TID (NAME) STATE PPID ...": the name ends at the last ')', and utime
  // and stime are fields 14 and 15, the 12th and 13th after it.
  const auto open = line.find('(');
  const auto close = line.rfind(')');
  if (open == std::string_view::npos || close == std::string_view::npos || close < open)
    return std::nullopt;
  std::istringstream in{std::string(line.substr(close + 1))};
  std::string field;
  uint64_t utime = 0, stime = 0;
  for (int i = 3; i <= 13; ++i)
    if (!(in >> field)) return std::nullopt;
  if (!(in >> utime >> stime)) return std::nullopt;
  return std::make_pair(std::string(line.substr(open + 1, close - open - 1)), utime + stime);
}

std::map<std::string, uint64_t> thread_cpu_ticks(pid_t pid) {
  std::map<std::string, uint64_t> out;
  std::error_code ec;
  const auto dir = std::filesystem::path("/proc") / std::to_string(pid) / "task";
  for (std::filesystem::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::ifstream f(it->path() / "stat");
    std::string line;
    if (!std::getline(f, line)) continue;  // the thread ended meanwhile
    if (auto t = parse_thread_stat(line)) out[t->first] += t->second;
  }
  return out;
}

namespace {

// What each name's count grew by between two readings, times `scale`, by
// name, with their sum under "total"; empty without requests.
nlohmann::json growth_per_request(const std::map<std::string, uint64_t>& before,
                                  const std::map<std::string, uint64_t>& after, double scale) {
  nlohmann::json out = nlohmann::json::object();
  if (scale <= 0) return out;
  double total = 0;
  for (const auto& [name, count] : after) {
    const auto it = before.find(name);
    const uint64_t was = it == before.end() ? 0 : it->second;
    if (count <= was) continue;
    const double x = static_cast<double>(count - was) * scale;
    out[name] = x;
    total += x;
  }
  out["total"] = total;
  return out;
}

}  // namespace

nlohmann::json cpu_us_per_request(const std::map<std::string, uint64_t>& before,
                                  const std::map<std::string, uint64_t>& after, double requests,
                                  double ticks_per_second) {
  if (requests <= 0 || ticks_per_second <= 0) return nlohmann::json::object();
  return growth_per_request(before, after, 1e6 / ticks_per_second / requests);
}

double step_cpu_us(const nlohmann::json& tailord_us_per_request) {
  double sum = 0;
  for (const auto& [thread, us] : tailord_us_per_request.items())
    if (thread.rfind("tailor.batch.", 0) == 0 || thread.rfind("tailor.help.", 0) == 0)
      sum += us.get<double>();
  return sum;
}

std::optional<uint64_t> parse_context_switches(std::string_view status) {
  std::optional<uint64_t> sum;
  for (const std::string_view key : {"voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"}) {
    // Each key at the start of a line ("nonvoluntary" contains "voluntary").
    for (auto pos = status.find(key); pos != std::string_view::npos;
         pos = status.find(key, pos + 1)) {
      if (pos != 0 && status[pos - 1] != '\n') continue;
      std::istringstream in{std::string(status.substr(pos + key.size(), 32))};
      uint64_t n = 0;
      if (in >> n) sum = sum.value_or(0) + n;
      break;
    }
  }
  return sum;
}

std::map<std::string, uint64_t> thread_context_switches(pid_t pid) {
  std::map<std::string, uint64_t> out;
  std::error_code ec;
  const auto dir = std::filesystem::path("/proc") / std::to_string(pid) / "task";
  for (std::filesystem::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::string name;
    if (!std::getline(std::ifstream(it->path() / "comm"), name)) continue;  // ended meanwhile
    std::ostringstream text;
    text << std::ifstream(it->path() / "status").rdbuf();
    if (auto n = parse_context_switches(text.str())) out[name] += *n;
  }
  return out;
}

nlohmann::json switches_per_request(const std::map<std::string, uint64_t>& before,
                                    const std::map<std::string, uint64_t>& after,
                                    double requests) {
  if (requests <= 0) return nlohmann::json::object();
  return growth_per_request(before, after, 1.0 / requests);
}

}  // namespace tailor::bench
