// popc op library: POP-online's prefill scoring and ranking on the GPU (PopPartition; math in
// popc_kernels.h, calls in popc_cuda.h). Three kernels on the stream:
//   1. norms:  a block per token (b, t): inv[b, t] = mask / (||Z[b, t, :]|| + 1e-12);
//   2. scores: a thread per channel: score[b, d] = sqrt(sum_t (Z[b, t, d] * inv[b, t])^2)
//              (times output_norm[d] in mode 2), or static_score[d] in mode 1;
//   3. rank:   a block per sequence sorts one uint64 key per channel, (inverted float score
//              bits, channel id), ascending = decreasing score with ties to the lower id (as the
//              CPU kernel and ONNX TopK), by a bitonic sort over the next power of two P >= D,
//              in shared memory up to kSharedKeys keys, else in global scratch (any D), and
//              writes the first `count` ids.
#include <algorithm>

#include "cuda_device.h"

namespace popc::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRankThreads = 1024;
constexpr int64_t kSharedKeys = 4096;  // 32 KB: under the 48 KB every GPU gives without opting in

template <typename T>
__global__ void token_norms(const T* __restrict__ Z, const float* __restrict__ mask, int64_t D,
                            float* __restrict__ inv) {
  __shared__ float sums[kThreads / 32];
  const int64_t row = blockIdx.x;
  const T* z = Z + row * D;
  float acc = 0.0f;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const float v = to_f(z[d]);
    acc += v * v;
  }
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0) sums[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) total += sums[w];
    inv[row] = mask[row] / (sqrtf(total) + 1e-12f);
  }
}

template <typename T>
__global__ void channel_scores(const T* __restrict__ Z, const float* __restrict__ inv,
                               const T* __restrict__ static_score, const T* __restrict__ output_norm, int64_t T_len,
                               int64_t D, int64_t mode, float* __restrict__ score) {
  const int64_t d = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x, b = blockIdx.y;
  if (d >= D) return;
  float s;
  if (mode == kScoreStatic) {
    s = to_f(static_score[d]);
  } else {
    float acc = 0.0f;
    for (int64_t t = 0; t < T_len; ++t) {
      const float w = inv[b * T_len + t];
      if (w == 0.0f) continue;  // padding
      const float v = to_f(Z[(b * T_len + t) * D + d]) * w;
      acc += v * v;
    }
    s = sqrtf(acc);
    if (mode == kScoreOutput) s *= to_f(output_norm[d]);
  }
  score[b * D + d] = s;
}

__device__ __forceinline__ uint64_t rank_key(float v, int64_t d) {
  if (!(v > 0.0f)) v = 0.0f;  // NaN and -0 rank last, as on the CPU
  return (static_cast<uint64_t>(0xffffffffu - __float_as_uint(v)) << 32) | static_cast<uint64_t>(d);
}

// Ascending bitonic sort of keys[0, n) (n a power of two) by the whole block.
__device__ void bitonic_sort(uint64_t* keys, int64_t n) {
  for (int64_t k = 2; k <= n; k <<= 1) {
    for (int64_t j = k >> 1; j > 0; j >>= 1) {
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const int64_t partner = i ^ j;
        if (partner > i) {
          const uint64_t a = keys[i], b = keys[partner];
          const bool ascending = (i & k) == 0;
          if ((a > b) == ascending) {
            keys[i] = b;
            keys[partner] = a;
          }
        }
      }
      __syncthreads();
    }
  }
}

// A block per sequence b. `global_keys` [B, n] is used where n > kSharedKeys, else shared memory.
__global__ void __launch_bounds__(kRankThreads) rank_channels(const float* __restrict__ score, int64_t D, int64_t n, int64_t count,
                              uint64_t* __restrict__ global_keys, int64_t* __restrict__ out) {
  extern __shared__ uint64_t shared_keys[];
  const int64_t b = blockIdx.x;
  uint64_t* keys = global_keys ? global_keys + b * n : shared_keys;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) keys[i] = i < D ? rank_key(score[b * D + i], i) : ~0ull;
  __syncthreads();
  bitonic_sort(keys, n);
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) out[b * count + i] = static_cast<int64_t>(keys[i] & 0xffffffffu);
}

}  // namespace

template <class ZT>
Status pop_partition(DeviceState* state, void* stream, const PopPartitionArgs<ZT>& a) {
  if (a.B == 0 || a.count == 0) return Status{};
  if (a.D > 0xffffffffLL || a.B > kMaxGrid || a.B * a.T > 0x7fffffffLL) {
    Status s;
    s.code = kCudaError;
    std::snprintf(s.message, sizeof(s.message), "PopPartition on the GPU takes D < 2^32, B <= %u and B * T < 2^31",
                  kMaxGrid);
    return s;
  }
  int64_t n = 1;
  while (n < a.D) n <<= 1;
  const bool in_shared = n <= kSharedKeys;
  const size_t bytes = aligned(a.B * a.T * 4) + aligned(a.B * a.D * 4) + (in_shared ? 0 : aligned(a.B * n * 8));
  return run_on_slot(state, stream, bytes, [&](Slot& slot) -> cudaError_t {
    cudaStream_t s = slot.stream;
    Carver carve{static_cast<char*>(slot.scratch)};
    float* inv = carve.take<float>(a.B * a.T);
    float* score = carve.take<float>(a.B * a.D);
    uint64_t* keys = in_shared ? nullptr : carve.take<uint64_t>(a.B * n);
    if (a.mode != kScoreStatic && a.B * a.T > 0)
      token_norms<dev_type<ZT>><<<static_cast<unsigned>(a.B * a.T), kThreads, 0, s>>>(dev(a.Z), a.mask, a.D, inv);
    const dim3 grid(static_cast<unsigned>((a.D + kThreads - 1) / kThreads), static_cast<unsigned>(a.B));
    channel_scores<dev_type<ZT>><<<grid, kThreads, 0, s>>>(dev(a.Z), inv, dev(a.static_score), dev(a.output_norm), a.T,
                                                           a.D, a.mode, score);
    rank_channels<<<static_cast<unsigned>(a.B), kRankThreads, in_shared ? n * 8 : 0, s>>>(score, a.D, n, a.count, keys,
                                                                                        a.out);
    return cudaGetLastError();
  });
}

#define POPC_INSTANTIATE(T) template Status pop_partition<T>(DeviceState*, void*, const PopPartitionArgs<T>&);
POPC_FOR_EACH_FLOAT_TYPE(POPC_INSTANTIATE)
#undef POPC_INSTANTIATE

}  // namespace popc::cuda
