// popc op library: CPU kernels (see popc_kernels.h).
//
// Two code paths per op: AVX2+FMA+F16C intrinsics, picked at run time when the CPU
// has them, and portable loops written so that the compiler vectorises them
// (independent lanes, no cross-iteration float reduction). Both are written once,
// as templates over the weight type WT: Elem<WT> below is all that differs per type.
// Weights are read in place, row by selected row; nothing is gathered or copied.
#include "popc_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"

namespace popc {

using namespace cpu;

// ---- float16 <-> float32 (IEEE binary16, round to nearest even) -------------------
float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    float f = static_cast<float>(mant) * (1.0f / 16777216.0f);  // subnormal: mant * 2^-24
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return static_cast<uint16_t>(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (x >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to infinity
  if (x < 0x38800000u) {  // zero or subnormal half: let the FPU round
    float v;
    std::memcpy(&v, &x, 4);
    v += 0.5f;
    uint32_t b;
    std::memcpy(&b, &v, 4);
    return static_cast<uint16_t>(sign | (b - 0x3f000000u));
  }
  uint32_t odd = (x >> 13) & 1u;
  x += 0xc8000fffu + odd;
  return static_cast<uint16_t>(sign | (x >> 13));
}

// ---- bfloat16 <-> float32 ---------------------------------------------------------
float bfloat16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

uint16_t float_to_bfloat16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  x += 0x7fffu + ((x >> 16) & 1u);  // round to nearest even (overflow rounds to infinity)
  return static_cast<uint16_t>(x >> 16);
}

int64_t first_bad_index(const int64_t* idx, int64_t count, int64_t n) {
  // Branch-free scan (vectorises); locate the offender only when one exists.
  uint64_t bad = 0;
  const uint64_t un = static_cast<uint64_t>(n);
  for (int64_t i = 0; i < count; ++i) bad |= static_cast<uint64_t>(static_cast<uint64_t>(idx[i]) >= un);
  if (!bad) return -1;
  for (int64_t i = 0; i < count; ++i)
    if (static_cast<uint64_t>(idx[i]) >= un) return i;  // negative values wrap to huge
  return -1;
}

bool cpu_has_avx2() {
#if POPC_X86 && (defined(__GNUC__) || defined(__clang__))
  const char* off = std::getenv("POPC_OPLIB_NO_AVX2");
  if (off && *off && std::strcmp(off, "0") != 0) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// ---- PopPartition ---------------------------------------------------------------------
template <class ZT>
void CpuPopPartition<ZT>::norms(int64_t row) const {
  // Squares summed in 8 float lanes (vectorises), the lanes then in double.
  const ZT* z = Z + row * D;
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int j = 0; j < 8; ++j) {
      const float v = Elem<ZT>::to_float(z[d + j]);
      acc[j] += v * v;
    }
  double sum = 0.0;
  for (int j = 0; j < 8; ++j) sum += acc[j];
  for (; d < D; ++d) {
    const float v = Elem<ZT>::to_float(z[d]);
    sum += static_cast<double>(v) * v;
  }
  (*inv_norm)[row] = static_cast<float>(mask[row] / (std::sqrt(sum) + 1e-12));
}

template <class ZT>
void CpuPopPartition<ZT>::scores(int64_t b, int64_t d0, int64_t d1) const {
  double* out_score = score->data() + b * D;
  if (use_static) {
    for (int64_t d = d0; d < d1; ++d) out_score[d] = Elem<ZT>::to_float(static_score[d]);
    return;
  }
  float acc[256];
  for (int64_t c0 = d0; c0 < d1; c0 += 256) {
    const int64_t len = std::min<int64_t>(256, d1 - c0);
    for (int64_t j = 0; j < len; ++j) acc[j] = 0.0f;
    for (int64_t t = 0; t < T; ++t) {
      const float s = (*inv_norm)[b * T + t];
      if (s == 0.0f) continue;  // padding
      const ZT* z = Z + (b * T + t) * D + c0;
      for (int64_t j = 0; j < len; ++j) {
        const float v = Elem<ZT>::to_float(z[j]) * s;
        acc[j] += v * v;
      }
    }
    if (output_norm) {
      for (int64_t j = 0; j < len; ++j)
        out_score[c0 + j] = std::sqrt(static_cast<double>(acc[j])) * Elem<ZT>::to_float(output_norm[c0 + j]);
    } else {
      for (int64_t j = 0; j < len; ++j) out_score[c0 + j] = std::sqrt(static_cast<double>(acc[j]));
    }
  }
}

template <class ZT>
void CpuPopPartition<ZT>::rank(int64_t b) const {
  // One uint64 key per channel: (inverted float score bits, channel id). Scores are >= 0, so
  // the bits order like the values; ascending keys = decreasing score, ties to the lower id.
  const double* sc = score->data() + b * D;
  std::vector<uint64_t> keys(static_cast<size_t>(D));
  for (int64_t d = 0; d < D; ++d) {
    float v = static_cast<float>(sc[d]);
    if (!(v > 0.0f)) v = 0.0f;  // NaN and -0 rank last
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    keys[d] = (static_cast<uint64_t>(0xffffffffu - bits) << 32) | static_cast<uint64_t>(d);
  }
  if (count < D) std::nth_element(keys.begin(), keys.begin() + count, keys.end());
  std::sort(keys.begin(), keys.begin() + count);
  for (int64_t i = 0; i < count; ++i) out[b * count + i] = static_cast<int64_t>(keys[i] & 0xffffffffu);
}

// ---- GatherMatMulT ----------------------------------------------------------------
template <class T, class WT>
int64_t CpuGatherMatMulT<T, WT>::task_count() const {
  const int64_t total = rows * K;
  return total == 0 ? 0 : (total + block - 1) / block;
}

template <class T, class WT>
void CpuGatherMatMulT<T, WT>::run_task(int64_t task) const {
  const int64_t total = rows * K;
  const int64_t begin = task * block, end = std::min(total, begin + block);
  thread_local std::vector<float> xbuf;
  const float* x = nullptr;
  int64_t current = -1;
  for (int64_t e = begin; e < end; ++e) {
    const int64_t r = e / K;
    if (r != current) {  // this token's activations as float, widened once per row
      x = float_row(X + r * H, H, xbuf);
      current = r;
    }
    Y[e] = Elem<T>::from_float(row_dot(use_avx2, x, W + I[e] * H, H));
  }
}

// ---- GatherMatMul -----------------------------------------------------------------
template <class T, class WT>
int64_t CpuGatherMatMul<T, WT>::task_count() const {
  return rows * ((H + block - 1) / block);
}

template <class T, class WT>
void CpuGatherMatMul<T, WT>::run_task(int64_t task) const {
  const int64_t blocks = (H + block - 1) / block;
  const int64_t r = task / blocks;
  const int64_t h_begin = (task % blocks) * block, h_end = std::min(H, h_begin + block);
  const int64_t* idx = I + r * K;
  thread_local std::vector<float> zbuf;
  const float* z = float_row(Z + r * K, K, zbuf);
  float acc[64];
  for (int64_t h0 = h_begin; h0 < h_end; h0 += 64) {
    const int64_t len = std::min<int64_t>(64, h_end - h0);
    T* y = Y + r * H + h0;
    float* sums = acc;  // float output is written in place; other types via acc, then narrowed
    if constexpr (std::is_same_v<T, float>) sums = y;
#if POPC_X86
    if (use_avx2 && len == 64) axpy64_avx2(z, idx, K, W + h0, H, sums);
    else
#endif
      axpy_block(z, idx, K, W, H, h0, len, sums);
    if constexpr (!std::is_same_v<T, float>) narrow(acc, len, y);
  }
}

// The element types the op registrations use (popc_kernels.h).
#define POPC_INSTANTIATE(T)               \
  template struct CpuGatherMatMulT<T>;    \
  template struct CpuGatherMatMul<T>;     \
  template struct CpuPopPartition<T>;
POPC_FOR_EACH_FLOAT_TYPE(POPC_INSTANTIATE)
#undef POPC_INSTANTIATE

}  // namespace popc
