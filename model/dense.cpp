#include "model/dense.hpp"

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <bit>
#include <type_traits>
#include <vector>

#include "model/step_helper.hpp"

namespace tailor::model {

namespace {

// Every kernel computes an element as acc = 0; acc = fma(x[k], w[k], acc)
// for k = 0 .. in-1 (portable: acc += x[k] * w[k]); then acc + b. Rows go
// in blocks while they last, then one by one: the blocks only share the
// loads of the matrix, never an element's arithmetic.

// R rows by 32 columns (two 16-float registers each; masks for the last
// columns) of dense_avx512.
template <int R>
__attribute__((target("avx512f"))) inline void block_avx512(const float* x, int64_t in,
                                                            const float* w, int64_t out,
                                                            __mmask16 m0, __mmask16 m1, __m512 b0,
                                                            __m512 b1, float* y) {
  __m512 a0[R], a1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < in; ++k, w += out) {
    const __m512 w0 = _mm512_maskz_loadu_ps(m0, w), w1 = _mm512_maskz_loadu_ps(m1, w + 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 v = _mm512_set1_ps(x[r * in + k]);
      a0[r] = _mm512_fmadd_ps(v, w0, a0[r]);
      a1[r] = _mm512_fmadd_ps(v, w1, a1[r]);
    }
  }
  // Without a bias, b0 and b1 are zeros.
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(y + r * out, m0, _mm512_add_ps(a0[r], b0));
    _mm512_mask_storeu_ps(y + r * out + 16, m1, _mm512_add_ps(a1[r], b1));
  }
}

// Where one block of an AVX-512 kernel sits: its first row and column, the
// masks of its two 16-column halves and their bias (zeros without one).
struct block_at {
  int64_t m, n;
  __mmask16 m0, m1;
  __m512 b0, b1;
};

// Column block c (of 32) at row 0: its masks and bias.
__attribute__((target("avx512f"))) inline block_at column_block(int64_t c, int64_t out,
                                                               const float* b) {
  const int64_t n = c * 32, left = out - n;
  block_at at{0, n, 0, 0, _mm512_setzero_ps(), _mm512_setzero_ps()};
  at.m0 = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
  at.m1 = left >= 32   ? 0xFFFF
          : left <= 16 ? 0
                       : static_cast<__mmask16>((1u << (left - 16)) - 1);
  if (b) {
    at.b0 = _mm512_maskz_loadu_ps(at.m0, b + n);
    at.b1 = _mm512_maskz_loadu_ps(at.m1, b + n + 16);
  }
  return at;
}

// Columns in blocks of 32, and within one block every row (by eights, then
// fours, then one by one), so the block's slice of the matrix stays in L1
// while the rows pass over it: block(std::integral_constant<int, R>, at)
// for each block of R rows. The column blocks are the chunks a step's
// helper may share (parallel_chunks).
template <typename Block>
__attribute__((target("avx512f"))) inline void each_block(int64_t rows, int64_t out,
                                                          const float* b, Block&& block) {
  parallel_chunks((out + 31) / 32, [&](int64_t c) __attribute__((target("avx512f"))) {
    block_at at = column_block(c, out, b);
    for (; at.m + 8 <= rows; at.m += 8) block(std::integral_constant<int, 8>{}, at);
    for (; at.m + 4 <= rows; at.m += 4) block(std::integral_constant<int, 4>{}, at);
    for (; at.m < rows; ++at.m) block(std::integral_constant<int, 1>{}, at);
  });
}

__attribute__((target("avx512f"))) void dense_avx512(const float* x, int64_t rows, int64_t in,
                                                     const float* wt, int64_t out, const float* b,
                                                     float* y) {
  each_block(rows, out, b, [&](auto r, const block_at& at) __attribute__((target("avx512f"))) {
    block_avx512<decltype(r)::value>(x + at.m * in, in, wt + at.n, out, at.m0, at.m1, at.b0,
                                     at.b1, y + at.m * out + at.n);
  });
}

