#include "run_stats.hpp"

#include <algorithm>
#include <stdexcept>

namespace tailor::bench {

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
  auto out = runs[order[(order.size() - 1) / 2]];
  out[field + "_runs"] = values;
  return out;
}

}  // namespace tailor::bench
