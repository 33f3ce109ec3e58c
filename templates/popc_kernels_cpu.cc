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

#if defined(__x86_64__) || defined(_M_X64)
#define POPC_X86 1
#include <immintrin.h>
// One target for every AVX2 function, so that the Elem loads inline into all callers.
#define POPC_AVX2 __attribute__((target("avx2,fma,f16c")))
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

// y[0..n) += s * w[0..n)
template <class WT>
void axpy(float* y, float s, const WT* w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += s * Elem<WT>::to_float(w[i]);
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

// y[0..n) += s * w[0..n)
template <class WT>
POPC_AVX2 void axpy_avx2(float* y, float s, const WT* w, int64_t n) {
  using E = Elem<WT>;
  const __m256 v = _mm256_set1_ps(s);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(v, E::load8(w + i), _mm256_loadu_ps(y + i)));
    _mm256_storeu_ps(y + i + 8, _mm256_fmadd_ps(v, E::load8(w + i + 8), _mm256_loadu_ps(y + i + 8)));
    _mm256_storeu_ps(y + i + 16, _mm256_fmadd_ps(v, E::load8(w + i + 16), _mm256_loadu_ps(y + i + 16)));
    _mm256_storeu_ps(y + i + 24, _mm256_fmadd_ps(v, E::load8(w + i + 24), _mm256_loadu_ps(y + i + 24)));
  }
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(v, E::load8(w + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += s * E::to_float(w[i]);
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

template <class WT>
inline void row_axpy(bool use_avx2, float* y, float s, const WT* w, int64_t n) {
#if POPC_X86
  if (use_avx2) return axpy_avx2(y, s, w, n);
#endif
  axpy(y, s, w, n);
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

}  // namespace

// ---- PopSwiGLUDecode / PopGeGLUDecode ----------------------------------------------------
template <class T, class WT>
bool CpuPopDecode<T, WT>::prepare(int64_t r, PopDecodeScratch& s) const {
  s.ids = P + (r / seq) * RC;
  s.xf.resize(static_cast<size_t>(H));
  widen(X + r * H, H, s.xf.data());
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

template <class T, class WT>
void CpuPopDecode<T, WT>::gate(PopDecodeScratch& s, int64_t begin, int64_t end) const {
  const int64_t row_bytes = H * static_cast<int64_t>(sizeof(WT));
  const float* x = s.xf.data();
  walk_rows(s.ids, s.order.data(), begin, end, reinterpret_cast<const char*>(Wg), row_bytes, [&](int64_t t) {
    const int64_t j = s.order[t];
    s.gate[j] = activate(row_dot(use_avx2, x, Wg + s.ids[j] * H, H), activation);
  });
}

template <class T, class WT>
void CpuPopDecode<T, WT>::select(PopDecodeScratch& s) const {
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

template <class T, class WT>
void CpuPopDecode<T, WT>::updown(const PopDecodeScratch& s, int64_t begin, int64_t end, float* out) const {
  // Two streaming passes per block of channels: up rows (z = gate * x.Wu), then down rows (out += z Wd).
  const int64_t row_bytes = H * static_cast<int64_t>(sizeof(WT));
  const float* x = s.xf.data();
  float z[512];
  for (int64_t c0 = begin; c0 < end; c0 += 512) {
    const int64_t c1 = std::min(end, c0 + 512);
    walk_rows(s.ids, s.kept.data(), c0, c1, reinterpret_cast<const char*>(Wu), row_bytes, [&](int64_t t) {
      const int64_t j = s.kept[t];
      z[t - c0] = s.gate[j] * row_dot(use_avx2, x, Wu + s.ids[j] * H, H);
    });
    walk_rows(s.ids, s.kept.data(), c0, c1, reinterpret_cast<const char*>(Wd), row_bytes, [&](int64_t t) {
      row_axpy(use_avx2, out, z[t - c0], Wd + s.ids[s.kept[t]] * H, H);
    });
  }
}

template <class T, class WT>
void CpuPopDecode<T, WT>::finish(int64_t r, const float* y) const {
  narrow(y, H, Y + r * H);
}

template <class T, class WT>
bool CpuPopDecode<T, WT>::run_row(int64_t r) const {
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
    for (int64_t j = 0; j < len; ++j) out_score[c0 + j] = std::sqrt(static_cast<double>(acc[j]));
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
  template struct CpuPopDecode<T>;        \
  template struct CpuPopPartition<T>;
POPC_FOR_EACH_TYPE(POPC_INSTANTIATE)
#undef POPC_INSTANTIATE

}  // namespace popc
