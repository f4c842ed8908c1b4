#include "model/dense.hpp"

#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace tailor::model {

namespace {

// Every kernel computes an element as acc = 0; acc = fma(x[k], w[k], acc)
// for k = 0 .. in-1 (portable: acc += x[k] * w[k]); then acc + b. Rows go
// in blocks of four while they last, then one by one: the blocks only
// share the loads of the matrix, never an element's arithmetic.

// Columns in blocks of 32 (two 16-float registers; masks for the last),
// and within one block every row, so the block's slice of the matrix
// stays in L1 while the rows pass over it.
__attribute__((target("avx512f"))) void dense_avx512(const float* x, int64_t rows, int64_t in,
                                                     const float* wt, int64_t out, const float* b,
                                                     float* y) {
  for (int64_t n = 0; n < out; n += 32) {
    const int64_t left = out - n;
    const __mmask16 m0 = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    const __mmask16 m1 = left >= 32   ? 0xFFFF
                         : left <= 16 ? 0
                                      : static_cast<__mmask16>((1u << (left - 16)) - 1);
    const __m512 b0 = b ? _mm512_maskz_loadu_ps(m0, b + n) : _mm512_setzero_ps();
    const __m512 b1 = b ? _mm512_maskz_loadu_ps(m1, b + n + 16) : _mm512_setzero_ps();
    int64_t m = 0;
    for (; m + 4 <= rows; m += 4) {
      const float* x0 = x + m * in;
      const float *x1 = x0 + in, *x2 = x1 + in, *x3 = x2 + in;
      __m512 a00 = _mm512_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00,
             a30 = a00, a31 = a00;
      const float* w = wt + n;
      for (int64_t k = 0; k < in; ++k, w += out) {
        const __m512 w0 = _mm512_maskz_loadu_ps(m0, w), w1 = _mm512_maskz_loadu_ps(m1, w + 16);
        __m512 v = _mm512_set1_ps(x0[k]);
        a00 = _mm512_fmadd_ps(v, w0, a00);
        a01 = _mm512_fmadd_ps(v, w1, a01);
        v = _mm512_set1_ps(x1[k]);
        a10 = _mm512_fmadd_ps(v, w0, a10);
        a11 = _mm512_fmadd_ps(v, w1, a11);
        v = _mm512_set1_ps(x2[k]);
        a20 = _mm512_fmadd_ps(v, w0, a20);
        a21 = _mm512_fmadd_ps(v, w1, a21);
        v = _mm512_set1_ps(x3[k]);
        a30 = _mm512_fmadd_ps(v, w0, a30);
        a31 = _mm512_fmadd_ps(v, w1, a31);
      }
      // Without a bias, b0 and b1 are zeros.
      float* yr = y + m * out + n;
      _mm512_mask_storeu_ps(yr, m0, _mm512_add_ps(a00, b0));
      _mm512_mask_storeu_ps(yr + 16, m1, _mm512_add_ps(a01, b1));
      yr += out;
      _mm512_mask_storeu_ps(yr, m0, _mm512_add_ps(a10, b0));
      _mm512_mask_storeu_ps(yr + 16, m1, _mm512_add_ps(a11, b1));
      yr += out;
      _mm512_mask_storeu_ps(yr, m0, _mm512_add_ps(a20, b0));
      _mm512_mask_storeu_ps(yr + 16, m1, _mm512_add_ps(a21, b1));
      yr += out;
      _mm512_mask_storeu_ps(yr, m0, _mm512_add_ps(a30, b0));
      _mm512_mask_storeu_ps(yr + 16, m1, _mm512_add_ps(a31, b1));
    }
    for (; m < rows; ++m) {
      const float* x0 = x + m * in;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0;
      const float* w = wt + n;
      for (int64_t k = 0; k < in; ++k, w += out) {
        const __m512 v = _mm512_set1_ps(x0[k]);
        a0 = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m0, w), a0);
        a1 = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m1, w + 16), a1);
      }
      float* yr = y + m * out + n;
      _mm512_mask_storeu_ps(yr, m0, _mm512_add_ps(a0, b0));
      _mm512_mask_storeu_ps(yr + 16, m1, _mm512_add_ps(a1, b1));
    }
  }
}

