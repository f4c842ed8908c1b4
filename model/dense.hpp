#pragma once

// The serving forward's matrix products, hand-written (no LibTorch here).
//
// Each output element is summed over `in` in one fixed order, whatever the
// number of rows and wherever its row sits, so a sequence's numbers do not
// depend on its batch: served alone or with 63 others it yields the same
// text (batch invariance, which the serving tests hold exactly). And unlike
// BLAS, which packs the whole matrix on every call, a step of a few rows
// reads it once: the AVX-512 kernel measured 4-8x faster than OpenBLAS at
// 1-8 rows and 1.1-1.7x at 256 (docs/measurements.md). The AVX2 kernel is as
// fast at a few rows but slower than OpenBLAS (0.7x) from about 64; it is
// kept, not BLAS, on machines without AVX-512 for the invariance.
#include <cstdint>
#include <vector>

namespace tailor::model {

// The kernels, by instruction set. Each is batch-invariant on its own; a
// process always runs the best its machine has.
enum class dense_isa { portable, avx2, avx512 };
bool dense_supported(dense_isa isa);
const char* dense_name(dense_isa isa);  // "portable", "avx2", "avx512"
dense_isa dense_best();                 // what dense() runs here

// y [rows, out] = x [rows, in] * wt [in, out] + b [out] (no bias when b is
// null). Row-major, contiguous; y must not overlap x or wt.
void dense(const float* x, int64_t rows, int64_t in, const float* wt, int64_t out, const float* b,
           float* y);
// The same with a given kernel (tests compare them); it must be supported.
void dense(dense_isa isa, const float* x, int64_t rows, int64_t in, const float* wt, int64_t out,
           const float* b, float* y);

// The same product with bfloat16 inputs: x and the matrix rounded to
// nearest even, the sums in float; the error is bfloat16's, ~3 significant
// digits per input. Two kernels, each batch-invariant as dense(), over one
// packing of the matrix:
// - `dot`: AVX-512 BF16's dot product, twice the multiply-adds per cycle of
//   a float FMA (1.9x on tailor-base's shapes, docs/measurements.md).
// - `amx`: AMX's tile product, 16 rows by 16 outputs by 32 inputs an
//   instruction: 6-7x `dot` from 16 rows on tailor-base's shapes
//   (tailor-micro, bm_dense_bf16_kernels), but ~0.85x at one row, which
//   fills a tile as 16 would. Its sums round otherwise than `dot`'s (AMX's
//   order inside an instruction is its own), so a process must use one
//   kernel for every batch, never switch by rows.
// Each runs only where the machine has it: callers check
// dense_bf16_supported(). AMX also needs the kernel's leave to use its
// tiles (Linux 5.16+), which the first check asks for.
enum class bf16_isa { dot, amx };
bool dense_bf16_supported(bf16_isa isa);
const char* bf16_name(bf16_isa isa);  // "dot", "amx"
// wt [in, out] as dense_bf16 reads it: by blocks of 32 outputs, for each
// pair of consecutive inputs and each output of the block, the two weights
// side by side ([ceil(out / 32), ceil(in / 2), 32, 2] bfloat16 bits; zeros
// pad an odd `in` and the last block's missing outputs). AMX reads 16 of
// a block's pairs by 16 of its outputs as one tile.
std::vector<uint16_t> packed_bf16(const float* wt, int64_t in, int64_t out);
void dense_bf16(bf16_isa isa, const float* x, int64_t rows, int64_t in, const uint16_t* packed,
                int64_t out, const float* b, float* y);

}  // namespace tailor::model
