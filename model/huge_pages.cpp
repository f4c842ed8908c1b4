#include "model/huge_pages.hpp"

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

namespace tailor::model {

namespace {

constexpr int64_t huge_page = int64_t{2} << 20;

}  // namespace

torch::Tensor huge_page_zeros(const std::vector<int64_t>& sizes, torch::ScalarType type,
                              int64_t min_bytes) {
  const auto options = torch::TensorOptions().dtype(type);
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(type));
  if (bytes < min_bytes) return torch::zeros(sizes, options);
  const int64_t rounded = (bytes + huge_page - 1) / huge_page * huge_page;
  void* p = std::aligned_alloc(huge_page, static_cast<std::size_t>(rounded));
  if (p == nullptr) return torch::zeros(sizes, options);
  // Advice only: where the kernel has no transparent huge pages, this fails
  // and the memory is ordinary pages, which is what torch::zeros would give.
  (void)::madvise(p, static_cast<std::size_t>(rounded), MADV_HUGEPAGE);
  std::memset(p, 0, static_cast<std::size_t>(bytes));
  return torch::from_blob(p, sizes, [](void* q) { std::free(q); }, options);
}

bool backed_by_huge_pages(const torch::Tensor& t) {
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool inside = false;
  while (std::getline(smaps, line)) {
    uintptr_t lo = 0, hi = 0;
    char dash = 0;
    std::istringstream head(line);
    if (head >> std::hex >> lo >> dash >> hi && dash == '-') {
      inside = lo <= begin && begin < hi;
      continue;
    }
    if (inside && line.rfind("AnonHugePages:", 0) == 0) {
      std::istringstream value(line.substr(14));
      int64_t kb = 0;
      value >> kb;
      return kb > 0;
    }
  }
  return false;
}

}  // namespace tailor::model
