#pragma once
// The gathered low-rank product on a CUDA device, callable from code that is
// compiled without CUDA headers. Built only where nvcc is found
// (TAILOR_WITH_CUDA); model/transformer.cpp calls it for CUDA tensors.

#include <cstdint>
#include <string>

namespace tailor::model::cuda {

// out[b, :] += (x[b, :] · A[places[b], :, :ranks[b]]) · B[places[b], :ranks[b], :]
// for every row b, on `stream` (a cudaStream_t; nullptr: the default
// stream). A and B are the bank's bfloat16 bits (bgmv_math.hpp's layout).
// Every pointer is device memory; `xa` is scratch of rows * r floats.
// Returns an empty string, or the CUDA error that stopped it.
std::string bgmv(const float* x, const uint16_t* a, const uint16_t* b, const int64_t* places,
                 const int64_t* ranks, float* out, float* xa, int64_t rows, int64_t in, int64_t r,
                 int64_t n_out, void* stream);

// CUDA devices this process can use (0 without a driver or a GPU).
int device_count();

}  // namespace tailor::model::cuda
