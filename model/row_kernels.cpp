#include "model/row_kernels.hpp"

// GCC 12's AVX-512 headers start some results from an undefined register
// (_mm512_undefined_ps), which -W(maybe-)uninitialized reports (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "model/cuda/bgmv_math.hpp"

// What the kernels below are compiled for; row_kernels_supported() checks it.
#define TAILOR_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

namespace tailor::model {

namespace {

// The first min(k, 16) lanes (k > 0): the mask of a loop's last, partial
// vector of 16.
TAILOR_AVX512 inline __mmask16 lanes(int64_t k) {
  return k >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << k) - 1);
}

// 16 bfloat16 values (their bits) as floats: a bfloat16 is a float's upper half.
TAILOR_AVX512 inline __m512 widen16(const uint16_t* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 16 keys or values of the cache as floats (masked lanes 0).
TAILOR_AVX512 inline __m512 load16(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
TAILOR_AVX512 inline __m512 load16(const float16* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// e^x of 16 floats x <= 0 (a softmax's shifted scores), to about one ulp:
// x = n ln 2 + r with |r| <= ln 2 / 2, e^r by Cephes' expf polynomial, and
// 2^n by scaling; below -87 it is 0, as std::exp is to within 1e-38.
TAILOR_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y =
      _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

// The sums of 16 vectors' lanes, in one vector (lane j: the sum of v[j]):
// pairs within 128-bit lanes, then quads, then across the four 128-bit
// lanes; 45 shuffles and adds where 16 reductions take ~130.
TAILOR_AVX512 inline __m512 sum16(const __m512 (&v)[16]) {
  // Unrolled, so that the vectors stay in registers (rolled, GCC keeps
  // each level's vectors on the stack).
  __m512 a[8], b[4];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j)
    b[j] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * j], a[2 * j + 1], 0x44),
                         _mm512_shuffle_ps(a[2 * j], a[2 * j + 1], 0xEE));
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88),
                                   _mm512_shuffle_f32x4(b[0], b[1], 0xDD));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88),
                                   _mm512_shuffle_f32x4(b[2], b[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

// The portable loops, compiled for any x86-64 (the compiler vectorises
// them four floats at a time).

// A size known at compile time, for the loops below; `local_size` is the
// size of their local scratch (1 when the size is a run-time value).
template <int64_t N>
using fixed_size = std::integral_constant<int64_t, N>;
template <typename Size>
struct local_size : fixed_size<1> {};
template <int64_t N>
struct local_size<fixed_size<N>> : fixed_size<N> {};

// One row's x·A·B added to `orow`, up to `rank` (int64_t, or for the
// common ranks fixed_size); `ar` is the row's A packed [in, rank]. `scratch`
// holds `rank` floats when it is a run-time value. With the rank known at
// compile time the sums live in a local array and stay in registers (a
// buffer that may alias the inputs is reloaded and stored at every step).
// Each output element is written once.
template <typename Rank>
void lora_row_portable(const float* xr, const uint16_t* ar, const uint16_t* br, int64_t in,
                       Rank rank, int64_t n_out, float* scratch, float* orow) {
  float local[local_size<Rank>::value];
  float* xa = std::is_same_v<Rank, int64_t> ? scratch : local;
  for (int64_t k = 0; k < rank; ++k) xa[k] = 0.0f;
  for (int64_t i = 0; i < in; ++i) {
    const float xi = xr[i];
    const uint16_t* ai = ar + i * rank;
    for (int64_t k = 0; k < rank; ++k) xa[k] += xi * bgmv::widen(ai[k]);
  }
#pragma omp simd
  for (int64_t o = 0; o < n_out; ++o) {
    float acc = orow[o];
    for (int64_t k = 0; k < rank; ++k) acc += xa[k] * bgmv::widen(br[k * n_out + o]);
    orow[o] = acc;
  }
}

// One (row, head) of a decode step: q [hd] against the row's first n cached
// keys and values (consecutive positions `ks`/`vs` floats apart), the
// weighted values into out [hd]. `hd` is int64_t or, for the common widths,
// fixed_size; `scratch` holds 2 hd floats when it is a run-time value, p n.
// With the width known, q and the sums live in local arrays and stay in
// registers; `out` may alias the cache as far as the compiler knows, so
// summing into it would reload and store it per position.
inline float value_of(float x) { return x; }
inline float value_of(float16 x) { return from_float16(x); }

template <typename Width, typename T>
void attend_portable(const float* q, const T* kb, int64_t ks, const T* vb, int64_t vs, int64_t n,
                     Width hd, float scale, float* scratch, float* p, float* out) {
  constexpr bool at_run_time = std::is_same_v<Width, int64_t>;
  float local_q[local_size<Width>::value], local_acc[local_size<Width>::value];
  float* qr = at_run_time ? scratch : local_q;
  float* acc = at_run_time ? scratch + hd : local_acc;
  for (int64_t d = 0; d < hd; ++d) qr[d] = q[d], acc[d] = 0.0f;
  float hi = -std::numeric_limits<float>::infinity();
  for (int64_t l = 0; l < n; ++l) {
    const T* kl = kb + l * ks;
    float dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < hd; ++d) dot += qr[d] * value_of(kl[d]);
    p[l] = dot * scale;
    hi = std::max(hi, p[l]);
  }
  float total = 0;
  for (int64_t l = 0; l < n; ++l) total += p[l] = std::exp(p[l] - hi);
  for (int64_t l = 0; l < n; ++l) {
    const float w = p[l];
    const T* vl = vb + l * vs;
    for (int64_t d = 0; d < hd; ++d) acc[d] += w * value_of(vl[d]);
  }
  const float inv = 1.0f / total;
  for (int64_t d = 0; d < hd; ++d) out[d] = acc[d] * inv;
}

// One row's x·A into xa[0, rank), rank dividing 16: over A's flat [in *
// rank] values, 16 at a time, lane j holding input (offset + j) / rank and
// column j % rank, so x is spread to match.
TAILOR_AVX512 void lora_xa_avx512(const float* x, const uint16_t* a, int64_t in, int64_t rank,
                                  float* xa) {
  const int64_t per = 16 / rank;  // inputs per 16 values
  // j / rank by a shift (rank is a power of two): 16 divisions cost a row
  // more than its multiply-adds.
  const __m512i idx = _mm512_srlv_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(std::countr_zero(static_cast<uint32_t>(rank))));
  // Four sums, so that the multiply-adds do not wait on each other's
  // latency (one sum made x·A a chain of in / per dependent steps).
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
  const __mmask16 whole = lanes(per);  // x's lanes a full step reads
  int64_t i = 0;
  for (; i + 4 * per <= in; i += 4 * per)
    for (int u = 0; u < 4; ++u) {
      const int64_t at = i + u * per;
      const __m512 xs = _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(whole, x + at));
      acc[u] = _mm512_fmadd_ps(xs, widen16(a + at * rank, 0xFFFF), acc[u]);
    }
  for (; i < in; i += per) {
    const int64_t left = in - i;  // inputs
    const __mmask16 mx = lanes(left), ma = lanes(left * rank);
    const __m512 xs = _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(mx, x + i));
    acc[0] = _mm512_fmadd_ps(xs, widen16(a + i * rank, ma), acc[0]);
  }
  alignas(64) float sums[16];
  _mm512_store_ps(sums, _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
  for (int64_t k = 0; k < rank; ++k) {
    float s = 0;
    for (int64_t j = k; j < 16; j += rank) s += sums[j];
    xa[k] = s;
  }
}

