// popc op library: the fused POP-online decode step on the GPU (PopSwiGLUDecode / PopGeGLUDecode;
// math in popc_kernels.h, calls in popc_cuda.h).
//
// A decode step reads few weight rows and does little arithmetic per row, so the rows of one
// call share their reads as on the CPU: each weight row is read once per pass of kPass rows of
// X, for the union of the channels the rows need. The phases, all on the stream, none waiting
// on the host (every grid is sized from shapes, never from device-side counts):
//   1. mark:    each sequence's partition as a bitmap [B, words]; ids outside [0, D) are
//               skipped and counted, a channel twice in one partition is counted;
//   2. compact: the union of those bitmaps as an ascending channel list (one block);
//   3. gate:    a warp per listed channel: act[r, ch] = act(X[r] . Wg[ch]) for its rows;
//   4. select:  a block per row: the retained channels and the top-K candidates by |act|
//               (times output_norm in mode 2; ties to the lower position, as ONNX TopK) by
//               a 4-pass radix select, into a kept bitmap [rows, words];
//   5. compact: the union of the kept bitmaps;
//   6. up:      a warp per kept channel: z[r, ch] = act[r, ch] * (X[r] . Wu[ch]), 0 for the
//               rows that did not keep it;
//   7. down:    chunks of the kept list x 256 columns: partial[c, r, :] = sum z[r, ch] Wd[ch];
//   8. reduce:  Y = the sum of the chunks' partials, in chunk order (deterministic).
#include <algorithm>

#include "cuda_device.h"

namespace popc::cuda {
namespace {

constexpr int kPass = 8;        // rows of X per read of a weight row
constexpr int kWarpsPerBlock = 8;
constexpr int kScanThreads = 1024;
constexpr int kSelectThreads = 256;
constexpr int kDownColumns = 256;
constexpr int64_t kMaxChunks = 32;

__device__ __forceinline__ float activate(float g, int activation) {
  switch (activation) {
    case kSilu: return g / (1.0f + expf(-g));
    case kGeluErf: return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
    default: return 0.5f * g * (1.0f + tanhf(0.79788456080286536f * (g + 0.044715f * g * g * g)));
  }
}

__device__ __forceinline__ bool has_bit(const uint32_t* bits, int64_t ch) { return (bits[ch >> 5] >> (ch & 31)) & 1u; }

// Exclusive prefix sum of v over the block (blockDim.x a multiple of 32, <= 1024); *total gets
// the block's sum. Every thread of the block must call it.
__device__ int block_exclusive_scan(int v, int* total) {
  __shared__ int warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  int inclusive = v;
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += n;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int s = lane < warps ? warp_sums[lane] : 0;
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += n;
    }
    warp_sums[lane] = s;  // inclusive sums of the warps
  }
  __syncthreads();
  const int before = warp ? warp_sums[warp - 1] : 0;
  *total = warp_sums[warps - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return before + inclusive - v;
}

__global__ void mark_partition(const int64_t* __restrict__ P, int64_t B, int64_t RC, int64_t D,
                               uint32_t* __restrict__ bits, int64_t words, Counters* __restrict__ errors) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < B * RC;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t id = P[e];
    if (!valid_id(id, D)) {
      atomicAdd(&errors->bad_index, 1ull);
      continue;
    }
    const uint32_t bit = 1u << (id & 31);
    if (atomicOr(&bits[(e / RC) * words + (id >> 5)], bit) & bit) atomicAdd(&errors->duplicate, 1ull);
  }
}

// list = the channels set in any of `units` bitmaps [units, words], ascending; *count their number.
__global__ void __launch_bounds__(kScanThreads) compact_union(const uint32_t* __restrict__ bits, int64_t units, int64_t words,
                              int32_t* __restrict__ list, int32_t* __restrict__ count) {
  int offset = 0;
  for (int64_t base = 0; base < words; base += blockDim.x) {
    const int64_t w = base + threadIdx.x;
    uint32_t word = 0;
    if (w < words)
      for (int64_t u = 0; u < units; ++u) word |= bits[u * words + w];
    int total = 0;
    int at = offset + block_exclusive_scan(__popc(word), &total);
    for (; word; word &= word - 1) list[at++] = static_cast<int32_t>(w * 32 + __ffs(word) - 1);
    offset += total;
  }
  if (threadIdx.x == 0) *count = offset;
}

