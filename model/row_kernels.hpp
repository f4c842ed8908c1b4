#pragma once

// The serving forward's per-row loops: one row's LoRA product (x·A·B; a few
// rows that share an adapter at once), one (row, head) of decode attention,
// a row's GELU and its sampling weights, each in a portable version (the
// compiler vectorises it four floats at a time and widens bfloat16 one value
// at a time) and, for machines that have it, an AVX-512 one (16 at a time;
// attention scores 16 positions at once), and its layer norm. No LibTorch
// here. Each row's arithmetic is its own, so results do not depend on the
// batch.
#include <cstdint>

namespace tailor::model {

enum class row_isa { portable, avx512 };
bool row_kernels_supported(row_isa isa);

// An IEEE half-precision value (its bits), as a float16 key/value cache
// keeps keys and values; the same layout as LibTorch's kHalf.
struct float16 {
  uint16_t bits;
};

// n floats as float16, rounded to nearest (ties to even), as the cache
// stores them; beyond the largest float16 (65504) they become infinite.
void to_float16(const float* x, int64_t n, float16* out);
float from_float16(float16 h);  // exact

// One row's x·A·B added to orow [n_out]: A packed [in, rank] and B [rank,
// rows n_out apart], both bfloat16 bits. The AVX-512 loop takes ranks
// dividing 16 (1, 2, 4, 8, 16); others run the portable one.
void lora_row(const float* x, const uint16_t* a, const uint16_t* b, int64_t in, int64_t rank,
              int64_t n_out, float* orow);

// lora_row for rows that share one adapter: x[g]·A·B added to orow[g] for
// g < rows. The AVX-512 loop reads B once for up to lora_group rows; each
// row's sums are lora_row's, in the same order.
inline constexpr int64_t lora_group = 4;
void lora_rows(const float* const* x, int64_t rows, const uint16_t* a, const uint16_t* b,
               int64_t in, int64_t rank, int64_t n_out, float* const* orow);

// One (row, head) of a decode step: q [hd] against n cached keys and values
// (consecutive positions ks / vs values apart), softmax(q·k * scale)·v into
// out [hd]; p holds n floats. The keys and values are floats or float16
// (widened exactly; the sums are in float either way). The AVX-512 loop
// takes widths up to 64; wider ones run the portable one.
void attend(const float* q, const float* k, int64_t ks, const float* v, int64_t vs, int64_t n,
            int64_t hd, float scale, float* p, float* out);
void attend(const float* q, const float16* k, int64_t ks, const float16* v, int64_t vs, int64_t n,
            int64_t hd, float scale, float* p, float* out);

// Sampling weights of n logits x at a temperature: out[i] = e^((x[i] -
// max x) * inv_temperature), not normalised.
void softmax_weights(const float* x, int64_t n, float inv_temperature, float* out);

// GELU of n floats in place, x / 2 * (1 + erf(x / sqrt 2)) as
// torch::gelu's default: the portable loop with std::erf, the AVX-512 one
// with an erf approximation of absolute error below 2e-7 (Abramowitz and
// Stegun 7.1.26).
void gelu(float* x, int64_t n);

// One row's layer norm: out = (x - mean) / sqrt(var + eps) * w + b over
// its n values (var the population variance, both in float, the variance
// of x - mean in a second pass); out may be x.
void layer_norm_row(const float* x, int64_t n, const float* w, const float* b, float eps,
                    float* out);

// The same with a given kind (tests compare them); it must be supported.
// The ones above run the best this machine has.
void lora_row(row_isa isa, const float* x, const uint16_t* a, const uint16_t* b, int64_t in,
              int64_t rank, int64_t n_out, float* orow);
void lora_rows(row_isa isa, const float* const* x, int64_t rows, const uint16_t* a,
               const uint16_t* b, int64_t in, int64_t rank, int64_t n_out, float* const* orow);
void attend(row_isa isa, const float* q, const float* k, int64_t ks, const float* v, int64_t vs,
            int64_t n, int64_t hd, float scale, float* p, float* out);
void attend(row_isa isa, const float* q, const float16* k, int64_t ks, const float16* v,
            int64_t vs, int64_t n, int64_t hd, float scale, float* p, float* out);
void to_float16(row_isa isa, const float* x, int64_t n, float16* out);
void softmax_weights(row_isa isa, const float* x, int64_t n, float inv_temperature, float* out);
void gelu(row_isa isa, float* x, int64_t n);
void layer_norm_row(row_isa isa, const float* x, int64_t n, const float* w, const float* b,
                    float eps, float* out);

}  // namespace tailor::model
