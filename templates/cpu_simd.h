// popc op library: SIMD building blocks shared by the CPU kernels (internal header).
//
// Elem<T> loads/converts one weight or activation type; row_dot and the gather helpers
// pick the AVX2+FMA+F16C path when the caller found it at run time,
// else portable loops written so that the compiler vectorises them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "popc_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#define POPC_X86 1
#include <immintrin.h>
// One target for every AVX2 function, so that the Elem loads inline into all callers.
#define POPC_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace popc::cpu {

// ---- element types ------------------------------------------------------------------
// Elem<T>: one element to/from float; with AVX2, 8 consecutive elements as 8 floats.
// A new weight type adds a specialisation here (a quantized layout also needs its
// block scales at the call sites); the loops below stay as they are.
template <class T>
struct Elem;

template <>
struct Elem<float> {
  static float to_float(float v) { return v; }
  static float from_float(float v) { return v; }
#if POPC_X86
  POPC_AVX2 static __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
#endif
};

template <>
struct Elem<half> {
  static float to_float(half v) { return half_to_float(v.bits); }
  static half from_float(float v) { return half{float_to_half(v)}; }
#if POPC_X86
  POPC_AVX2 static __m256 load8(const half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
#endif
};

// bfloat16 widens by a shift (it is the upper half of a float32).
template <>
struct Elem<bfloat16> {
  static float to_float(bfloat16 v) { return bfloat16_to_float(v.bits); }
  static bfloat16 from_float(float v) { return bfloat16{float_to_bfloat16(v)}; }
#if POPC_X86
  POPC_AVX2 static __m256 load8(const bfloat16* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
#endif
};

template <class T>
void widen(const T* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Elem<T>::to_float(src[i]);
}

template <class T>
void narrow(const float* src, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Elem<T>::from_float(src[i]);
}

// A row of activations as float: float rows are used in place, others widened into buf.
template <class T>
const float* float_row(const T* src, int64_t n, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    buf.resize(static_cast<size_t>(n));
    widen(src, n, buf.data());
    return buf.data();
  }
}

constexpr int kLanes = 8;

// ---- portable loops ---------------------------------------------------------------
template <class WT>
inline float dot(const float* x, const WT* w, int64_t n) {
  float acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j] * Elem<WT>::to_float(w[i + j]);
  float s = 0;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  for (; i < n; ++i) s += x[i] * Elem<WT>::to_float(w[i]);
  return s;
}

// Column block [h0, h0 + len) of one GatherMatMul row (len <= 64).
template <class WT>
void axpy_block(const float* z, const int64_t* idx, int64_t K, const WT* W, int64_t H, int64_t h0, int64_t len,
                float* out) {
  float acc[64];
  for (int64_t j = 0; j < len; ++j) acc[j] = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    if (k + 8 < K) __builtin_prefetch(W + idx[k + 8] * H + h0);
    const WT* w = W + idx[k] * H + h0;
    const float s = z[k];
    for (int64_t j = 0; j < len; ++j) acc[j] += s * Elem<WT>::to_float(w[j]);
  }
  for (int64_t j = 0; j < len; ++j) out[j] = acc[j];
}

#if POPC_X86
// ---- AVX2 + FMA + F16C ------------------------------------------------------------
POPC_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Four accumulators: enough independent FMAs to hide their latency.
template <class WT>
POPC_AVX2 float dot_avx2(const float* x, const WT* w, int64_t n) {
  using E = Elem<WT>;
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), E::load8(w + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), E::load8(w + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), E::load8(w + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), E::load8(w + i + 24), a3);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), E::load8(w + i), a0);
  float s = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) s += x[i] * E::to_float(w[i]);
  return s;
}

// out[0..64) = sum_k z[k] * W[idx[k], 0..64): the full-width column block of GatherMatMul,
// its 64 sums held in 8 registers.
template <class WT>
POPC_AVX2 void axpy64_avx2(const float* z, const int64_t* idx, int64_t K, const WT* W, int64_t H, float* out) {
  using E = Elem<WT>;
  __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(), c3 = _mm256_setzero_ps();
  __m256 c4 = _mm256_setzero_ps(), c5 = _mm256_setzero_ps(), c6 = _mm256_setzero_ps(), c7 = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if (k + 8 < K) __builtin_prefetch(W + idx[k + 8] * H);
    const WT* w = W + idx[k] * H;
    __m256 s = _mm256_set1_ps(z[k]);
    c0 = _mm256_fmadd_ps(s, E::load8(w), c0);
    c1 = _mm256_fmadd_ps(s, E::load8(w + 8), c1);
    c2 = _mm256_fmadd_ps(s, E::load8(w + 16), c2);
    c3 = _mm256_fmadd_ps(s, E::load8(w + 24), c3);
    c4 = _mm256_fmadd_ps(s, E::load8(w + 32), c4);
    c5 = _mm256_fmadd_ps(s, E::load8(w + 40), c5);
    c6 = _mm256_fmadd_ps(s, E::load8(w + 48), c6);
    c7 = _mm256_fmadd_ps(s, E::load8(w + 56), c7);
  }
  _mm256_storeu_ps(out, c0); _mm256_storeu_ps(out + 8, c1); _mm256_storeu_ps(out + 16, c2); _mm256_storeu_ps(out + 24, c3);
  _mm256_storeu_ps(out + 32, c4); _mm256_storeu_ps(out + 40, c5); _mm256_storeu_ps(out + 48, c6); _mm256_storeu_ps(out + 56, c7);
}
#endif  // POPC_X86

// The CPU (not the type) picks the path: AVX2 when the caller found it, else portable.
template <class WT>
inline float row_dot(bool use_avx2, const float* x, const WT* w, int64_t n) {
#if POPC_X86
  if (use_avx2) return dot_avx2(x, w, n);
#endif
  return dot(x, w, n);
}

// The next one or two rows of a row mask, taken out of it: (i, j) with j = i when only one
// is left (the x2 kernels feed each loaded weight vector to both).
inline std::pair<int, int> take_row_pair(uint64_t& mask) {
  const int i = __builtin_ctzll(mask);
  mask &= mask - 1;
  const int j = mask ? __builtin_ctzll(mask) : i;
  if (mask) mask &= mask - 1;
  return {i, j};
}

// Prefetch a whole weight row (used when the next row is not the adjacent one).
inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
}

inline float activate(float g, int activation) {
  switch (activation) {
    case kSilu: return g / (1.0f + std::exp(-g));
    case kGeluErf: return 0.5f * g * (1.0f + std::erf(g * 0.70710678118654752f));
    default: return 0.5f * g * (1.0f + std::tanh(0.79788456080286536f * (g + 0.044715f * g * g * g)));
  }
}

}  // namespace popc::cpu