// A warp per listed channel ch: dots of W[ch] with the rows of X that need it (bit ch of
// need[r / unit_div]), kPass rows per read of the weight row. kUp: out[r, ch] = act[r, ch] * dot
// (0 for rows without the bit), else act[r, ch] = activate(dot) for rows with it.
template <typename T, bool kUp>
__global__ void rows_dot(const int32_t* __restrict__ list, const int32_t* __restrict__ count,
                         const T* __restrict__ W, const T* __restrict__ X, int64_t rows, int64_t H, int64_t D,
                         const uint32_t* __restrict__ need, int64_t words, int64_t unit_div, int activation,
                         float* __restrict__ act, float* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t n = *count;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + (threadIdx.x >> 5); u < n;
       u += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const int64_t ch = list[u];
    const T* w = W + ch * H;
    for (int64_t r0 = 0; r0 < rows; r0 += kPass) {
      unsigned mask = 0;
      for (int i = 0; i < kPass && r0 + i < rows; ++i)
        if (has_bit(need + ((r0 + i) / unit_div) * words, ch)) mask |= 1u << i;
      float acc[kPass] = {};
      if (mask) {
        for (int64_t h = lane; h < H; h += 32) {
          const float wv = to_f(w[h]);
#pragma unroll
          for (int i = 0; i < kPass; ++i)
            if ((mask >> i) & 1u) acc[i] += to_f(X[(r0 + i) * H + h]) * wv;
        }
#pragma unroll
        for (int i = 0; i < kPass; ++i)
          for (int o = 16; o > 0; o >>= 1) acc[i] += __shfl_down_sync(0xffffffffu, acc[i], o);
      }
      if (lane == 0) {
#pragma unroll
        for (int i = 0; i < kPass; ++i) {
          if (r0 + i >= rows) break;
          const int64_t at = (r0 + i) * D + ch;
          const bool needed = (mask >> i) & 1u;
          if (kUp) out[at] = needed ? act[at] * acc[i] : 0.0f;
          else if (needed) act[at] = activate(acc[i], activation);
        }
      }
    }
  }
}

// An order-preserving uint32 of a candidate's key (the float order; -0 as +0).
__device__ __forceinline__ uint32_t ordered(float key) {
  if (key == 0.0f) key = 0.0f;
  const uint32_t bits = __float_as_uint(key);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

template <typename T>
__device__ __forceinline__ uint32_t candidate_key(const int64_t* ids, int64_t j, int64_t D, const float* act,
                                                  const T* output_norm) {
  const int64_t id = ids[j];
  if (!valid_id(id, D)) return 0;  // skipped below; its key only has to exist
  float key = fabsf(act[id]);
  if (output_norm) key *= to_f(output_norm[id]);
  return ordered(key);
}

__device__ __forceinline__ void keep(uint32_t* bits, int64_t id, int64_t D) {
  if (valid_id(id, D)) atomicOr(&bits[id >> 5], 1u << (id & 31));
}

// A block per row r of X: its kept channels (retained + top-K candidates) into kept[r].
template <typename T>
__global__ void select_kept(const int64_t* __restrict__ P, int64_t seq, int64_t RC, int64_t R, int64_t K, int64_t D,
                            const float* __restrict__ act_all, const T* __restrict__ output_norm,
                            uint32_t* __restrict__ kept_all, int64_t words) {
  const int64_t r = blockIdx.x;
  const int64_t* ids = P + (r / seq) * RC;
  const float* act = act_all + r * D;
  uint32_t* kept = kept_all + r * words;
  for (int64_t j = threadIdx.x; j < R; j += blockDim.x) keep(kept, ids[j], D);
  const int64_t C = RC - R;
  if (K <= 0) return;
  const int64_t* cand = ids + R;
  if (K >= C) {
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) keep(kept, cand[j], D);
    return;
  }
  // The K-th largest key t, 8 bits at a time from the top; `need` = how many keys equal to the
  // prefix so far are still to be taken.
  __shared__ unsigned hist[256];
  __shared__ uint32_t prefix_s;
  __shared__ int64_t need_s;
  uint32_t prefix = 0, high = 0;  // high: the bits fixed so far
  int64_t need = K;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const uint32_t k = candidate_key(cand, j, D, act, output_norm);
      if ((k & high) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t left = need;
      int digit = 255;
      for (; digit > 0 && hist[digit] < left; --digit) left -= hist[digit];
      prefix_s = prefix | (static_cast<uint32_t>(digit) << shift);
      need_s = left;
    }
    __syncthreads();
    prefix = prefix_s;
    need = need_s;
    high |= 255u << shift;
    __syncthreads();  // hist, prefix_s and need_s are rewritten by the next pass
  }
  // Keys above t are kept; of those equal to t, the `need` at the lowest positions.
  int64_t ties_before = 0;
  for (int64_t base = 0; base < C; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    const uint32_t k = j < C ? candidate_key(cand, j, D, act, output_norm) : 0;
    const bool tie = j < C && k == prefix;
    int total = 0;
    const int rank = block_exclusive_scan(tie ? 1 : 0, &total);
    if (j < C && (k > prefix || (tie && ties_before + rank < need))) keep(kept, cand[j], D);
    ties_before += total;
  }
}

