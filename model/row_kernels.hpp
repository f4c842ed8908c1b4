#pragma once

// The serving forward's per-row loops (LoRA rows, decode attention)
// written for AVX-512, for machines that have it (no LibTorch here). The
// compiler vectorises the portable loops of transformer.cpp four floats at
// a time and widens bfloat16 one value at a time; these take sixteen.
// Each row's arithmetic is its own, as in those loops, so results do not
// depend on the batch.
#include <cstdint>

namespace tailor::model {

// Whether this machine runs the kernels below.
bool row_kernels_available();

// One row's x·A·B added to orow [n_out]: A packed [in, rank] and B [rank,
// rows n_out apart], both bfloat16 bits. Ranks dividing 16 only (1, 2, 4,
// 8, 16); false, with nothing done, for any other.
bool lora_row_avx512(const float* x, const uint16_t* a, const uint16_t* b, int64_t in,
                     int64_t rank, int64_t n_out, float* orow);

// One (row, head) of a decode step: q [hd] against n cached keys and values
// (consecutive positions ks / vs floats apart), softmax(q·k * scale)·v into
// out [hd]; p holds n floats. Widths up to 64 only; false for wider.
bool attend_avx512(const float* q, const float* k, int64_t ks, const float* v, int64_t vs,
                   int64_t n, int64_t hd, float scale, float* p, float* out);

}  // namespace tailor::model
