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
  family("tailor_ingress_pauses_total", "counter", "Times consumption was paused.", "topic",
         pauses_);
  family("tailor_jobs_total", "counter", "Fine-tuning jobs ended, by final status.", "status",
         jobs_);
  auto gauge = [&](const char* name, const char* type, const char* help, auto value) {
    out << "# HELP " << name << ' ' << help << "\n# TYPE " << name << ' ' << type << '\n'
        << name << ' ' << value << '\n';
  };
  out.precision(15);
  gauge("tailor_training_queue", "gauge", "Jobs waiting for a training slot.",
        training_queue_.load());
  gauge("tailor_training_assigned", "gauge", "Jobs running or next in line on a training slot.",
        training_assigned_.load());
  gauge("tailor_training_seconds_total", "counter",
        "Time training slots spent executing training (all slots).", training_seconds_.load());
  gauge("tailor_training_first_admission_seconds", "gauge",
        "Unix time of the first admission to a training slot (0: none yet).",
        first_admission_.load());
  gauge("tailor_training_queue_drained_seconds", "gauge",
        "Unix time the admission queue last became empty (0: never).", queue_drained_.load());
  out << "# HELP tailor_dlq_total Unreadable events sent to the DLQ.\n# TYPE tailor_dlq_total "
         "counter\n"
      << "tailor_dlq_total " << dlq_.load() << '\n';
  out << "# HELP tailor_user_actors Live user actors.\n# TYPE tailor_user_actors gauge\n"
      << "tailor_user_actors " << users_.load() << '\n';
  return out.str();
}

}  // namespace tailor::actors