// R rows by 16 columns (two 8-float registers each) of dense_avx2.
template <int R>
__attribute__((target("avx2,fma"))) inline void block_avx2(const float* x, int64_t in,
                                                           const float* w, int64_t out, __m256 b0,
                                                           __m256 b1, float* y) {
  __m256 a0[R], a1[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < in; ++k, w += out) {
    const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 v = _mm256_broadcast_ss(x + r * in + k);
      a0[r] = _mm256_fmadd_ps(v, w0, a0[r]);
      a1[r] = _mm256_fmadd_ps(v, w1, a1[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + r * out, _mm256_add_ps(a0[r], b0));
    _mm256_storeu_ps(y + r * out + 8, _mm256_add_ps(a1[r], b1));
  }
}

// The same in blocks of 16 columns, rows by fours; the columns past the
// last full block one element at a time (fma rounds as a lane does).
__attribute__((target("avx2,fma"))) void dense_avx2(const float* x, int64_t rows, int64_t in,
                                                    const float* wt, int64_t out, const float* b,
                                                    float* y) {
  const int64_t full = out / 16 * 16;
  for (int64_t n = 0; n < full; n += 16) {
    const __m256 b0 = b ? _mm256_loadu_ps(b + n) : _mm256_setzero_ps();
    const __m256 b1 = b ? _mm256_loadu_ps(b + n + 8) : _mm256_setzero_ps();
    int64_t m = 0;
    for (; m + 4 <= rows; m += 4)
      block_avx2<4>(x + m * in, in, wt + n, out, b0, b1, y + m * out + n);
    for (; m < rows; ++m) block_avx2<1>(x + m * in, in, wt + n, out, b0, b1, y + m * out + n);
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

// bfloat16 products. The matrix is packed as pairs of consecutive inputs
// per output (packed_bf16), so that one 32-bit lane holds the two weights a
// dot-product instruction pairs with two inputs of a row, and by blocks of
// 32 outputs, each block's pairs one after another: a block reads one
// contiguous stream, which the hardware prefetches, where rows of the whole
// matrix put each pair on another page. An element is
// acc = 0; acc = dpbf16(acc, (x[2k], x[2k+1]), (w[2k], w[2k+1])) for the
// pairs k in order; then acc + b. As in the float kernels, blocks only
// share loads, never an element's arithmetic.
#define TAILOR_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

template <int R>
TAILOR_AVX512_BF16 inline void block_bf16(const uint32_t* x, int64_t pairs, const uint32_t* w,
                                          int64_t out, __mmask16 m0, __mmask16 m1, __m512 b0,
                                          __m512 b1, float* y) {
  __m512 a0[R], a1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  // The block's columns past `out` are zeros in the packing: no masks.
  for (int64_t k = 0; k < pairs; ++k, w += 32) {
    const auto w0 = (__m512bh)_mm512_loadu_si512(w);
    const auto w1 = (__m512bh)_mm512_loadu_si512(w + 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const auto v = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * pairs + k]));
      a0[r] = _mm512_dpbf16_ps(a0[r], v, w0);
      a1[r] = _mm512_dpbf16_ps(a1[r], v, w1);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(y + r * out, m0, _mm512_add_ps(a0[r], b0));
    _mm512_mask_storeu_ps(y + r * out + 16, m1, _mm512_add_ps(a1[r], b1));
  }
}

// x's rows as bfloat16 pairs (rounded to nearest even; a zero pads an odd
// row), into this thread's buffer of at least `capacity` rows (grown, never
// shrunk: products of different widths alternate in a step, and regrowing
// would zero the difference each time, a memset per product).
TAILOR_AVX512_BF16 const uint32_t* bf16_pairs(const float* x, int64_t rows, int64_t in,
                                              int64_t capacity) {
  const int64_t pairs = (in + 1) / 2;
  thread_local std::vector<uint32_t> xb;
  if (xb.size() < static_cast<std::size_t>(capacity * pairs))
    xb.resize(static_cast<std::size_t>(capacity * pairs));
  auto* xh = reinterpret_cast<uint16_t*>(xb.data());
  for (int64_t m = 0; m < rows; ++m) {
    if (in % 2 != 0) xh[m * 2 * pairs + in] = 0;  // the odd input's partner
    for (int64_t k = 0; k < in; k += 16) {
      const __mmask16 mk = in - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (in - k)) - 1);
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, x + m * in + k));
      _mm256_mask_storeu_epi16(xh + m * 2 * pairs + k, mk, (__m256i)h);
    }
  }
  return xb.data();
}

// The rows as bfloat16 pairs, then the blocks of dense_avx512's shape.
TAILOR_AVX512_BF16 void dense_bf16_dot(const float* x, int64_t rows, int64_t in,
                                       const uint16_t* packed, int64_t out, const float* b,
                                       float* y) {
  const int64_t pairs = (in + 1) / 2;
  const auto* w = reinterpret_cast<const uint32_t*>(packed);
  // A pointer, not the thread's buffer: the helper's chunks read it too.
  const uint32_t* x0 = bf16_pairs(x, rows, in, rows);
  each_block(rows, out, b, [&](auto r, const block_at& at) TAILOR_AVX512_BF16 {
    block_bf16<decltype(r)::value>(x0 + at.m * pairs, pairs, w + at.n * pairs, out, at.m0, at.m1,
                                   at.b0, at.b1, y + at.m * out + at.n);
  });
}

// AMX. An element is C = 0; C = tdpbf16ps(C, 32 inputs of the row, the
// same 32 of the column) for the inputs in order, 32 at a time (the last
// step fewer when `in` is not a multiple of 32); then C + b. A tile of 16
// rows computes each row alone, so a row's bits do not depend on the
// others: x is padded to whole tiles, and the padding's sums are dropped.
#define TAILOR_AMX \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))

// The layout of LDTILECFG's operand.
struct tile_config {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row
  uint8_t rows[16] = {};
};