// G rows' (x·A)·B added to their outputs, up to rank R, 16 * U outputs at
// a time: B's values are widened once for the G rows, and the G * U sums are
// independent, so that the multiply-adds do not wait on each other's
// latency. With R known the loop over it unrolls. Each output adds its rank
// terms in the order of lora_row_portable, with fused multiply-adds.
template <int G, int R>
TAILOR_AVX512 void lora_xab_avx512(const float (*xa)[16], const uint16_t* b, int64_t n_out,
                                   float* const* orow) {
  // Four vectors of 16 outputs at a time; one row alone is fastest with two
  // (four rows: 25 % less time than one by one, bm_lora_rows).
  constexpr int U = G == 1 ? 2 : 4;
  for (int64_t o = 0; o < n_out; o += 16 * U) {
    __mmask16 m[U];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const int64_t left = n_out - o - 16 * u;
      m[u] = left > 0 ? lanes(left) : 0;
    }
    __m512 sum[G][U];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) sum[g][u] = _mm512_maskz_loadu_ps(m[u], orow[g] + o + 16 * u);
#pragma GCC unroll 16
    for (int k = 0; k < R; ++k) {
      __m512 w[U];
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) w[u] = widen16(b + k * n_out + o + 16 * u, m[u]);
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        const __m512 xk = _mm512_set1_ps(xa[g][k]);
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) sum[g][u] = _mm512_fmadd_ps(xk, w[u], sum[g][u]);
      }
    }
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) _mm512_mask_storeu_ps(orow[g] + o + 16 * u, m[u], sum[g][u]);
  }
}