// partial[c, r, h] = sum over the kept list's chunk c of z[r, ch] * Wd[ch, h], rows r0..r0+kPass.
template <typename T>
__global__ void down_partial(const int32_t* __restrict__ list, const int32_t* __restrict__ count, int64_t chunk,
                             const T* __restrict__ Wd, const float* __restrict__ z, int64_t rows, int64_t H,
                             int64_t D, float* __restrict__ partial) {
  const int64_t h = blockIdx.x * static_cast<int64_t>(kDownColumns) + threadIdx.x;
  const int64_t c = blockIdx.y, r0 = blockIdx.z * static_cast<int64_t>(kPass);
  const int64_t n = *count;
  const int64_t begin = c * chunk, end = n < begin + chunk ? n : begin + chunk;
  const int nr = static_cast<int>(rows - r0 < kPass ? rows - r0 : kPass);
  float acc[kPass] = {};
  for (int64_t u = begin; u < end; ++u) {
    const int64_t ch = list[u];
    const float wv = h < H ? to_f(Wd[ch * H + h]) : 0.0f;
#pragma unroll
    for (int i = 0; i < kPass; ++i)
      if (i < nr) acc[i] += z[(r0 + i) * D + ch] * wv;
  }
  if (h >= H) return;
  for (int i = 0; i < nr; ++i) partial[(c * rows + r0 + i) * H + h] = acc[i];
}

template <typename T>
__global__ void reduce_down(const float* __restrict__ partial, int64_t chunks, int64_t rows, int64_t H,
                            T* __restrict__ Y) {
  const int64_t n = rows * H;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) sum += partial[c * n + e];
    Y[e] = from_f<T>(sum);
  }
}

unsigned grid_for(int64_t items, int64_t per_block, int64_t cap = 4096) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((items + per_block - 1) / per_block, cap)));
}

// The scratch of one call, in the order it is carved.
struct DecodeScratch {
  int64_t words, chunks, chunk;
  size_t bytes(int64_t B, int64_t rows, int64_t D, int64_t H) const {
    return aligned(B * words * 4) + 2 * (aligned(D * 4) + aligned(4)) + 2 * aligned(rows * D * 4) +
           aligned(rows * words * 4) + aligned(chunks * rows * H * 4);
  }
};

}  // namespace

