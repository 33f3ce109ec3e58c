// popc op library: compute kernels, independent of ONNX Runtime's headers.
//
// Both ops work on "rows": the leading dimensions [B, S] flattened into R = B * S.
//   GatherMatMulT: Y[r, k] = sum_h X[r, h] * W[I[r, k], h]      (X [R, H], I [R, K], Y [R, K])
//   GatherMatMul:  Y[r, h] = sum_k Z[r, k] * W[I[r, k], h]      (Z [R, K], I [R, K], Y [R, H])
// W is [N, H], row-major. Indices must lie in [0, N): callers validate them first
// (popc_ops.cc rejects the call with an ORT error); the CUDA kernels check again on
// the device and never read out of bounds.
#pragma once

#include <cstddef>
#include <cstdint>

namespace popc {

// ---- CPU ---------------------------------------------------------------------------
// Work is split into independent tasks so that a thread pool can run them in any
// order; run_task(i) for every i in [0, task_count()) computes the whole output.
struct CpuGatherMatMulT {
  const void* X; const void* W; const int64_t* I; void* Y;
  int64_t rows, H, K;
  bool half;      // float16 X/W/Y (else float32)
  bool use_avx2;  // x86 AVX2+FMA+F16C path (checked at run time by the caller)
  int64_t block;  // output elements per task
  int64_t task_count() const;
  void run_task(int64_t task) const;
};

struct CpuGatherMatMul {
  const void* Z; const void* W; const int64_t* I; void* Y;
  int64_t rows, H, K;
  bool half;
  bool use_avx2;
  int64_t block;  // output columns per task
  int64_t task_count() const;
  void run_task(int64_t task) const;
};

// The first index outside [0, n) in idx[0..count), or -1 when all are valid.
int64_t first_bad_index(const int64_t* idx, int64_t count, int64_t n);

// Whether this CPU has AVX2, FMA and F16C (and POPC_OPLIB_NO_AVX2 is not set).
bool cpu_has_avx2();

float half_to_float(uint16_t h);
uint16_t float_to_half(float f);

// ---- CUDA (popc_kernels.cu; only in builds with POPC_WITH_CUDA) --------------------
// Launch on `stream` (a cudaStream_t). Return 0 on success, 1 when an index was out of
// range (the output is then unspecified but no out-of-bounds read happened), and
// another value on a CUDA error (message in `error`, `error_len` bytes).
// With check_indices false the kernels still skip bad indices but do not wait on the
// stream to report them.
int cuda_gather_matmul_t(void* stream, bool half, const void* X, const void* W, const int64_t* I,
                         void* Y, int64_t rows, int64_t H, int64_t N, int64_t K, bool check_indices,
                         char* error, size_t error_len);
int cuda_gather_matmul(void* stream, bool half, const void* Z, const void* W, const int64_t* I,
                       void* Y, int64_t rows, int64_t H, int64_t N, int64_t K, bool check_indices,
                       char* error, size_t error_len);

}  // namespace popc