// The same in blocks of 16 columns (two 8-float registers); the columns
// past the last full block one element at a time (fma rounds as a lane does).
__attribute__((target("avx2,fma"))) void dense_avx2(const float* x, int64_t rows, int64_t in,
                                                    const float* wt, int64_t out, const float* b,
                                                    float* y) {
  const int64_t full = out / 16 * 16;
  for (int64_t n = 0; n < full; n += 16) {
    const __m256 b0 = b ? _mm256_loadu_ps(b + n) : _mm256_setzero_ps();
    const __m256 b1 = b ? _mm256_loadu_ps(b + n + 8) : _mm256_setzero_ps();
    int64_t m = 0;
    for (; m + 4 <= rows; m += 4) {
      const float* x0 = x + m * in;
      const float *x1 = x0 + in, *x2 = x1 + in, *x3 = x2 + in;
      __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00,
             a30 = a00, a31 = a00;
      const float* w = wt + n;
      for (int64_t k = 0; k < in; ++k, w += out) {
        const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
        __m256 v = _mm256_broadcast_ss(x0 + k);
        a00 = _mm256_fmadd_ps(v, w0, a00);
        a01 = _mm256_fmadd_ps(v, w1, a01);
        v = _mm256_broadcast_ss(x1 + k);
        a10 = _mm256_fmadd_ps(v, w0, a10);
        a11 = _mm256_fmadd_ps(v, w1, a11);
        v = _mm256_broadcast_ss(x2 + k);
        a20 = _mm256_fmadd_ps(v, w0, a20);
        a21 = _mm256_fmadd_ps(v, w1, a21);
        v = _mm256_broadcast_ss(x3 + k);
        a30 = _mm256_fmadd_ps(v, w0, a30);
        a31 = _mm256_fmadd_ps(v, w1, a31);
      }
      float* yr = y + m * out + n;
      _mm256_storeu_ps(yr, _mm256_add_ps(a00, b0));
      _mm256_storeu_ps(yr + 8, _mm256_add_ps(a01, b1));
      yr += out;
      _mm256_storeu_ps(yr, _mm256_add_ps(a10, b0));
      _mm256_storeu_ps(yr + 8, _mm256_add_ps(a11, b1));
      yr += out;
      _mm256_storeu_ps(yr, _mm256_add_ps(a20, b0));
      _mm256_storeu_ps(yr + 8, _mm256_add_ps(a21, b1));
      yr += out;
      _mm256_storeu_ps(yr, _mm256_add_ps(a30, b0));
      _mm256_storeu_ps(yr + 8, _mm256_add_ps(a31, b1));
    }
    for (; m < rows; ++m) {
      const float* x0 = x + m * in;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0;
      const float* w = wt + n;
      for (int64_t k = 0; k < in; ++k, w += out) {
        const __m256 v = _mm256_broadcast_ss(x0 + k);
        a0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w), a0);
        a1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w + 8), a1);
      }
      float* yr = y + m * out + n;
      _mm256_storeu_ps(yr, _mm256_add_ps(a0, b0));
      _mm256_storeu_ps(yr + 8, _mm256_add_ps(a1, b1));
    }
  }
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t n = full; n < out; ++n) {
      float acc = 0;
      for (int64_t k = 0; k < in; ++k) acc = __builtin_fmaf(x[m * in + k], wt[k * out + n], acc);
      y[m * out + n] = acc + (b ? b[n] : 0.0f);
    }
}

// Any x86-64 (or other) machine: one row at a time, vectorised over the
// columns by the compiler; no fma, so no slow software one.
void dense_portable(const float* x, int64_t rows, int64_t in, const float* wt, int64_t out,
                    const float* b, float* y) {
  std::vector<float> acc(static_cast<std::size_t>(out));
  for (int64_t m = 0; m < rows; ++m) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t k = 0; k < in; ++k) {
      const float xv = x[m * in + k];
      const float* w = wt + k * out;
      for (int64_t n = 0; n < out; ++n) acc[static_cast<std::size_t>(n)] += xv * w[n];
    }
    for (int64_t n = 0; n < out; ++n)
      y[m * out + n] = acc[static_cast<std::size_t>(n)] + (b ? b[n] : 0.0f);
  }
}

}  // namespace

bool dense_supported(dense_isa isa) {
  switch (isa) {
    case dense_isa::avx512:
      return __builtin_cpu_supports("avx512f");
    case dense_isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case dense_isa::portable:
      return true;
  }
  return false;
}

const char* dense_name(dense_isa isa) {
  switch (isa) {
    case dense_isa::avx512:
      return "avx512";
    case dense_isa::avx2:
      return "avx2";
    case dense_isa::portable:
      return "portable";
  }
  return "?";
}

dense_isa dense_best() {
  static const dense_isa best = dense_supported(dense_isa::avx512) ? dense_isa::avx512
                                : dense_supported(dense_isa::avx2) ? dense_isa::avx2
                                                                   : dense_isa::portable;
  return best;
}

void dense(dense_isa isa, const float* x, int64_t rows, int64_t in, const float* wt, int64_t out,
           const float* b, float* y) {
  switch (isa) {
    case dense_isa::avx512:
      return dense_avx512(x, rows, in, wt, out, b, y);
    case dense_isa::avx2:
      return dense_avx2(x, rows, in, wt, out, b, y);
    case dense_isa::portable:
      return dense_portable(x, rows, in, wt, out, b, y);
  }
}

void dense(const float* x, int64_t rows, int64_t in, const float* wt, int64_t out, const float* b,
           float* y) {
  dense(dense_best(), x, rows, in, wt, out, b, y);
}

}  // namespace tailor::model