// Up to lora_group rows sharing one adapter; false when the rank does not
// divide 16 (the portable loop takes those).
TAILOR_AVX512 bool lora_rows_avx512(const float* const* x, int64_t rows, const uint16_t* a,
                                    const uint16_t* b, int64_t in, int64_t rank, int64_t n_out,
                                    float* const* orow) {
  if (rank <= 0 || 16 % rank != 0) return false;
  float xa[lora_group][16];
  for (int64_t g = 0; g < rows; ++g) lora_xa_avx512(x[g], a, in, rank, xa[g]);
  auto by_rows = [&](auto r) TAILOR_AVX512 {
    constexpr int R = decltype(r)::value;
    switch (rows) {
      case 1: return lora_xab_avx512<1, R>(xa, b, n_out, orow);
      case 2: return lora_xab_avx512<2, R>(xa, b, n_out, orow);
      case 3: return lora_xab_avx512<3, R>(xa, b, n_out, orow);
      default: return lora_xab_avx512<4, R>(xa, b, n_out, orow);
    }
  };
  switch (rank) {
    case 1: by_rows(std::integral_constant<int, 1>{}); break;
    case 2: by_rows(std::integral_constant<int, 2>{}); break;
    case 4: by_rows(std::integral_constant<int, 4>{}); break;
    case 8: by_rows(std::integral_constant<int, 8>{}); break;
    default: by_rows(std::integral_constant<int, 16>{}); break;
  }
  return true;
}

// The second half of a (row, head)'s attention, once its n scores are in
// p and their maximum is hi: p becomes e^(p - hi), and out the values'
// sum weighted by p over the total, in C chunks of 16 (masked by `mask`;
// position l's values at v + l * vs).
template <int C, typename T>
TAILOR_AVX512 inline __attribute__((always_inline)) void softmax_values(
    float* p, int64_t n, float hi, const T* v, int64_t vs, const __mmask16 (&mask)[C],
    float* out) {
  const __m512 shift = _mm512_set1_ps(hi);
  __m512 total16 = _mm512_setzero_ps();
  for (int64_t l = 0; l < n; l += 16) {
    const __mmask16 m = lanes(n - l);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + l), shift));
    _mm512_mask_storeu_ps(p + l, m, e);
    total16 = _mm512_mask_add_ps(total16, m, total16, e);
  }
  const float total = _mm512_reduce_add_ps(total16);
  __m512 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t l = 0; l < n; ++l) {
    const __m512 w = _mm512_set1_ps(p[l]);
    const T* vl = v + l * vs;
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(w, load16(vl + 16 * c, mask[c]), acc[c]);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / total);
  for (int c = 0; c < C; ++c)
    _mm512_mask_storeu_ps(out + 16 * c, mask[c], _mm512_mul_ps(acc[c], inv));
}

