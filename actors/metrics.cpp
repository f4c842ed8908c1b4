#include "actors/metrics.hpp"

#include <sstream>

namespace tailor::actors {

bool metrics::ready(std::size_t expected) const {
  std::lock_guard<std::mutex> g(mtx_);
  return joined_.size() >= expected;
}

std::string metrics::render() const {
  std::ostringstream out;
  std::lock_guard<std::mutex> g(mtx_);
  auto family = [&](const char* name, const char* type, const char* help, const char* label,
                    const std::map<std::string, int64_t>& m) {
    out << "# HELP " << name << ' ' << help << "\n# TYPE " << name << ' ' << type << '\n';
    for (const auto& [k, v] : m) out << name << '{' << label << "=\"" << k << "\"} " << v << '\n';
  };
  family("tailor_events_in_total", "counter", "Events read per input topic.", "topic", events_in_);
  family("tailor_events_out_total", "counter", "Events delivered per output topic.", "topic",
         events_out_);
  family("tailor_errors_total", "counter", "Answers carrying an error, by code.", "code", errors_);
  family("tailor_consumer_lag", "gauge", "Messages behind the end of the input topic.", "topic",
         lag_);
  family("tailor_ingress_in_flight", "gauge", "Events read but not yet answered.", "topic",
         in_flight_);
  family("tailor_ingress_paused", "gauge", "1 while consumption is paused by backpressure.",
         "topic", paused_);
  out << "# HELP tailor_dlq_total Unreadable events sent to the DLQ.\n# TYPE tailor_dlq_total "
         "counter\n"
      << "tailor_dlq_total " << dlq_.load() << '\n';
  out << "# HELP tailor_user_actors Live user actors.\n# TYPE tailor_user_actors gauge\n"
      << "tailor_user_actors " << users_.load() << '\n';
  return out.str();
}

}  // namespace tailor::actors
