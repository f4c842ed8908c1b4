#pragma once

#include <string>

namespace tailor::model {

// LibTorch's intra-op threads and OpenBLAS's threads compete for the same
// cores; each is set here (0 leaves it as it is). On these 2-core machines one
// ATen thread with OpenBLAS on 2 was measured fastest (../shared/stack.md).
void configure_threads(int intra_op, int blas);

// A forward's temporaries (hundreds of KB to MB) would, with glibc's
// defaults, be mmapped or trimmed back to the kernel as they are freed and
// page-faulted in again by the next op: a 32-row prefill measured 2x slower
// (tailor-micro). Serves allocations up to 32 MiB from the heap and trims it
// only above 256 MiB free. Call once at start, before other threads.
void configure_allocator();

// Marks every thread of this process, and so every thread they start from
// then on (they inherit it), SCHED_BATCH: the kernel's policy for CPU-bound work
// that is not interactive. Such a thread, woken, does not preempt the one
// running on its core, so the engine's own hops no longer take the batch
// loop's core in the middle of a step; they run when it yields at the
// step's end or on another core (docs/measurements.md, 2026-12-03). False,
// with the reason in `err`, when the kernel refuses.
bool use_batch_scheduling(std::string& err);

// The BLAS shared library mapped into this process (e.g. libopenblasp-r0.3.21.so),
// and its thread count (-1 when not OpenBLAS).
std::string blas_library();
int blas_threads();
int intra_op_threads();

// Whether this build has our CUDA kernels and how many CUDA devices it sees,
// e.g. "not built (no nvcc)" or "built; 0 CUDA devices".
std::string cuda_kernels();

}  // namespace tailor::model