// attend_avx512 with the width in C chunks of 16 floats (the last masked),
// known at compile time so that q and the sums stay in registers; any
// strides.
template <int C, typename T>
TAILOR_AVX512 void attend_chunks(const float* q, const T* k, int64_t ks, const T* v, int64_t vs,
                                 int64_t n, int64_t hd, float scale, float* p, float* out) {
  __mmask16 mask[C];
  __m512 qv[C];
  for (int c = 0; c < C; ++c) {
    const int64_t left = hd - 16 * c;
    mask[c] = lanes(left);
    qv[c] = _mm512_maskz_loadu_ps(mask[c], q + 16 * c);
  }
  // q·k of one position as a vector whose lanes sum to it. The values are
  // read after the softmax: ask for them now, and for the keys a few
  // positions ahead (each (row, head) is a short stream the hardware
  // prefetcher has not seen).
  auto products = [&](int64_t l) TAILOR_AVX512 {
    const T* kl = k + l * ks;
    for (int c = 0; c < C; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(kl + 8 * ks + 16 * c), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v + l * vs + 16 * c), _MM_HINT_T0);
    }
    __m512 d = _mm512_mul_ps(qv[0], load16(kl, mask[0]));
    for (int c = 1; c < C; ++c) d = _mm512_fmadd_ps(qv[c], load16(kl + 16 * c, mask[c]), d);
    return d;
  };
  const __m512 scale16 = _mm512_set1_ps(scale);
  __m512 hi16 = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t l = 0;
  for (; l + 16 <= n; l += 16) {
    __m512 d[16];
    for (int j = 0; j < 16; ++j) d[j] = products(l + j);
    const __m512 s = _mm512_mul_ps(sum16(d), scale16);
    _mm512_storeu_ps(p + l, s);
    hi16 = _mm512_max_ps(hi16, s);
  }
  float hi = _mm512_reduce_max_ps(hi16);
  for (; l < n; ++l) {
    p[l] = _mm512_reduce_add_ps(products(l)) * scale;
    hi = std::max(hi, p[l]);
  }
  softmax_values<C>(p, n, hi, v, vs, mask, out);
}

// attend_chunks for the cache's own layout: consecutive positions of
// exactly C * 16 values (keys and values alike). With every offset a
// constant, the loop over a block's 16 positions unrolls and their
// products go from the loads to sum16 in registers; with run-time strides
// GCC keeps them on the stack, and the scores cost ~25 % more (a (row,
// head) of 40 positions in L1, docs/measurements.md).
template <int C, typename T>
TAILOR_AVX512 void attend_packed(const float* q, const T* k, const T* v, int64_t n, float scale,
                                 float* p, float* out) {
  constexpr int64_t S = 16 * C;               // values per position
  constexpr int64_t line = 64 / sizeof(T);    // values per cache line
  __mmask16 all[C];
  __m512 qv[C];
  for (int c = 0; c < C; ++c) {
    all[c] = 0xFFFF;
    qv[c] = _mm512_loadu_ps(q + 16 * c);
  }
  const __m512 scale16 = _mm512_set1_ps(scale);
  __m512 hi16 = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t l = 0; l < n; l += 16) {
    const T* kb = k + l * S;
    const int64_t valid = std::min<int64_t>(16, n - l);
    // The next block's keys, and this block's values (read after the
    // softmax): each (row, head) is a short stream the hardware prefetcher
    // has not seen.
#pragma GCC unroll 64
    for (int64_t o = 0; o < 16 * S; o += line) {
      _mm_prefetch(reinterpret_cast<const char*>(kb + 16 * S + o), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v + l * S + o), _MM_HINT_T0);
    }
    __m512 d[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      if (j < valid) {
        __m512 x = _mm512_mul_ps(qv[0], load16(kb + j * S, all[0]));
#pragma GCC unroll 4
        for (int c = 1; c < C; ++c)
          x = _mm512_fmadd_ps(qv[c], load16(kb + j * S + 16 * c, all[c]), x);
        d[j] = x;
      } else {
        d[j] = _mm512_setzero_ps();  // past the last position: its lane is not stored
      }
    }
    const __mmask16 m = lanes(valid);
    const __m512 s = _mm512_mul_ps(sum16(d), scale16);
    _mm512_mask_storeu_ps(p + l, m, s);
    hi16 = _mm512_mask_max_ps(hi16, m, hi16, s);
  }
  softmax_values<C>(p, n, _mm512_reduce_max_ps(hi16), v, S, all, out);
}

