#include "model/threads.hpp"

#include <dlfcn.h>
#include <malloc.h>
#include <sched.h>
#include <torch/torch.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <filesystem>
#include <fstream>

#ifdef TAILOR_WITH_CUDA
#include "model/cuda/bgmv.hpp"
#endif

namespace tailor::model {

namespace {

// OpenBLAS is found at run time: Debian's alternatives decide which BLAS
// libblas.so.3 is, so there is nothing to link against by name.
template <class F>
F openblas_fn(const char* name) {
  return reinterpret_cast<F>(::dlsym(RTLD_DEFAULT, name));
}

}  // namespace

void configure_threads(int intra_op, int blas) {
  if (intra_op > 0) torch::set_num_threads(intra_op);
  if (blas > 0)
    if (auto set = openblas_fn<void (*)(int)>("openblas_set_num_threads")) set(blas);
}

bool use_batch_scheduling(std::string& err) {
  sched_param param{};
  param.sched_priority = 0;
  if (sched_setscheduler(0, SCHED_BATCH, &param) != 0) {
    err = std::strerror(errno);
    return false;
  }
  // Threads started before main (OpenBLAS starts its pool as it loads) do
  // not inherit it: each gets it by its id.
  std::error_code ec;
  for (const auto& t : std::filesystem::directory_iterator("/proc/self/task", ec)) {
    const auto name = t.path().filename().string();
    pid_t tid = 0;
    if (std::from_chars(name.data(), name.data() + name.size(), tid).ec != std::errc{}) continue;
    if (sched_setscheduler(tid, SCHED_BATCH, &param) != 0 && errno != ESRCH) {
      err = std::strerror(errno);
      return false;
    }
  }
  return true;
}

void configure_allocator() {
  // Fixed values also switch off glibc's dynamic threshold, which starts at
  // 128 KiB and trims after every large free until it has adapted.
  ::mallopt(M_MMAP_THRESHOLD, 32 << 20);
  ::mallopt(M_TRIM_THRESHOLD, 256 << 20);
}

std::string blas_library() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    auto path_start = line.find('/');
    auto slash = line.rfind('/');
    if (slash == std::string::npos) continue;
    auto file = line.substr(slash + 1);
    // Debian's alternatives resolve libblas.so.3 to e.g. .../openblas-pthread/libblas.so.3.
    if (file.find("blas") != std::string::npos && file.find("cublas") == std::string::npos)
      return line.substr(path_start);
  }
  return "none";
}

int blas_threads() {
  if (auto get = openblas_fn<int (*)()>("openblas_get_num_threads")) return get();
  return -1;
}

int intra_op_threads() {
  return torch::get_num_threads();
}

std::string cuda_kernels() {
  // The kernels run only on tensors that LibTorch placed on a CUDA device.
  const std::string torch_cuda = torch::cuda::is_available() ? "yes" : "no";
#ifdef TAILOR_WITH_CUDA
  return "built (CUDA devices: " + std::to_string(cuda::device_count()) +
         ", LibTorch with CUDA: " + torch_cuda + ")";
#else
  return "not built (no nvcc at configure time; LibTorch with CUDA: " + torch_cuda + ")";
#endif
}

}  // namespace tailor::model
