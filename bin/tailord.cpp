// tailord: the Tailor engine. Reads onboarding, inference and control events
// from Kafka, answers on Kafka, keeps its state in RocksDB, and serves the
// admin API on localhost. Stops in order on SIGTERM or SIGINT.
#include <fcntl.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "actors/engine.hpp"
#include "actors/kafka.hpp"
#include "model/threads.hpp"

using namespace tailor::actors;

namespace {

bool write_ready_file(const std::string& path, const engine& e) {
  nlohmann::json j = {{"admin_port", e.admin_port()},
                      {"bootstrap_servers", e.bootstrap_servers()},
                      {"pid", static_cast<int>(::getpid())}};
  auto tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    out << j.dump() << '\n';
    if (!out) return false;
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  return !ec;
}

// glibc puts malloc's heap on transparent huge pages only when told so by
// GLIBC_TUNABLES (glibc.malloc.hugetlb=1), which its loader reads before
// main: so tailord starts itself again with it once, unless the operator set
// the tunable or TAILOR_MALLOC_HUGE_PAGES=0. The actors' RocksDB writes and
// JSON, and the batch loop's temporaries, then fault and miss the TLB per 2
// MiB, not per 4 KiB: about 4 % less of tailord's CPU per request served
// (docs/measurements.md, 2026-12-04 (later)).
void restart_with_huge_page_heap(char** argv) {
  const char* opt_out = std::getenv("TAILOR_MALLOC_HUGE_PAGES");
  if (opt_out != nullptr && std::string(opt_out) == "0") return;
  const char* given = std::getenv("GLIBC_TUNABLES");
  std::string tunables = given != nullptr ? given : "";
  if (tunables.find("glibc.malloc.hugetlb") != std::string::npos) return;
  tunables += (tunables.empty() ? "" : ":") + std::string("glibc.malloc.hugetlb=1");
  // The binary's own path, not /proc/self/exe: the process is named after
  // what it executes, and ps, top and pgrep should keep seeing "tailord".
  std::error_code ec;
  const auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec || ::setenv("GLIBC_TUNABLES", tunables.c_str(), 1) != 0) return;
  ::execv(self.c_str(), argv);
  // Not restarted (no /proc?): the same process goes on, on 4 KiB pages.
  std::fprintf(stderr, "tailord: cannot restart with a huge-page heap (%s); going on without\n",
               std::strerror(errno));
}

// Why tailord stops, one byte each through a pipe: SIGTERM and SIGINT from
// their handler (write is async-signal-safe), an engine failure from the
// thread that waits for one. A handler, not sigwait alone: the threads that
// exist before the stop signals are blocked (OpenBLAS's pool) would take a
// signal that arrives while no thread waits in sigwait, and end the process
// by its default action, as a second Ctrl-C during the stop did.
constexpr char stop_term = 'T', stop_int = 'I', stop_failure = 'F';
int stop_pipe_in = -1;

extern "C" void on_stop_signal(int sig) {
  const int saved = errno;
  const char why = sig == SIGINT ? stop_int : stop_term;
  [[maybe_unused]] const auto n = ::write(stop_pipe_in, &why, 1);
  errno = saved;
}

// The read end of the pipe, with the handler installed for both signals.
int install_stop_handler(std::string& err) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) {
    err = std::string("pipe: ") + std::strerror(errno);
    return -1;
  }
  // A signal that finds the pipe full (thousands unread) is one too many.
  ::fcntl(fds[1], F_SETFL, O_NONBLOCK);
  stop_pipe_in = fds[1];
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGTERM, SIGINT})
    if (::sigaction(sig, &sa, nullptr) != 0) {
      err = std::string("sigaction: ") + std::strerror(errno);
      return -1;
    }
  return fds[0];
}

// The next reason to stop; blocks.
char next_stop_reason(int pipe_out) {
  char why = 0;
  while (::read(pipe_out, &why, 1) != 1)
    if (errno != EINTR) return stop_term;  // cannot happen; stop rather than spin
  return why;
}

const char* signal_name(char why) {
  return why == stop_int ? "SIGINT" : "SIGTERM";
}

