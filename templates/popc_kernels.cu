// popc op library: CUDA kernels (see popc_kernels.h). Built only with POPC_WITH_CUDA.
//
// GatherMatMulT: one warp per output element (token r, selected row k): the lanes
// stride over H (coalesced reads of one weight row) and reduce with shuffles.
// GatherMatMul: a block owns 32 output columns of one token; its 8 warps split the
// K selected rows, each lane reads one column (coalesced), and shared memory sums
// the 8 partial results. Accumulation is float32 for float16 data too.
// A bad index is never dereferenced: the element contributes 0 and a device flag is
// raised, which the host reads back after the launch (one stream wait per call).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>

#include "popc_kernels.h"

namespace popc {
namespace {

// Device element types: Dev<T>::type is what the kernels read for the host's T (popc::half
// is CUDA's __half bit for bit); to_f / from_f convert one element. A new weight type adds
// one Dev specialisation and its to_f overload.
template <class T> struct Dev { using type = T; };
template <> struct Dev<half> { using type = __half; };
template <class T> using dev_type = typename Dev<T>::type;
template <class T> const dev_type<T>* dev(const T* p) { return reinterpret_cast<const dev_type<T>*>(p); }
template <class T> dev_type<T>* dev(T* p) { return reinterpret_cast<dev_type<T>*>(p); }

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kMaxGrid = 65535u;

template <typename T>
__global__ void gather_matmul_t_kernel(const T* __restrict__ X, const T* __restrict__ W,
                                       const int64_t* __restrict__ I, T* __restrict__ Y, int64_t rows,
                                       int64_t H, int64_t N, int64_t K, int* __restrict__ bad) {
  const int lane = threadIdx.x & 31;
  const int64_t total = rows * K;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); e < total; e += warps) {
    const int64_t row = I[e];
    float acc = 0.0f;
    if (row < 0 || row >= N) {
      if (lane == 0) atomicExch(bad, 1);
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
                                     int64_t N, int64_t K, int* __restrict__ bad) {
  __shared__ float partial[kWarps][33];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + tx;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    float acc = 0.0f;
    const int64_t* idx = I + r * K;
    const T* z = Z + r * K;
    for (int64_t k = ty; k < K; k += kWarps) {
      const int64_t row = idx[k];
      if (row < 0 || row >= N) {
        if (tx == 0) atomicExch(bad, 1);
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

int report(cudaError_t err, const char* what, char* error, size_t error_len) {
  if (err == cudaSuccess) return 0;
  if (error && error_len) std::snprintf(error, error_len, "%s: %s", what, cudaGetErrorString(err));
  return 2;
}

// Run `launch(flag)` on the stream, then (when checking) read the flag back.
template <typename Launch>
int run_checked(cudaStream_t stream, bool check, char* error, size_t error_len, Launch&& launch) {
  int* flag = nullptr;
  if (int rc = report(cudaMallocAsync(reinterpret_cast<void**>(&flag), sizeof(int), stream), "cudaMallocAsync", error, error_len)) return rc;
  int rc = report(cudaMemsetAsync(flag, 0, sizeof(int), stream), "cudaMemsetAsync", error, error_len);
  if (!rc) {
    launch(flag);
    rc = report(cudaGetLastError(), "kernel launch", error, error_len);
  }
  int host_flag = 0;
  if (!rc && check) rc = report(cudaMemcpyAsync(&host_flag, flag, sizeof(int), cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync", error, error_len);
  const int free_rc = report(cudaFreeAsync(flag, stream), "cudaFreeAsync", error, error_len);
  if (!rc) rc = free_rc;
  if (!rc && check) rc = report(cudaStreamSynchronize(stream), "cudaStreamSynchronize", error, error_len);
  if (!rc && host_flag) rc = 1;
  return rc;
}

}  // namespace

template <class T>
int cuda_gather_matmul_t(void* stream_ptr, const T* X, const T* W, const int64_t* I, T* Y, int64_t rows, int64_t H,
                         int64_t N, int64_t K, bool check_indices, char* error, size_t error_len) {
  const int64_t total = rows * K;
  if (total == 0) return 0;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + kWarps - 1) / kWarps, 1u << 20));
  return run_checked(stream, check_indices, error, error_len, [&](int* flag) {
    gather_matmul_t_kernel<<<blocks, kThreads, 0, stream>>>(dev(X), dev(W), I, dev(Y), rows, H, N, K, flag);
  });
}

template <class T>
int cuda_gather_matmul(void* stream_ptr, const T* Z, const T* W, const int64_t* I, T* Y, int64_t rows, int64_t H,
                       int64_t N, int64_t K, bool check_indices, char* error, size_t error_len) {
  if (rows * H == 0) return 0;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (K == 0)  // an empty selection sums to zero
    return report(cudaMemsetAsync(Y, 0, rows * H * sizeof(T), stream), "cudaMemsetAsync", error, error_len);
  const dim3 grid(static_cast<unsigned>((H + 31) / 32), static_cast<unsigned>(std::min<int64_t>(rows, kMaxGrid)));
  return run_checked(stream, check_indices, error, error_len, [&](int* flag) {
    gather_matmul_kernel<<<grid, kThreads, 0, stream>>>(dev(Z), dev(W), I, dev(Y), rows, H, N, K, flag);
  });
}

// The element types the op registrations use (popc_kernels.h).
#define POPC_INSTANTIATE(T)                                                                                       \
  template int cuda_gather_matmul_t<T>(void*, const T*, const T*, const int64_t*, T*, int64_t, int64_t, int64_t, \
                                       int64_t, bool, char*, size_t);                                             \
  template int cuda_gather_matmul<T>(void*, const T*, const T*, const int64_t*, T*, int64_t, int64_t, int64_t,   \
                                     int64_t, bool, char*, size_t);
POPC_FOR_EACH_TYPE(POPC_INSTANTIATE)
#undef POPC_INSTANTIATE

}  // namespace popc