template <class T>
Status pop_decode(DeviceState* state, void* stream, const PopDecodeArgs<T>& a) {
  if (a.rows == 0 || a.H == 0) return Status{};
  if ((a.rows + kPass - 1) / kPass > kMaxGrid || a.D > (int64_t{1} << 31) - 1) {
    Status s;
    s.code = kCudaError;
    std::snprintf(s.message, sizeof(s.message), "the GPU decode takes at most %lld rows of X and 2^31 - 1 channels",
                  static_cast<long long>(kMaxGrid) * kPass);
    return s;
  }
  const int64_t B = a.rows / a.seq, kept_max = a.R + std::min(a.K, a.RC - a.R);
  // The union of kept channels has at most this many entries; the down pass splits it in chunks.
  const int64_t union_max = std::min(a.D, a.rows * kept_max);
  DecodeScratch plan{(a.D + 31) / 32, 1, 1};
  plan.chunk = std::max<int64_t>(64, (union_max + kMaxChunks - 1) / kMaxChunks);
  plan.chunks = std::max<int64_t>(1, (union_max + plan.chunk - 1) / plan.chunk);
  const size_t bytes = plan.bytes(B, a.rows, a.D, a.H);
  return run_on_slot(state, stream, bytes, [&](Slot& slot) -> cudaError_t {
    cudaStream_t s = slot.stream;
    Carver carve{static_cast<char*>(slot.scratch)};
    uint32_t* part_bits = carve.take<uint32_t>(B * plan.words);
    int32_t* gate_list = carve.take<int32_t>(a.D);
    int32_t* gate_count = carve.take<int32_t>(1);
    int32_t* keep_list = carve.take<int32_t>(a.D);
    int32_t* keep_count = carve.take<int32_t>(1);
    float* act = carve.take<float>(a.rows * a.D);
    float* z = carve.take<float>(a.rows * a.D);
    uint32_t* kept = carve.take<uint32_t>(a.rows * plan.words);
    float* partial = carve.take<float>(plan.chunks * a.rows * a.H);
    cudaError_t e = cudaMemsetAsync(part_bits, 0, B * plan.words * 4, s);
    if (e == cudaSuccess) e = cudaMemsetAsync(kept, 0, a.rows * plan.words * 4, s);
    if (e != cudaSuccess) return e;
    mark_partition<<<grid_for(B * a.RC, 256), 256, 0, s>>>(a.P, B, a.RC, a.D, part_bits, plan.words, slot.counters);
    if (union_max == 0) return cudaMemsetAsync(a.Y, 0, a.rows * a.H * sizeof(T), s);  // nothing kept: Y = 0
    compact_union<<<1, kScanThreads, 0, s>>>(part_bits, B, plan.words, gate_list, gate_count);
    const unsigned gate_blocks = grid_for(std::min(a.D, B * a.RC), kWarpsPerBlock);
    rows_dot<dev_type<T>, false><<<gate_blocks, kWarpsPerBlock * 32, 0, s>>>(
        gate_list, gate_count, dev(a.Wg), dev(a.X), a.rows, a.H, a.D, part_bits, plan.words, a.seq, a.activation, act,
        nullptr);
    select_kept<dev_type<T>><<<static_cast<unsigned>(std::min<int64_t>(a.rows, 1u << 30)), kSelectThreads, 0, s>>>(
        a.P, a.seq, a.RC, a.R, a.K, a.D, act, dev(a.output_norm), kept, plan.words);
    compact_union<<<1, kScanThreads, 0, s>>>(kept, a.rows, plan.words, keep_list, keep_count);
    rows_dot<dev_type<T>, true><<<grid_for(union_max, kWarpsPerBlock), kWarpsPerBlock * 32, 0, s>>>(
        keep_list, keep_count, dev(a.Wu), dev(a.X), a.rows, a.H, a.D, kept, plan.words, 1, a.activation, act, z);
    const dim3 down_grid(static_cast<unsigned>((a.H + kDownColumns - 1) / kDownColumns),
                         static_cast<unsigned>(plan.chunks), static_cast<unsigned>((a.rows + kPass - 1) / kPass));
    down_partial<dev_type<T>><<<down_grid, kDownColumns, 0, s>>>(keep_list, keep_count, plan.chunk, dev(a.Wd), z,
                                                                  a.rows, a.H, a.D, partial);
    reduce_down<dev_type<T>><<<grid_for(a.rows * a.H, 256), 256, 0, s>>>(partial, plan.chunks, a.rows, a.H, dev(a.Y));
    return cudaGetLastError();
  });
}

#define POPC_INSTANTIATE(T) template Status pop_decode<T>(DeviceState*, void*, const PopDecodeArgs<T>&);
POPC_FOR_EACH_FLOAT_TYPE(POPC_INSTANTIATE)
#undef POPC_INSTANTIATE

}  // namespace popc::cuda