// Bounds a stop that has begun: ends the process with status 1 when it has
// not finished within `timeout` (0: no limit), or at once at a second stop
// signal (an operator's second Ctrl-C), logging the step it was at. That
// loses nothing: offsets are committed only after durable answers, so what
// was not finished is read again at the next start, as after a SIGKILL.
class stop_watchdog {
 public:
  stop_watchdog(const engine& e, std::chrono::seconds timeout, int stop_pipe_out)
      : engine_(e), timeout_(timeout), pipe_out_(stop_pipe_out) {
    done_fd_ = ::eventfd(0, EFD_CLOEXEC);
    if (done_fd_ < 0) {
      spdlog::error("tailord: cannot watch the stop ({}); it has no time limit",
                    std::strerror(errno));
      return;
    }
    thread_ = std::thread([this] { watch(); });
  }
  stop_watchdog(const stop_watchdog&) = delete;
  stop_watchdog& operator=(const stop_watchdog&) = delete;
  // The stop is done.
  ~stop_watchdog() {
    if (thread_.joinable()) {
      const uint64_t one = 1;
      if (::write(done_fd_, &one, sizeof one) == sizeof one)
        thread_.join();
      else
        thread_.detach();  // cannot happen with an eventfd; never block the exit on it
    }
    if (done_fd_ >= 0) ::close(done_fd_);
  }

 private:
  [[noreturn]] void give_up(const std::string& why) {
    spdlog::critical(
        "tailord: {}; exiting without finishing the stop, which was at: {}. What it did not "
        "finish is read again at the next start",
        why, engine_.stop_step());
    spdlog::default_logger()->flush();
    std::_Exit(1);
  }

  void watch() {
    using clock = std::chrono::steady_clock;
    const auto deadline = clock::now() + timeout_;
    for (;;) {
      int wait_ms = -1;
      if (timeout_.count() > 0) {
        const auto left =
            std::chrono::ceil<std::chrono::milliseconds>(deadline - clock::now()).count();
        if (left <= 0)
          give_up("the stop did not finish within " + std::to_string(timeout_.count()) +
                  " s (stop_timeout_seconds)");
        wait_ms = static_cast<int>(left);
      }
      pollfd fds[2] = {{done_fd_, POLLIN, 0}, {pipe_out_, POLLIN, 0}};
      if (::poll(fds, 2, wait_ms) < 0) {
        if (errno == EINTR) continue;
        spdlog::error("tailord: cannot watch the stop ({}); it has no time limit",
                      std::strerror(errno));
        return;
      }
      if (fds[0].revents != 0) return;
      if (fds[1].revents == 0) continue;
      const char why = next_stop_reason(pipe_out_);
      // A failure while stopping changes nothing: the stop goes on.
      if (why != stop_failure) give_up(std::string(signal_name(why)) + " received again");
    }
  }

  const engine& engine_;
  const std::chrono::seconds timeout_;
  const int pipe_out_;
  int done_fd_ = -1;
  std::thread thread_;
};

}  // namespace

