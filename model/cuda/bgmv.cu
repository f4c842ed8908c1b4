// CUDA kernels of the gathered low-rank product (design section 5): a shrink
// to each row's rank, then an expand added to the projection's output, as
// Punica's BGMV splits it. One thread per (row, k) and per (row, o): every
// row reads its own adapter in place from the bank, so rows of different
// users share one launch.
#include <cuda_runtime.h>

#include "model/cuda/bgmv.hpp"
#include "model/cuda/bgmv_math.hpp"

namespace tailor::model::cuda {

namespace {

constexpr int expand_threads = 128;

__global__ void shrink_kernel(const float* x, const uint16_t* a, const int64_t* places,
                              const int64_t* ranks, float* xa, bgmv::shape s) {
  const int64_t row = blockIdx.x;
  const int64_t k = threadIdx.x;
  if (row >= s.rows || k >= s.r) return;
  xa[row * s.r + k] =
      k < ranks[row] ? bgmv::shrink(x, a, places[row], ranks[row], row, k, s) : 0.0f;
}

__global__ void expand_kernel(const float* xa, const uint16_t* b, const int64_t* places,
                              const int64_t* ranks, float* out, bgmv::shape s) {
  const int64_t row = blockIdx.y;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= s.rows || o >= s.n_out || ranks[row] == 0) return;
  out[row * s.n_out + o] += bgmv::expand(xa, b, places[row], ranks[row], row, o, s);
}

}  // namespace

std::string bgmv(const float* x, const uint16_t* a, const uint16_t* b, const int64_t* places,
                 const int64_t* ranks, float* out, float* xa, int64_t rows, int64_t in, int64_t r,
                 int64_t n_out, void* stream) {
  if (rows == 0) return {};
  // Grid limits: rows is a batch (<= 65535 in y) and r a LoRA rank (<= 1024).
  if (rows > 65535 || r > 1024) return "bgmv: batch or rank beyond the launch limits";
  const bgmv::shape s{rows, in, r, n_out};
  auto st = static_cast<cudaStream_t>(stream);
  shrink_kernel<<<static_cast<unsigned>(rows), static_cast<unsigned>(r), 0, st>>>(x, a, places,
                                                                                  ranks, xa, s);
  const dim3 grid(static_cast<unsigned>((n_out + expand_threads - 1) / expand_threads),
                  static_cast<unsigned>(rows));
  expand_kernel<<<grid, expand_threads, 0, st>>>(xa, b, places, ranks, out, s);
  if (auto err = cudaGetLastError(); err != cudaSuccess) return cudaGetErrorString(err);
  return {};
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

}  // namespace tailor::model::cuda
