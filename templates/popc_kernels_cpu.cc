// popc op library: CPU kernels (see popc_kernels.h).
//
// Two code paths per op and dtype: AVX2+FMA+F16C intrinsics, picked at run time
// when the CPU has them, and portable loops written so that the compiler
// vectorises them (independent lanes, no cross-iteration float reduction).
// Weights are read in place, row by selected row; nothing is gathered or copied.
#include "popc_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define POPC_X86 1
#include <immintrin.h>
#endif

namespace popc {

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

namespace {

constexpr int kLanes = 8;

// ---- portable loops ---------------------------------------------------------------
inline float dot_f32(const float* x, const float* w, int64_t n) {
  float acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j] * w[i + j];
  float s = 0;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  for (; i < n; ++i) s += x[i] * w[i];
  return s;
}

inline float dot_f16(const float* x, const uint16_t* w, int64_t n) {
  float acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j] * half_to_float(w[i + j]);
  float s = 0;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  for (; i < n; ++i) s += x[i] * half_to_float(w[i]);
  return s;
}

#if POPC_X86
// ---- AVX2 + FMA + F16C ------------------------------------------------------------
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) float dot_f32_avx2(const float* x, const float* w, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(w + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(w + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), _mm256_loadu_ps(w + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), _mm256_loadu_ps(w + i + 24), a3);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(w + i), a0);
  float s = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) s += x[i] * w[i];
  return s;
}

__attribute__((target("avx2,fma,f16c"))) inline __m256 load_h8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

__attribute__((target("avx2,fma,f16c"))) float dot_f16_avx2(const float* x, const uint16_t* w, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load_h8(w + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), load_h8(w + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), load_h8(w + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), load_h8(w + i + 24), a3);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load_h8(w + i), a0);
  float s = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) s += x[i] * half_to_float(w[i]);
  return s;
}

// acc[0..64) += z * row[0..64): the full-width column block of GatherMatMul.
__attribute__((target("avx2,fma"))) void axpy64_f32_avx2(const float* z, const int64_t* idx, int64_t K,
                                                          const float* W, int64_t H, float* out) {
  __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(), c3 = _mm256_setzero_ps();
  __m256 c4 = _mm256_setzero_ps(), c5 = _mm256_setzero_ps(), c6 = _mm256_setzero_ps(), c7 = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if (k + 8 < K) __builtin_prefetch(W + idx[k + 8] * H);
    const float* w = W + idx[k] * H;
    __m256 s = _mm256_set1_ps(z[k]);
    c0 = _mm256_fmadd_ps(s, _mm256_loadu_ps(w), c0);
    c1 = _mm256_fmadd_ps(s, _mm256_loadu_ps(w + 8), c1);
    c2 = _mm256_fmadd_ps(s, _mm256_loadu_ps(w + 16), c2);
    c3 = _mm256_fmadd_ps(s, _mm256_loadu_ps(w + 24), c3);
    c4 = _mm256_fmadd_ps(s, _mm256_loadu_ps(w + 32), c4);
    c5 = _mm256_fmadd_ps(s, _mm256_loadu_ps(w + 40), c5);
    c6 = _mm256_fmadd_ps(s, _mm256_loadu_ps(w + 48), c6);
    c7 = _mm256_fmadd_ps(s, _mm256_loadu_ps(w + 56), c7);
  }
  _mm256_storeu_ps(out, c0); _mm256_storeu_ps(out + 8, c1); _mm256_storeu_ps(out + 16, c2); _mm256_storeu_ps(out + 24, c3);
  _mm256_storeu_ps(out + 32, c4); _mm256_storeu_ps(out + 40, c5); _mm256_storeu_ps(out + 48, c6); _mm256_storeu_ps(out + 56, c7);
}