int main(int argc, char** argv) {
  restart_with_huge_page_heap(argv);
  tailor::model::configure_allocator();
  engine_config cfg;
  CLI::App app{
      "tailord - the Tailor engine: personal LoRA models, trained and served through Kafka"};
  std::string config_file, bootstrap, group_id, instance_id, data_dir, admin_host, ready_file,
      log_level;
  std::vector<std::string> props;
  int admin_port = -1, max_in_flight = -1, idle = -1, slots = -1, admission_queue = -1,
      stop_timeout = -1;
  bool sync_writes = false, check_config = false, exactly_once = false;
  app.set_version_flag("--version", std::string("tailord ") + TAILOR_VERSION);
  app.add_option("-c,--config", config_file, "JSON configuration file (see docs/configuration.md)")
      ->check(CLI::ExistingFile);
  app.add_flag("--check-config", check_config,
               "check the configuration (file and flags) and exit: 0 when it is good, 2 with the "
               "reason when not; starts nothing");
  app.add_option("-b,--bootstrap-servers", bootstrap,
                 "Kafka bootstrap servers; unset: start an embedded mock cluster (demo only)");
  app.add_option("-g,--group-id", group_id, "Kafka consumer group (default: tailor)");
  app.add_option("--instance-id", instance_id,
                 "this instance's name in its group (default: made up at the first start and "
                 "kept in the data directory)");
  app.add_option("-X,--kafka-property", props,
                 "librdkafka property KEY=VALUE, repeatable (SASL, TLS, ...)");
  app.add_option("-d,--data-dir", data_dir, "RocksDB and artifacts (default: $TAILOR_HOME/engine)");
  app.add_option("--admin-host", admin_host, "admin API address (default: 127.0.0.1)");
  std::string admin_token_file;
  app.add_option("--admin-token-file", admin_token_file,
                 "file whose first line is the admin API's bearer token; every path but "
                 "/healthz and /readyz then needs it (default: none, open to whoever reaches it)");
  app.add_option("-p,--admin-port", admin_port,
                 "admin API port; 0 picks a free one (default: 8080)")
      ->check(CLI::Range(0, 65535));
  app.add_option(
      "--ready-file", ready_file,
      "write {admin_port, bootstrap_servers, pid} as JSON here once consumers have joined");
  app.add_option("--max-in-flight", max_in_flight,
                 "events in flight per input topic before consumption pauses (default: 256)")
      ->check(CLI::PositiveNumber);
  app.add_option("--user-idle-seconds", idle,
                 "retire a user actor after this long without events (default: 60)")
      ->check(CLI::PositiveNumber);
  app.add_option("--training-slots", slots,
                 "training actors, one fine-tuning job each at a time (default: 2)")
      ->check(CLI::PositiveNumber);
  app.add_option("--admission-queue", admission_queue,
                 "jobs waiting for a training slot before onboarding pauses (default: 32)")
      ->check(CLI::PositiveNumber);
  app.add_option("--stop-timeout-seconds", stop_timeout,
                 "a stop not finished by then ends tailord with status 1; 0: no limit "
                 "(default: 120)")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--exactly-once", exactly_once,
               "commit answers and input offsets in Kafka transactions, so that read_committed "
               "consumers see each answer once (kafka.exactly_once)");
  app.add_flag("--sync-writes", sync_writes,
               "fsync RocksDB's WAL on every write (survives power loss)");
  app.add_option("--log-level", log_level, "trace|debug|info|warn|error (default: info)");
  app.footer(
      "Environment: TAILOR_HOME holds the default data and model directories. tailord starts\n"
      "itself again once, first thing, with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (malloc's heap\n"
      "on transparent huge pages); TAILOR_MALLOC_HUGE_PAGES=0, or glibc.malloc.hugetlb already\n"
      "in GLIBC_TUNABLES, starts it as it is. docs/configuration.md has the rest.\n"
      "Exit status: 0 after SIGTERM or SIGINT; 1 when it cannot start, when the engine failed\n"
      "and stopped, or when a stop did not finish (--stop-timeout-seconds, or a second\n"
      "SIGTERM or SIGINT): restart it, it reads again what it did not finish; 2 for a bad\n"
      "command line or configuration.");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version end with 0; every usage error with 2, as a bad
    // configuration does (CLI11's own codes would be 100 and up).
    return app.exit(e) == 0 ? 0 : 2;
  }

  if (!config_file.empty()) {
    if (auto err = load_config_file(config_file, cfg); !err.empty()) {
      std::fprintf(stderr, "tailord: %s\n", err.c_str());
      return 2;
    }
  }
  if (!bootstrap.empty()) cfg.kafka.bootstrap_servers = bootstrap;
  if (!group_id.empty()) cfg.kafka.group_id = group_id;
  if (!instance_id.empty()) cfg.instance.id = instance_id;
  for (const auto& p : props) {
    auto eq = p.find('=');
    if (eq == std::string::npos || eq == 0) {
      std::fprintf(stderr, "tailord: --kafka-property %s: expected KEY=VALUE\n", p.c_str());
      return 2;
    }
    cfg.kafka.properties[p.substr(0, eq)] = p.substr(eq + 1);
  }
  if (!data_dir.empty()) cfg.data_dir = data_dir;
  if (!admin_host.empty()) cfg.admin_host = admin_host;
  if (!admin_token_file.empty()) cfg.admin_token_file = admin_token_file;
  if (admin_port >= 0) cfg.admin_port = admin_port;
  if (!ready_file.empty()) cfg.ready_file = ready_file;
  if (max_in_flight > 0) cfg.max_in_flight = max_in_flight;
  if (idle > 0) cfg.user_idle_seconds = idle;
  if (sync_writes) cfg.sync_writes = true;
  if (exactly_once) cfg.kafka.exactly_once = true;
  if (stop_timeout >= 0) cfg.stop_timeout_seconds = stop_timeout;
  if (slots > 0) cfg.training.slots = slots;
  if (admission_queue > 0) cfg.training.admission_queue = admission_queue;
  if (!log_level.empty()) cfg.log_level = log_level;
  auto level = spdlog::level::from_str(cfg.log_level);
  if (level == spdlog::level::off && cfg.log_level != "off") {
    std::fprintf(stderr, "tailord: --log-level %s: expected trace|debug|info|warn|error\n",
                 cfg.log_level.c_str());
    return 2;
  }
  spdlog::set_level(level);
  // One log, one format: librdkafka's lines too.
  tailor::actors::log_kafka_through_spdlog();
  resolve_paths(cfg);
  if (auto bad = validate(cfg); !bad.empty()) {
    std::fprintf(stderr, "tailord: %s\n", bad.c_str());
    return 2;
  }
  // A bad pass-through property is refused now, not after the base models
  // load (minutes, when one has to be pre-trained first).
  if (std::string bad; !tailor::actors::make_conf(cfg.kafka, {}, bad)) {
    std::fprintf(stderr, "tailord: -X / kafka.properties: %s\n", bad.c_str());
    return 2;
  }
  if (std::string token; !cfg.admin_token_file.empty())
    if (auto why = tailor::actors::read_admin_token(cfg.admin_token_file, token); !why.empty()) {
      std::fprintf(stderr, "tailord: admin.token_file: %s\n", why.c_str());
      return 2;
    }
  if (check_config) {
    std::printf("tailord: the configuration is good\n");
    return 0;
  }

  // Before any thread starts: they all inherit the policy.
  if (cfg.compute.scheduling == "batch") {
    std::string why;
    if (!tailor::model::use_batch_scheduling(why))
      spdlog::warn("cannot run SCHED_BATCH ({}); tailord's threads keep the default policy", why);
  }

  // Base models load (or pre-train) before the stop signals are blocked, so
  // that SIGTERM during a long pre-training simply ends the process.
  std::string err;
  auto bases = load_base_models(cfg, err);
  if (!bases) {
    spdlog::critical("tailord cannot start: {}", err);
    return 1;
  }

  // Block the stop signals before the engine's threads start, so that they
  // inherit the mask and never see a signal (nor an EINTR from one); the
  // main thread unblocks them once it waits for the reason to stop. A signal
  // that comes while the engine starts is kept in the pipe till then.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  const int stop_pipe_out = install_stop_handler(err);
  if (stop_pipe_out < 0) {
    spdlog::critical("tailord cannot start: {}", err);
    return 1;
  }

  auto e = engine::start(cfg, err, bases);
  if (!e) {
    spdlog::critical("tailord cannot start: {}", err);
    return 1;
  }
  spdlog::info("tailord: Kafka {}, admin API http://{}:{}/", e->bootstrap_servers(), cfg.admin_host,
               e->admin_port());
  spdlog::info("tailord: BLAS {}; CUDA kernels {}", tailor::model::blas_library(),
               tailor::model::cuda_kernels());

  // Announce readiness from a helper thread; the main thread waits for a signal.
  std::atomic<bool> stopping{false};
  std::thread announcer([&] {
    auto next_note = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!stopping && !e->ready()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      if (std::chrono::steady_clock::now() > next_note) {
        spdlog::warn("tailord: consumers have not joined their group yet");
        next_note += std::chrono::seconds(10);
      }
    }
    if (stopping) return;
    spdlog::info("tailord: ready");
    if (!cfg.ready_file.empty() && !write_ready_file(cfg.ready_file, *e))
      spdlog::error("tailord: cannot write ready file {}", cfg.ready_file);
  });
  // An engine that fails (an actor it cannot restart ended) has stopped in
  // order; tailord then ends with status 1, so that its process manager
  // starts a fresh one, which reads again what this one did not finish.
  std::string failure;
  std::thread watcher([&] {
    failure = e->wait_for_failure();
    if (!failure.empty() && ::write(stop_pipe_in, &stop_failure, 1) != 1) {
      // Cannot happen (the pipe holds thousands); never go on failed.
      spdlog::critical("tailord: the engine failed ({}); exiting", failure);
      spdlog::default_logger()->flush();
      std::_Exit(1);
    }
  });
  pthread_sigmask(SIG_UNBLOCK, &stop_signals, nullptr);
  const char why = next_stop_reason(stop_pipe_out);
  stopping = true;
  if (why == stop_failure)
    spdlog::critical("tailord: the engine failed ({}); stopping", e->failure());
  else
    spdlog::info("tailord: {} received, stopping", signal_name(why));
  {
    stop_watchdog watchdog(*e, std::chrono::seconds(cfg.stop_timeout_seconds), stop_pipe_out);
    announcer.join();
    e->stop();
    watcher.join();
  }
  if (!failure.empty()) {
    spdlog::critical("tailord: stopped after a failure: {}", failure);
    return 1;
  }
  spdlog::info("tailord: stopped");
  return 0;
}