// Tiles 0 and 1: a block's sums (16 rows by 16 outputs each); 4: 16 rows'
// next 16 pairs of inputs; 6 and 7: the matrix's next 16 pairs of the two
// halves of the block. 5, 2, 3: the same for the last `tail` pairs, when
// the pairs are not a multiple of 16. The configuration is per thread and
// anything on it (oneDNN, for one) may have changed it since, so each
// chunk reads it back (STTILECFG, ~15 ns) and loads it only when it differs
// (LDTILECFG, ~130 ns, zeroes every tile).
TAILOR_AMX void configure_tiles(int64_t tail) {
  alignas(64) tile_config want;
  for (int t : {0, 1, 4, 6, 7}) {
    want.rows[t] = 16;
    want.colsb[t] = 64;
  }
  if (tail > 0) {
    want.rows[5] = 16;
    want.colsb[5] = static_cast<uint16_t>(tail * 4);
    want.rows[2] = want.rows[3] = static_cast<uint8_t>(tail);
    want.colsb[2] = want.colsb[3] = 64;
  }
  alignas(64) tile_config have;
  _tile_storeconfig(&have);
  if (std::memcmp(&want, &have, sizeof want) != 0) _tile_loadconfig(&want);
}

TAILOR_AMX void dense_bf16_amx(const float* x, int64_t rows, int64_t in, const uint16_t* packed,
                               int64_t out, const float* b, float* y) {
  const int64_t pairs = (in + 1) / 2, full = pairs / 16 * 16, tail = pairs - full;
  const int64_t stride = pairs * 4;  // bytes from one row's inputs to the next's
  // The padding rows keep whatever an earlier product left: their sums are
  // dropped, and no row's sums read another's.
  const uint32_t* x0 = bf16_pairs(x, rows, in, (rows + 15) / 16 * 16);
  const auto* w = reinterpret_cast<const uint32_t*>(packed);
  parallel_chunks((out + 31) / 32, [&](int64_t c) TAILOR_AMX {
    configure_tiles(tail);
    const block_at at = column_block(c, out, b);
    const uint32_t* wb = w + c * pairs * 32;  // the block: `pairs` rows of 128 bytes
    alignas(64) float sums[16 * 32];
    for (int64_t m = 0; m < rows; m += 16) {
      const uint32_t* xm = x0 + m * pairs;
      _tile_zero(0);
      _tile_zero(1);
      for (int64_t k = 0; k < full; k += 16) {
        _tile_loadd(4, xm + k, stride);
        _tile_loadd(6, wb + k * 32, 128);
        _tile_loadd(7, wb + k * 32 + 16, 128);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
      }
      if (tail > 0) {
        _tile_loadd(5, xm + full, stride);
        _tile_loadd(2, wb + full * 32, 128);
        _tile_loadd(3, wb + full * 32 + 16, 128);
        _tile_dpbf16ps(0, 5, 2);
        _tile_dpbf16ps(1, 5, 3);
      }
      _tile_stored(0, sums, 128);
      _tile_stored(1, sums + 16, 128);
      for (int64_t r = 0; r < std::min<int64_t>(16, rows - m); ++r) {
        float* yr = y + (m + r) * out + at.n;
        _mm512_mask_storeu_ps(yr, at.m0, _mm512_add_ps(_mm512_load_ps(sums + r * 32), at.b0));
        _mm512_mask_storeu_ps(yr + 16, at.m1,
                              _mm512_add_ps(_mm512_load_ps(sums + r * 32 + 16), at.b1));
      }
    }
  });
}

// A float rounded to bfloat16, to nearest even (NaN stays NaN).
uint16_t round_to_bf16(float f) {
  const auto u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace

bool dense_bf16_supported(bf16_isa isa) {
  static const bool dot = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bf16");
  // g++ 12's __builtin_cpu_supports does not know AMX: CPUID leaf 7 says
  // (EDX bit 24 AMX-TILE, bit 22 AMX-BF16); then the kernel's leave for
  // the tiles' state, once per process.
  static const bool amx = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!dot || __get_cpuid_count(7, 0, &a, &b, &c, &d) == 0) return false;
    if ((d & (1u << 24)) == 0 || (d & (1u << 22)) == 0) return false;
    constexpr long arch_req_xcomp_perm = 0x1023, xfeature_xtiledata = 18;
    return ::syscall(SYS_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0;
  }();
  return isa == bf16_isa::amx ? amx : dot;
}

const char* bf16_name(bf16_isa isa) { return isa == bf16_isa::amx ? "amx" : "dot"; }

std::vector<uint16_t> packed_bf16(const float* wt, int64_t in, int64_t out) {
  const int64_t pairs = (in + 1) / 2, blocks = (out + 31) / 32;
  std::vector<uint16_t> p(static_cast<std::size_t>(blocks * pairs * 64), 0);
  for (int64_t k = 0; k < in; ++k)
    for (int64_t n = 0; n < out; ++n)
      p[static_cast<std::size_t>(((n / 32 * pairs + k / 2) * 32 + n % 32) * 2 + k % 2)] =
          round_to_bf16(wt[k * out + n]);
  return p;
}

void dense_bf16(bf16_isa isa, const float* x, int64_t rows, int64_t in, const uint16_t* packed,
                int64_t out, const float* b, float* y) {
  if (isa == bf16_isa::amx)
    dense_bf16_amx(x, rows, in, packed, out, b, y);
  else
    dense_bf16_dot(x, rows, in, packed, out, b, y);
}

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
