#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace tailor::bench {

// Of repeated runs of one configuration, the run whose `field` is the median
// (the lower of the two middle runs for an even count), with every run's
// value of `field` added to it as "<field>_runs", in run order. One run on a
// shared machine can be off by a fifth; the median run is what a repeat is
// for. Throws std::invalid_argument on no runs or a run without `field`.
nlohmann::json median_run(const std::vector<nlohmann::json>& runs, const std::string& field);

}  // namespace tailor::bench