__attribute__((target("avx2,fma,f16c"))) void axpy64_f16_avx2(const float* z, const int64_t* idx, int64_t K,
                                                               const uint16_t* W, int64_t H, float* out) {
  __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(), c3 = _mm256_setzero_ps();
  __m256 c4 = _mm256_setzero_ps(), c5 = _mm256_setzero_ps(), c6 = _mm256_setzero_ps(), c7 = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if (k + 8 < K) __builtin_prefetch(W + idx[k + 8] * H);
    const uint16_t* w = W + idx[k] * H;
    __m256 s = _mm256_set1_ps(z[k]);
    c0 = _mm256_fmadd_ps(s, load_h8(w), c0);
    c1 = _mm256_fmadd_ps(s, load_h8(w + 8), c1);
    c2 = _mm256_fmadd_ps(s, load_h8(w + 16), c2);
    c3 = _mm256_fmadd_ps(s, load_h8(w + 24), c3);
    c4 = _mm256_fmadd_ps(s, load_h8(w + 32), c4);
    c5 = _mm256_fmadd_ps(s, load_h8(w + 40), c5);
    c6 = _mm256_fmadd_ps(s, load_h8(w + 48), c6);
    c7 = _mm256_fmadd_ps(s, load_h8(w + 56), c7);
  }
  _mm256_storeu_ps(out, c0); _mm256_storeu_ps(out + 8, c1); _mm256_storeu_ps(out + 16, c2); _mm256_storeu_ps(out + 24, c3);
  _mm256_storeu_ps(out + 32, c4); _mm256_storeu_ps(out + 40, c5); _mm256_storeu_ps(out + 48, c6); _mm256_storeu_ps(out + 56, c7);
}
#endif  // POPC_X86

// Column block [h0, h0 + len) of one GatherMatMul row, portable loop (len <= 64).
template <typename WT>
void axpy_block(const float* z, const int64_t* idx, int64_t K, const WT* W, int64_t H, int64_t h0, int64_t len,
                float* out) {
  float acc[64];
  for (int64_t j = 0; j < len; ++j) acc[j] = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    if (k + 8 < K) __builtin_prefetch(W + idx[k + 8] * H + h0);
    const WT* w = W + idx[k] * H + h0;
    const float s = z[k];
    if constexpr (sizeof(WT) == 4) {
      for (int64_t j = 0; j < len; ++j) acc[j] += s * w[j];
    } else {
      for (int64_t j = 0; j < len; ++j) acc[j] += s * half_to_float(w[j]);
    }
  }
  for (int64_t j = 0; j < len; ++j) out[j] = acc[j];
}


