#pragma once
// The arithmetic of one element of the gathered low-rank product (Punica's
// BGMV shape), shared by the CUDA kernels (bgmv.cu) and by the test that
// checks it on the CPU, where no GPU is present to run the kernels; the
// CPU loop (transformer.cpp) reads the bank's bfloat16 with the same widen().
//
// Layouts are those of model::adapter_bank: bfloat16 factors A
// [places, in, r] with each place's A packed [in, rank] at its start, and
// B [places, r, n_out], row-major; row b uses place places[b] up to its own
// rank ranks[b] <= r (0: no adapter). Sums are in float.

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define TAILOR_HOST_DEVICE __host__ __device__
#else
#define TAILOR_HOST_DEVICE
#endif

namespace tailor::model::bgmv {

// A bfloat16 (the upper half of a float's bits) as the float it stands for.
TAILOR_HOST_DEVICE inline float widen(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(static_cast<unsigned>(h) << 16);
#else
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

struct shape {
  int64_t rows = 0;   // batch rows
  int64_t in = 0;     // input width of the projection
  int64_t r = 0;      // the bank's rank (the stride of A's rows)
  int64_t n_out = 0;  // output width of the projection
};

// xa[row, k] = x[row, :] · A[place, :, k] (k < rank): the shrink to rank.
TAILOR_HOST_DEVICE inline float shrink(const float* x, const uint16_t* a, int64_t place,
                                       int64_t rank, int64_t row, int64_t k, shape s) {
  const float* xr = x + row * s.in;
  const uint16_t* ak = a + place * s.in * s.r + k;
  float acc = 0.0f;
  for (int64_t i = 0; i < s.in; ++i) acc += xr[i] * widen(ak[i * rank]);
  return acc;
}

// The term added to out[row, o]: xa[row, :rank] · B[place, :rank, o].
TAILOR_HOST_DEVICE inline float expand(const float* xa, const uint16_t* b, int64_t place,
                                       int64_t rank, int64_t row, int64_t o, shape s) {
  const float* xr = xa + row * s.r;
  const uint16_t* bo = b + place * s.r * s.n_out + o;
  float acc = 0.0f;
  for (int64_t k = 0; k < rank; ++k) acc += xr[k] * widen(bo[k * s.n_out]);
  return acc;
}

}  // namespace tailor::model::bgmv