template <typename T>
bool attend_avx512(const float* q, const T* k, int64_t ks, const T* v, int64_t vs, int64_t n,
                   int64_t hd, float scale, float* p, float* out) {
  if (hd % 16 == 0 && ks == hd && vs == hd) switch (hd / 16) {
      case 1: attend_packed<1>(q, k, v, n, scale, p, out); return true;
      case 2: attend_packed<2>(q, k, v, n, scale, p, out); return true;
      case 3: attend_packed<3>(q, k, v, n, scale, p, out); return true;
      case 4: attend_packed<4>(q, k, v, n, scale, p, out); return true;
    }
  switch ((hd + 15) / 16) {
    case 1: attend_chunks<1>(q, k, ks, v, vs, n, hd, scale, p, out); return true;
    case 2: attend_chunks<2>(q, k, ks, v, vs, n, hd, scale, p, out); return true;
    case 3: attend_chunks<3>(q, k, ks, v, vs, n, hd, scale, p, out); return true;
    case 4: attend_chunks<4>(q, k, ks, v, vs, n, hd, scale, p, out); return true;
    default: return false;
  }
}

// n floats to float16 bits, 16 at a time (round to nearest even, as the
// portable conversion).
TAILOR_AVX512 void to_float16_avx512(const float* x, int64_t n, float16* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    const __m256i h = _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, x + i),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(out + i, m, h);
  }
}

TAILOR_AVX512 void softmax_weights_avx512(const float* x, int64_t n, float inv_t, float* out) {
  auto mask = [n](int64_t i) TAILOR_AVX512 { return lanes(n - i); };
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 hi16 = lowest;
  for (int64_t i = 0; i < n; i += 16)
    hi16 = _mm512_max_ps(hi16, _mm512_mask_loadu_ps(lowest, mask(i), x + i));
  const __m512 hi = _mm512_set1_ps(_mm512_reduce_max_ps(hi16)), scale = _mm512_set1_ps(inv_t);
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask(i), x + i), hi), scale);
    _mm512_mask_storeu_ps(out + i, mask(i), exp16(d));
  }
}

// GELU of 16 floats: erf(z) for z = |x| / sqrt 2 as 1 - t P(t) e^(-z^2)
// with t = 1 / (1 + p z). For x < 0, GELU is x / 2 * t P(t) e^(-z^2):
// that product, not 1 minus an erf near 1, so the tail keeps its digits.
TAILOR_AVX512 void gelu_avx512(float* x, int64_t n) {
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    const __m512 z = _mm512_mul_ps(_mm512_abs_ps(v), _mm512_set1_ps(0.70710678118654752f));
    const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), z, one));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    // 1 - erf(z), in [0, 1].
    const __m512 minus_z2 = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), z);
    const __m512 rest = _mm512_mul_ps(_mm512_mul_ps(p, t), exp16(minus_z2));
    const __mmask16 negative = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
    // x >= 0: x / 2 * (2 - rest); x < 0: x / 2 * rest.
    const __m512 factor = _mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_set1_ps(2.0f), rest),
                                               rest);
    _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(_mm512_mul_ps(half, v), factor));
  }
}

TAILOR_AVX512 void layer_norm_row_avx512(const float* x, int64_t n, const float* w, const float* b,
                                         float eps, float* out) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16)
    sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(lanes(n - i), x + i));
  const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / static_cast<float>(n));
  __m512 squares = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    const __m512 d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, x + i), mean);
    squares = _mm512_fmadd_ps(d, d, squares);
  }
  const float var = _mm512_reduce_add_ps(squares) / static_cast<float>(n);
  const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(var + eps));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    const __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), mean), rstd);
    _mm512_mask_storeu_ps(out + i, m,
                          _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(m, w + i),
                                          _mm512_maskz_loadu_ps(m, b + i)));
  }
}

