// popc op library: the CUDA gather kernels (see popc_kernels.h for the math, popc_cuda.h for
// the calls). Built only with POPC_WITH_CUDA.
//
// GatherMatMulT: one warp per output element (token r, selected row k): the lanes
// stride over H (coalesced reads of one weight row) and reduce with shuffles.
// GatherMatMul: a block owns 32 output columns of one token; its 8 warps split the
// K selected rows, each lane reads one column (coalesced), and shared memory sums
// the 8 partial results. Accumulation is float32 for float16 and bfloat16 data too.
// A bad index is never dereferenced: the element contributes 0 and the device's error
// counter grows (reported without a stream wait: popc_cuda.h).
#include <algorithm>

#include "cuda_device.h"

namespace popc::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
__global__ void gather_matmul_t_kernel(const T* __restrict__ X, const T* __restrict__ W,
                                       const int64_t* __restrict__ I, T* __restrict__ Y, int64_t rows,
                                       int64_t H, int64_t N, int64_t K, Counters* __restrict__ errors) {
  const int lane = threadIdx.x & 31;
  const int64_t total = rows * K;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); e < total; e += warps) {
    const int64_t row = I[e];
    float acc = 0.0f;
    if (!valid_id(row, N)) {
      if (lane == 0) atomicAdd(&errors->bad_index, 1ull);
    } else {
      const T* x = X + (e / K) * H;
      const T* w = W + row * H;
      for (int64_t h = lane; h < H; h += 32) acc += to_f(x[h]) * to_f(w[h]);
    }
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    if (lane == 0) Y[e] = from_f<T>(acc);
  }
}

template <typename T>
__global__ void gather_matmul_kernel(const T* __restrict__ Z, const T* __restrict__ W,
                                     const int64_t* __restrict__ I, T* __restrict__ Y, int64_t rows, int64_t H,
                                     int64_t N, int64_t K, Counters* __restrict__ errors) {
  __shared__ float partial[kWarps][33];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + tx;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    float acc = 0.0f;
    const int64_t* idx = I + r * K;
    const T* z = Z + r * K;
    for (int64_t k = ty; k < K; k += kWarps) {
      const int64_t row = idx[k];
      if (!valid_id(row, N)) {
        if (tx == 0 && blockIdx.x == 0) atomicAdd(&errors->bad_index, 1ull);
        continue;
      }
      if (col < H) acc += to_f(z[k]) * to_f(W[row * H + col]);
    }
    partial[ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && col < H) {
      float sum = 0.0f;
      for (int j = 0; j < kWarps; ++j) sum += partial[j][tx];
      Y[r * H + col] = from_f<T>(sum);
    }
    __syncthreads();
  }
}

}  // namespace

template <class T>
Status gather_matmul_t(DeviceState* state, void* stream, const T* X, const T* W, const int64_t* I, T* Y,
                       int64_t rows, int64_t H, int64_t N, int64_t K) {
  const int64_t total = rows * K;
  if (total == 0) return Status{};
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + kWarps - 1) / kWarps, 1u << 20));
  return run_on_slot(state, stream, 0, [&](Slot& slot) {
    gather_matmul_t_kernel<<<blocks, kThreads, 0, slot.stream>>>(dev(X), dev(W), I, dev(Y), rows, H, N, K,
                                                                   slot.counters);
    return cudaGetLastError();
  });
}

template <class T>
Status gather_matmul(DeviceState* state, void* stream, const T* Z, const T* W, const int64_t* I, T* Y, int64_t rows,
                     int64_t H, int64_t N, int64_t K) {
  if (rows * H == 0) return Status{};
  return run_on_slot(state, stream, 0, [&](Slot& slot) {
    if (K == 0)  // an empty selection sums to zero
      return cudaMemsetAsync(Y, 0, rows * H * sizeof(T), slot.stream);
    const dim3 grid(static_cast<unsigned>((H + 31) / 32), static_cast<unsigned>(std::min<int64_t>(rows, kMaxGrid)));
    gather_matmul_kernel<<<grid, kThreads, 0, slot.stream>>>(dev(Z), dev(W), I, dev(Y), rows, H, N, K, slot.counters);
    return cudaGetLastError();
  });
}

// The element types the op registrations use (popc_kernels.h).
#define POPC_INSTANTIATE(T)                                                                                  \
  template Status gather_matmul_t<T>(DeviceState*, void*, const T*, const T*, const int64_t*, T*, int64_t, \
                                     int64_t, int64_t, int64_t);                                             \
  template Status gather_matmul<T>(DeviceState*, void*, const T*, const T*, const int64_t*, T*, int64_t,   \
                                   int64_t, int64_t, int64_t);
POPC_FOR_EACH_FLOAT_TYPE(POPC_INSTANTIATE)
#undef POPC_INSTANTIATE

}  // namespace popc::cuda
