#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

namespace tailor::model {

// A zeroed tensor whose memory the kernel may back with 2 MiB pages
// (transparent huge pages, asked for with madvise). A batch step reads the
// key/value cache and the adapter bank at ~1,000 scattered 4 KiB pages; on
// 2 MiB pages those reads stop missing the TLB. Below `min_bytes` (or where
// the kernel refuses) it is an ordinary tensor.
torch::Tensor huge_page_zeros(const std::vector<int64_t>& sizes, torch::ScalarType type,
                              int64_t min_bytes = int64_t{1} << 20);

// Whether the kernel backs `t`'s memory with huge pages now (from
// /proc/self/smaps); for tests and diagnostics, not for the hot path.
bool backed_by_huge_pages(const torch::Tensor& t);

}  // namespace tailor::model