float16 to_float16_portable(float f) {
  const auto x = std::bit_cast<uint32_t>(f);
  const auto sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t mag = x & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return {static_cast<uint16_t>(sign | 0x7E00u)};  // NaN stays NaN
  // From 65520 (halfway past the largest float16, which is odd) up: infinite.
  if (mag >= 0x477FF000u) return {static_cast<uint16_t>(sign | 0x7C00u)};
  if (mag < 0x38800000u) {  // below 2^-14: a subnormal float16 (or zero), in units of 2^-24;
    // the product is exact, and the current rounding mode is to nearest even.
    const auto units = std::nearbyint(std::bit_cast<float>(mag) * 16777216.0f);
    return {static_cast<uint16_t>(sign | static_cast<uint16_t>(units))};
  }
  // Rebias the exponent (127 to 15) and keep 10 of the 23 fraction bits,
  // rounding on the 13 dropped; a carry into the exponent is still right.
  auto h = (mag - 0x38000000u) >> 13;
  const uint32_t dropped = mag & 0x1FFFu;
  if (dropped > 0x1000u || (dropped == 0x1000u && (h & 1u) != 0)) ++h;
  return {static_cast<uint16_t>(sign | h)};
}

}  // namespace

float from_float16(float16 h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  uint32_t exponent = (h.bits >> 10) & 0x1Fu, fraction = h.bits & 0x3FFu;
  uint32_t bits = sign;
  if (exponent == 0x1F) {
    bits |= 0x7F800000u | (fraction << 13);  // infinite or NaN
  } else if (exponent != 0) {
    bits |= ((exponent + 112) << 23) | (fraction << 13);
  } else if (fraction != 0) {  // subnormal: shift until the leading one is the implicit bit
    uint32_t shifts = 0;
    while ((fraction & 0x400u) == 0) fraction <<= 1, ++shifts;
    bits |= ((113 - shifts) << 23) | ((fraction & 0x3FFu) << 13);
  }
  return std::bit_cast<float>(bits);
}

bool row_kernels_supported(row_isa isa) {
  static const bool avx512 = __builtin_cpu_supports("avx512f") &&
                             __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
  return isa == row_isa::portable || avx512;
}

void lora_rows(row_isa isa, const float* const* x, int64_t rows, const uint16_t* a,
               const uint16_t* b, int64_t in, int64_t rank, int64_t n_out, float* const* orow) {
  if (rows <= 0) return;
  if (rows > lora_group) {
    lora_rows(isa, x, lora_group, a, b, in, rank, n_out, orow);
    return lora_rows(isa, x + lora_group, rows - lora_group, a, b, in, rank, n_out,
                     orow + lora_group);
  }
  if (isa == row_isa::avx512 && lora_rows_avx512(x, rows, a, b, in, rank, n_out, orow)) return;
  for (int64_t g = 0; g < rows; ++g) {
    switch (rank) {
      case 4: lora_row_portable(x[g], a, b, in, fixed_size<4>{}, n_out, nullptr, orow[g]); continue;
      case 8: lora_row_portable(x[g], a, b, in, fixed_size<8>{}, n_out, nullptr, orow[g]); continue;
      case 16:
        lora_row_portable(x[g], a, b, in, fixed_size<16>{}, n_out, nullptr, orow[g]);
        continue;
    }
    thread_local std::vector<float> scratch;
    scratch.resize(static_cast<std::size_t>(rank));
    lora_row_portable(x[g], a, b, in, rank, n_out, scratch.data(), orow[g]);
  }
}

void lora_row(row_isa isa, const float* x, const uint16_t* a, const uint16_t* b, int64_t in,
              int64_t rank, int64_t n_out, float* orow) {
  lora_rows(isa, &x, 1, a, b, in, rank, n_out, &orow);
}

namespace {
template <typename T>
void attend_any(row_isa isa, const float* q, const T* k, int64_t ks, const T* v, int64_t vs,
                int64_t n, int64_t hd, float scale, float* p, float* out) {
  if (isa == row_isa::avx512 && attend_avx512(q, k, ks, v, vs, n, hd, scale, p, out)) return;
  switch (hd) {
    case 16: return attend_portable(q, k, ks, v, vs, n, fixed_size<16>{}, scale, nullptr, p, out);
    case 32: return attend_portable(q, k, ks, v, vs, n, fixed_size<32>{}, scale, nullptr, p, out);
    case 64: return attend_portable(q, k, ks, v, vs, n, fixed_size<64>{}, scale, nullptr, p, out);
  }
  thread_local std::vector<float> scratch;
  scratch.resize(static_cast<std::size_t>(2 * hd));
  attend_portable(q, k, ks, v, vs, n, hd, scale, scratch.data(), p, out);
}
}  // namespace