// ---- fused POP decode helpers -------------------------------------------------------
#if POPC_X86
__attribute__((target("avx2,fma"))) void axpy_f32_avx2(float* y, float s, const float* w, int64_t n) {
  const __m256 v = _mm256_set1_ps(s);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(v, _mm256_loadu_ps(w + i), _mm256_loadu_ps(y + i)));
    _mm256_storeu_ps(y + i + 8, _mm256_fmadd_ps(v, _mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(y + i + 8)));
    _mm256_storeu_ps(y + i + 16, _mm256_fmadd_ps(v, _mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(y + i + 16)));
    _mm256_storeu_ps(y + i + 24, _mm256_fmadd_ps(v, _mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(y + i + 24)));
  }
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(v, _mm256_loadu_ps(w + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += s * w[i];
}

__attribute__((target("avx2,fma,f16c"))) void axpy_f16_avx2(float* y, float s, const uint16_t* w, int64_t n) {
  const __m256 v = _mm256_set1_ps(s);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(v, load_h8(w + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += s * half_to_float(w[i]);
}

#endif

template <typename WT>
void axpy_portable(float* y, float s, const WT* w, int64_t n) {
  if constexpr (sizeof(WT) == 4) {
    for (int64_t i = 0; i < n; ++i) y[i] += s * w[i];
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] += s * half_to_float(w[i]);
  }
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

}  // namespace

// ---- PopSwiGLUDecode / PopGeGLUDecode ----------------------------------------------------
namespace {
inline float row_dot(const CpuPopDecode& k, const float* x, const void* W, int64_t id) {
  if (!k.half) {
    const float* w = static_cast<const float*>(W) + id * k.H;
#if POPC_X86
    if (k.use_avx2) return dot_f32_avx2(x, w, k.H);
#endif
    return dot_f32(x, w, k.H);
  }
  const uint16_t* w = static_cast<const uint16_t*>(W) + id * k.H;
#if POPC_X86
  if (k.use_avx2) return dot_f16_avx2(x, w, k.H);
#endif
  return dot_f16(x, w, k.H);
}

inline void row_axpy(const CpuPopDecode& k, float* y, float s, const void* W, int64_t id) {
  if (!k.half) {
    const float* w = static_cast<const float*>(W) + id * k.H;
#if POPC_X86
    if (k.use_avx2) return axpy_f32_avx2(y, s, w, k.H);
#endif
    return axpy_portable(y, s, w, k.H);
  }
  const uint16_t* w = static_cast<const uint16_t*>(W) + id * k.H;
#if POPC_X86
  if (k.use_avx2) return axpy_f16_avx2(y, s, w, k.H);
#endif
  axpy_portable(y, s, w, k.H);
}
}  // namespace

bool CpuPopDecode::prepare(int64_t r, PopDecodeScratch& s) const {
  s.ids = P + (r / seq) * RC;
  s.xf.resize(static_cast<size_t>(H));
  if (half) {
    const uint16_t* x = static_cast<const uint16_t*>(X) + r * H;
    for (int64_t h = 0; h < H; ++h) s.xf[h] = half_to_float(x[h]);
  } else {
    const float* x = static_cast<const float*>(X) + r * H;
    std::copy(x, x + H, s.xf.begin());
  }
  s.gate.assign(static_cast<size_t>(RC), 0.0f);
  s.seen.assign(static_cast<size_t>(std::max(D, RC)), -1);
  for (int64_t j = 0; j < RC; ++j) {
    const int64_t id = s.ids[j];
    if (s.seen[id] >= 0) return false;  // a channel twice in one partition
    s.seen[id] = static_cast<int32_t>(j);
  }
  s.order.clear();
  for (int64_t id = 0; id < D; ++id)
    if (s.seen[id] >= 0) s.order.push_back(s.seen[id]);
  return true;
}

// Rows this far ahead are prefetched whole (into L1): the selected rows have gaps that stop
// the hardware prefetcher. Measured on a 2-core EPYC (SmolLM2 shapes, 30 FFNs, weights
// from DRAM): prefetching every row 2-3 rows ahead beat gap-only and L2-only prefetch.
constexpr int64_t kLookahead = 3;

// Walks rows[begin, end) of W (ids ascending) one row at a time: a single forward stream.
template <typename Visit>
inline void walk_rows(const int64_t* ids, const int64_t* order, int64_t begin, int64_t end, const char* w,
                      int64_t row_bytes, Visit&& visit) {
  auto id_at = [&](int64_t t) { return order ? ids[order[t]] : ids[t]; };
  for (int64_t t = begin; t < std::min(end, begin + kLookahead); ++t) prefetch_row(w + id_at(t) * row_bytes, row_bytes);
  for (int64_t t = begin; t < end; ++t) {
    if (t + kLookahead < end) prefetch_row(w + id_at(t + kLookahead) * row_bytes, row_bytes);
    visit(t);
  }
}

void CpuPopDecode::gate(PopDecodeScratch& s, int64_t begin, int64_t end) const {
  const int64_t row_bytes = H * (half ? 2 : 4);
  const float* x = s.xf.data();
  walk_rows(s.ids, s.order.data(), begin, end, static_cast<const char*>(Wg), row_bytes, [&](int64_t t) {
    const int64_t j = s.order[t];
    s.gate[j] = activate(row_dot(*this, x, Wg, s.ids[j]), activation);
  });
}

void CpuPopDecode::select(PopDecodeScratch& s) const {
  // Top-K candidates by |activation|, ties to the lower position (as ONNX TopK).
  std::vector<int64_t> candidates;
  candidates.reserve(static_cast<size_t>(RC - R));
  for (int64_t j = R; j < RC; ++j) candidates.push_back(j);
  const float* g = s.gate.data();
  auto before = [g](int64_t a, int64_t b) {
    const float fa = std::fabs(g[a]), fb = std::fabs(g[b]);
    return fa > fb || (fa == fb && a < b);
  };
  if (K < static_cast<int64_t>(candidates.size()))
    std::nth_element(candidates.begin(), candidates.begin() + K, candidates.end(), before);
  // Flags by position (reusing `seen`), then kept positions in ascending channel id.
  std::fill(s.seen.begin(), s.seen.begin() + RC, 0);
  for (int64_t j = 0; j < R; ++j) s.seen[j] = 1;
  for (int64_t t = 0; t < K; ++t) s.seen[candidates[t]] = 1;
  s.kept.clear();
  for (const int64_t j : s.order)
    if (s.seen[j]) s.kept.push_back(j);
}

void CpuPopDecode::updown(const PopDecodeScratch& s, int64_t begin, int64_t end, float* out) const {
  // Two streaming passes per block of channels: up rows (z = gate * x.Wu), then down rows (out += z Wd).
  const int64_t row_bytes = H * (half ? 2 : 4);
  const float* x = s.xf.data();
  float z[512];
  for (int64_t c0 = begin; c0 < end; c0 += 512) {
    const int64_t c1 = std::min(end, c0 + 512);
    walk_rows(s.ids, s.kept.data(), c0, c1, static_cast<const char*>(Wu), row_bytes, [&](int64_t t) {
      const int64_t j = s.kept[t];
      z[t - c0] = s.gate[j] * row_dot(*this, x, Wu, s.ids[j]);
    });
    walk_rows(s.ids, s.kept.data(), c0, c1, static_cast<const char*>(Wd), row_bytes, [&](int64_t t) {
      row_axpy(*this, out, z[t - c0], Wd, s.ids[s.kept[t]]);
    });
  }
}

void CpuPopDecode::finish(int64_t r, const float* y) const {
  if (half) {
    uint16_t* out = static_cast<uint16_t*>(Y) + r * H;
    for (int64_t h = 0; h < H; ++h) out[h] = float_to_half(y[h]);
  } else {
    std::copy(y, y + H, static_cast<float*>(Y) + r * H);
  }
}

bool CpuPopDecode::run_row(int64_t r) const {
  thread_local PopDecodeScratch s;
  if (!prepare(r, s)) return false;
  gate(s, 0, static_cast<int64_t>(s.order.size()));
  select(s);
  s.partial.assign(static_cast<size_t>(H), 0.0f);
  updown(s, 0, static_cast<int64_t>(s.kept.size()), s.partial.data());
  finish(r, s.partial.data());
  return true;
}


// ---- PopPartition ---------------------------------------------------------------------
namespace {
inline float z_at(const CpuPopPartition& k, int64_t i) {
  return k.half ? half_to_float(static_cast<const uint16_t*>(k.Z)[i]) : static_cast<const float*>(k.Z)[i];
}
}  // namespace

void CpuPopPartition::norms(int64_t row) const {
  const int64_t base = row * D;
  double sum = 0.0;
  if (!half) {
    const float* z = static_cast<const float*>(Z) + base;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
      for (int j = 0; j < 8; ++j) acc[j] += z[d + j] * z[d + j];
    for (int j = 0; j < 8; ++j) sum += acc[j];
    for (; d < D; ++d) sum += static_cast<double>(z[d]) * z[d];
  } else {
    for (int64_t d = 0; d < D; ++d) {
      const float v = z_at(*this, base + d);
      sum += static_cast<double>(v) * v;
    }
  }
  (*inv_norm)[row] = static_cast<float>(mask[row] / (std::sqrt(sum) + 1e-12));
}

void CpuPopPartition::scores(int64_t b, int64_t d0, int64_t d1) const {
  double* out_score = score->data() + b * D;
  if (use_static) {
    for (int64_t d = d0; d < d1; ++d)
      out_score[d] = half ? half_to_float(static_cast<const uint16_t*>(static_score)[d])
                          : static_cast<const float*>(static_score)[d];
    return;
  }
  float acc[256];
  for (int64_t c0 = d0; c0 < d1; c0 += 256) {
    const int64_t len = std::min<int64_t>(256, d1 - c0);
    for (int64_t j = 0; j < len; ++j) acc[j] = 0.0f;
    for (int64_t t = 0; t < T; ++t) {
      const float s = (*inv_norm)[b * T + t];
      if (s == 0.0f) continue;  // padding
      const int64_t base = (b * T + t) * D + c0;
      if (!half) {
        const float* z = static_cast<const float*>(Z) + base;
        for (int64_t j = 0; j < len; ++j) {
          const float v = z[j] * s;
          acc[j] += v * v;
        }
      } else {
        for (int64_t j = 0; j < len; ++j) {
          const float v = z_at(*this, base + j) * s;
          acc[j] += v * v;
        }
      }
    }
    for (int64_t j = 0; j < len; ++j) out_score[c0 + j] = std::sqrt(static_cast<double>(acc[j]));
  }
}

void CpuPopPartition::rank(int64_t b) const {
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
int64_t CpuGatherMatMulT::task_count() const {
  const int64_t total = rows * K;
  return total == 0 ? 0 : (total + block - 1) / block;
}

void CpuGatherMatMulT::run_task(int64_t task) const {
  const int64_t total = rows * K;
  const int64_t begin = task * block, end = std::min(total, begin + block);
  if (!half) {
    const float* x = static_cast<const float*>(X);
    const float* w = static_cast<const float*>(W);
    float* y = static_cast<float*>(Y);
    for (int64_t e = begin; e < end; ++e) {
      const float* xr = x + (e / K) * H;
      const float* wr = w + I[e] * H;
#if POPC_X86
      y[e] = use_avx2 ? dot_f32_avx2(xr, wr, H) : dot_f32(xr, wr, H);
#else
      y[e] = dot_f32(xr, wr, H);
#endif
    }
    return;
  }
  const uint16_t* x = static_cast<const uint16_t*>(X);
  const uint16_t* w = static_cast<const uint16_t*>(W);
  uint16_t* y = static_cast<uint16_t*>(Y);
  thread_local std::vector<float> xf;
  xf.resize(static_cast<size_t>(H));
  int64_t current = -1;
  for (int64_t e = begin; e < end; ++e) {
    const int64_t r = e / K;
    if (r != current) {  // this token's activations, widened once
      for (int64_t h = 0; h < H; ++h) xf[h] = half_to_float(x[r * H + h]);
      current = r;
    }
    const uint16_t* wr = w + I[e] * H;
#if POPC_X86
    const float v = use_avx2 ? dot_f16_avx2(xf.data(), wr, H) : dot_f16(xf.data(), wr, H);
#else
    const float v = dot_f16(xf.data(), wr, H);
#endif
    y[e] = float_to_half(v);
  }
}

// ---- GatherMatMul -----------------------------------------------------------------
int64_t CpuGatherMatMul::task_count() const {
  return rows * ((H + block - 1) / block);
}

void CpuGatherMatMul::run_task(int64_t task) const {
  const int64_t blocks = (H + block - 1) / block;
  const int64_t r = task / blocks;
  const int64_t h_begin = (task % blocks) * block, h_end = std::min(H, h_begin + block);
  const int64_t* idx = I + r * K;
  thread_local std::vector<float> zf;
  zf.resize(static_cast<size_t>(K));
  if (half) {
    const uint16_t* z = static_cast<const uint16_t*>(Z) + r * K;
    for (int64_t k = 0; k < K; ++k) zf[k] = half_to_float(z[k]);
  } else {
    const float* z = static_cast<const float*>(Z) + r * K;
    std::copy(z, z + K, zf.begin());
  }
  float acc[64];
  for (int64_t h0 = h_begin; h0 < h_end; h0 += 64) {
    const int64_t len = std::min<int64_t>(64, h_end - h0);
    if (half) {
      const uint16_t* w = static_cast<const uint16_t*>(W);
#if POPC_X86
      if (use_avx2 && len == 64) axpy64_f16_avx2(zf.data(), idx, K, w + h0, H, acc);
      else
#endif
        axpy_block(zf.data(), idx, K, w, H, h0, len, acc);
      uint16_t* y = static_cast<uint16_t*>(Y) + r * H + h0;
      for (int64_t j = 0; j < len; ++j) y[j] = float_to_half(acc[j]);
    } else {
      const float* w = static_cast<const float*>(W);
      float* y = static_cast<float*>(Y) + r * H + h0;
#if POPC_X86
      if (use_avx2 && len == 64) axpy64_f32_avx2(zf.data(), idx, K, w + h0, H, y);
      else
#endif
        axpy_block(zf.data(), idx, K, w, H, h0, len, y);
    }
  }
}

}  // namespace popc