void attend(row_isa isa, const float* q, const float* k, int64_t ks, const float* v, int64_t vs,
            int64_t n, int64_t hd, float scale, float* p, float* out) {
  attend_any(isa, q, k, ks, v, vs, n, hd, scale, p, out);
}

void attend(row_isa isa, const float* q, const float16* k, int64_t ks, const float16* v,
            int64_t vs, int64_t n, int64_t hd, float scale, float* p, float* out) {
  attend_any(isa, q, k, ks, v, vs, n, hd, scale, p, out);
}

void to_float16(row_isa isa, const float* x, int64_t n, float16* out) {
  if (isa == row_isa::avx512) return to_float16_avx512(x, n, out);
  for (int64_t i = 0; i < n; ++i) out[i] = to_float16_portable(x[i]);
}

void softmax_weights(row_isa isa, const float* x, int64_t n, float inv_temperature,
                     float* out) {
  if (n <= 0) return;
  if (isa == row_isa::avx512) return softmax_weights_avx512(x, n, inv_temperature, out);
  const float hi = *std::max_element(x, x + n);
  for (int64_t i = 0; i < n; ++i) out[i] = std::exp((x[i] - hi) * inv_temperature);
}

void gelu(row_isa isa, float* x, int64_t n) {
  if (isa == row_isa::avx512) return gelu_avx512(x, n);
  for (int64_t i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * 0.70710678f));
}

void layer_norm_row(row_isa isa, const float* x, int64_t n, const float* w, const float* b,
                    float eps, float* out) {
  if (n <= 0) return;
  if (isa == row_isa::avx512) return layer_norm_row_avx512(x, n, w, b, eps, out);
  float sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  const float mean = sum / static_cast<float>(n);
  float squares = 0;
  for (int64_t i = 0; i < n; ++i) squares += (x[i] - mean) * (x[i] - mean);
  const float rstd = 1.0f / std::sqrt(squares / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - mean) * rstd * w[i] + b[i];
}

namespace {
row_isa best_row_isa() {
  static const row_isa best =
      row_kernels_supported(row_isa::avx512) ? row_isa::avx512 : row_isa::portable;
  return best;
}
}  // namespace

void lora_row(const float* x, const uint16_t* a, const uint16_t* b, int64_t in, int64_t rank,
              int64_t n_out, float* orow) {
  lora_row(best_row_isa(), x, a, b, in, rank, n_out, orow);
}

void lora_rows(const float* const* x, int64_t rows, const uint16_t* a, const uint16_t* b,
               int64_t in, int64_t rank, int64_t n_out, float* const* orow) {
  lora_rows(best_row_isa(), x, rows, a, b, in, rank, n_out, orow);
}

void attend(const float* q, const float* k, int64_t ks, const float* v, int64_t vs, int64_t n,
            int64_t hd, float scale, float* p, float* out) {
  attend(best_row_isa(), q, k, ks, v, vs, n, hd, scale, p, out);
}

void attend(const float* q, const float16* k, int64_t ks, const float16* v, int64_t vs, int64_t n,
            int64_t hd, float scale, float* p, float* out) {
  attend(best_row_isa(), q, k, ks, v, vs, n, hd, scale, p, out);
}

void to_float16(const float* x, int64_t n, float16* out) { to_float16(best_row_isa(), x, n, out); }

void softmax_weights(const float* x, int64_t n, float inv_temperature, float* out) {
  softmax_weights(best_row_isa(), x, n, inv_temperature, out);
}

void gelu(float* x, int64_t n) { gelu(best_row_isa(), x, n); }

void layer_norm_row(const float* x, int64_t n, const float* w, const float* b, float eps,
                    float* out) {
  layer_norm_row(best_row_isa(), x, n, w, b, eps, out);
}

}  // namespace tailor::model
