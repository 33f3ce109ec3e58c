// popc op library: the fused POP-online decode step on the CPU (see popc_kernels.h).
//
// Memory, not arithmetic, bounds a decode step: the kernel's job is to read each needed
// weight row once, as a stream the hardware prefetcher can follow. So
//   * the rows of one call share their reads: a weight row is read once for the union of
//     the channels the rows need and applied to every row that needs it;
//   * a task walks its slice of that union as kStreams interleaved forward streams (one
//     weight row from each per step): one stream per core leaves the memory system idle
//     between rows, four keep it busy (measured on the 2-core EPYC, SmolLM2 shapes: a
//     plain sum over 318 MB ran at ~10 GB/s with one stream per core, ~28 GB/s with four);
//   * a stream that skips rows prefetches the next row it needs (the gap ends the
//     hardware prefetcher's stream).
#include <algorithm>
#include <cassert>
#include <cmath>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"
#include "popc_kernels.h"
#include "quant_rows_i8.h"

namespace popc {

using namespace cpu;

namespace {

constexpr int kStreams = 4;
constexpr int64_t kUpDownBlock = 64;  // steps of up rows, then the same steps of down rows

inline int lowest_bit(uint64_t mask) { return __builtin_ctzll(mask); }

// ---- four weight rows against the rows of X in `mask` -------------------------------
// out[i * 4 + s] = x_i . w_s for every row i in mask (x_i = x + i * H).
template <class WT>
void dot_x4(const float* x, int64_t H, uint64_t mask, const WT* const* w, float* out) {
  for (; mask; mask &= mask - 1) {
    const int i = lowest_bit(mask);
    const float* xi = x + i * H;
    float acc[kStreams][kLanes] = {};
    int64_t h = 0;
    for (; h + kLanes <= H; h += kLanes)
      for (int s = 0; s < kStreams; ++s)
        for (int l = 0; l < kLanes; ++l) acc[s][l] += xi[h + l] * Elem<WT>::to_float(w[s][h + l]);
    for (int s = 0; s < kStreams; ++s) {
      float sum = 0;
      for (int l = 0; l < kLanes; ++l) sum += acc[s][l];
      for (int64_t t = h; t < H; ++t) sum += xi[t] * Elem<WT>::to_float(w[s][t]);
      out[i * kStreams + s] = sum;
    }
  }
}

// y_i += sum_s z[i * 4 + s] * w_s for every row i in mask (y_i = y + i * H).
template <class WT>
void axpy_x4(float* y, int64_t H, uint64_t mask, const WT* const* w, const float* z) {
  for (; mask; mask &= mask - 1) {
    const int i = lowest_bit(mask);
    float* yi = y + i * H;
    const float* zi = z + i * kStreams;
    for (int64_t h = 0; h < H; ++h)
      yi[h] += zi[0] * Elem<WT>::to_float(w[0][h]) + zi[1] * Elem<WT>::to_float(w[1][h]) +
               zi[2] * Elem<WT>::to_float(w[2][h]) + zi[3] * Elem<WT>::to_float(w[3][h]);
  }
}

#if POPC_X86
// Rows of X are taken two at a time: each weight vector loaded feeds two FMAs (8 sums in
// registers), which matters once several rows share a step (batch decode).
template <class WT>
POPC_AVX2 void dot_x4_avx2(const float* x, int64_t H, uint64_t mask, const WT* const* w, float* out) {
  using E = Elem<WT>;
  const WT *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
  while (mask) {
    const auto [i, j] = take_row_pair(mask);
    const float *xi = x + i * H, *xj = x + j * H;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int64_t h = 0;
    if (i == j) {
      for (; h + 8 <= H; h += 8) {
        const __m256 v = _mm256_loadu_ps(xi + h);
        a0 = _mm256_fmadd_ps(v, E::load8(w0 + h), a0);
        a1 = _mm256_fmadd_ps(v, E::load8(w1 + h), a1);
        a2 = _mm256_fmadd_ps(v, E::load8(w2 + h), a2);
        a3 = _mm256_fmadd_ps(v, E::load8(w3 + h), a3);
      }
    } else {
      for (; h + 8 <= H; h += 8) {
        const __m256 v = _mm256_loadu_ps(xi + h), u = _mm256_loadu_ps(xj + h);
        __m256 k = E::load8(w0 + h);
        a0 = _mm256_fmadd_ps(v, k, a0);
        b0 = _mm256_fmadd_ps(u, k, b0);
        k = E::load8(w1 + h);
        a1 = _mm256_fmadd_ps(v, k, a1);
        b1 = _mm256_fmadd_ps(u, k, b1);
        k = E::load8(w2 + h);
        a2 = _mm256_fmadd_ps(v, k, a2);
        b2 = _mm256_fmadd_ps(u, k, b2);
        k = E::load8(w3 + h);
        a3 = _mm256_fmadd_ps(v, k, a3);
        b3 = _mm256_fmadd_ps(u, k, b3);
      }
    }
    float si[4] = {hsum256(a0), hsum256(a1), hsum256(a2), hsum256(a3)};
    float sj[4] = {hsum256(b0), hsum256(b1), hsum256(b2), hsum256(b3)};
    for (int64_t t = h; t < H; ++t)
      for (int s = 0; s < 4; ++s) {
        const float wv = E::to_float(w[s][t]);
        si[s] += xi[t] * wv;
        sj[s] += xj[t] * wv;
      }
    for (int s = 0; s < 4; ++s) out[i * kStreams + s] = si[s];
    if (j != i)
      for (int s = 0; s < 4; ++s) out[j * kStreams + s] = sj[s];
  }
}

template <class WT>
POPC_AVX2 void axpy_x4_avx2(float* y, int64_t H, uint64_t mask, const WT* const* w, const float* z) {
  using E = Elem<WT>;
  const WT *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
  while (mask) {
    const auto [i, j] = take_row_pair(mask);
    float *yi = y + i * H, *yj = y + j * H;
    const float *zi = z + i * kStreams, *zj = z + j * kStreams;
    const __m256 s0 = _mm256_set1_ps(zi[0]), s1 = _mm256_set1_ps(zi[1]);
    const __m256 s2 = _mm256_set1_ps(zi[2]), s3 = _mm256_set1_ps(zi[3]);
    int64_t h = 0;
    if (i == j) {
      for (; h + 8 <= H; h += 8) {
        __m256 acc = _mm256_loadu_ps(yi + h);
        acc = _mm256_fmadd_ps(s0, E::load8(w0 + h), acc);
        acc = _mm256_fmadd_ps(s1, E::load8(w1 + h), acc);
        acc = _mm256_fmadd_ps(s2, E::load8(w2 + h), acc);
        acc = _mm256_fmadd_ps(s3, E::load8(w3 + h), acc);
        _mm256_storeu_ps(yi + h, acc);
      }
    } else {
      const __m256 t0 = _mm256_set1_ps(zj[0]), t1 = _mm256_set1_ps(zj[1]);
      const __m256 t2 = _mm256_set1_ps(zj[2]), t3 = _mm256_set1_ps(zj[3]);
      for (; h + 8 <= H; h += 8) {
        __m256 acc = _mm256_loadu_ps(yi + h), bcc = _mm256_loadu_ps(yj + h);
        __m256 k = E::load8(w0 + h);
        acc = _mm256_fmadd_ps(s0, k, acc);
        bcc = _mm256_fmadd_ps(t0, k, bcc);
        k = E::load8(w1 + h);
        acc = _mm256_fmadd_ps(s1, k, acc);
        bcc = _mm256_fmadd_ps(t1, k, bcc);
        k = E::load8(w2 + h);
        acc = _mm256_fmadd_ps(s2, k, acc);
        bcc = _mm256_fmadd_ps(t2, k, bcc);
        k = E::load8(w3 + h);
        acc = _mm256_fmadd_ps(s3, k, acc);
        bcc = _mm256_fmadd_ps(t3, k, bcc);
        _mm256_storeu_ps(yi + h, acc);
        _mm256_storeu_ps(yj + h, bcc);
      }
    }
    for (int64_t t = h; t < H; ++t) {
      const float v0 = E::to_float(w0[t]), v1 = E::to_float(w1[t]), v2 = E::to_float(w2[t]), v3 = E::to_float(w3[t]);
      yi[t] += zi[0] * v0 + zi[1] * v1 + zi[2] * v2 + zi[3] * v3;
      if (j != i) yj[t] += zj[0] * v0 + zj[1] * v1 + zj[2] * v2 + zj[3] * v3;
    }
  }
}
#endif  // POPC_X86

template <class WT>
inline void rows_dot_x4(bool use_avx2, const float* x, int64_t H, uint64_t mask, const WT* const* w, float* out) {
#if POPC_X86
  if (use_avx2) return dot_x4_avx2(x, H, mask, w, out);
#endif
  dot_x4(x, H, mask, w, out);
}

template <class WT>
inline void rows_axpy_x4(bool use_avx2, float* y, int64_t H, uint64_t mask, const WT* const* w, const float* z) {
#if POPC_X86
  if (use_avx2) return axpy_x4_avx2(y, H, mask, w, z);
#endif
  axpy_x4(y, H, mask, w, z);
}

// ---- the row accessors: what differs per weight layout (popc_kernels.h) ------------------
template <class WT>
inline void dot4(bool use_avx2, const DenseRows<WT>&, const float* x, int64_t H, uint64_t mask, const WT* const* w,
                 float* out) {
  rows_dot_x4(use_avx2, x, H, mask, w, out);
}

template <class WT>
inline void axpy4(bool use_avx2, const DenseRows<WT>&, float* y, int64_t H, uint64_t mask, const WT* const* w,
                  const float* z) {
  rows_axpy_x4(use_avx2, y, H, mask, w, z);
}

template <class WT>
inline void prefetch(const DenseRows<WT>& rows, int64_t ch, int64_t H) {
  prefetch_row(rows.row(ch, H), rows.row_bytes(H));
}

static_assert(kQuantStreams == kStreams, "quant_rows.h works on the walk's four streams");

// Quantized rows: dequantizing is the costly part, so one or two rows of X (one pass of the
// pair loop) dequantize in registers, and more rows dequantize the four weight rows once into
// an L1-resident float buffer that the float kernel then applies to every row.
constexpr int kQuantInRegisterRows = 2;

template <class ST>
inline const float* const* dequant4(bool use_avx2, const QuantRows<ST>& rows, int64_t H, const QuantRow<ST>* w,
                                    const float** out) {
  thread_local std::vector<float> buffer;
  buffer.resize(static_cast<size_t>(kStreams * H));
  for (int s = 0; s < kStreams; ++s) {
    out[s] = buffer.data() + s * H;
    dequant_row(use_avx2, rows.bits, rows.block, w[s], H, buffer.data() + s * H);
  }
  return out;
}

template <class ST>
inline void dot4(bool use_avx2, const QuantRows<ST>& rows, const float* x, int64_t H, uint64_t mask,
                 const QuantRow<ST>* w, float* out) {
  if (__builtin_popcountll(mask) <= kQuantInRegisterRows) return quant_dot_x4(use_avx2, rows.bits, rows.block, x, H, mask, w, out);
  const float* f[kStreams];
  rows_dot_x4(use_avx2, x, H, mask, dequant4(use_avx2, rows, H, w, f), out);
}

template <class ST>
inline void axpy4(bool use_avx2, const QuantRows<ST>& rows, float* y, int64_t H, uint64_t mask,
                  const QuantRow<ST>* w, const float* z) {
  // AVX2 takes every count in registers (quant_rows.h: pairs, and quads from three rows up).
  if (use_avx2 || __builtin_popcountll(mask) <= kQuantInRegisterRows)
    return quant_axpy_x4(use_avx2, rows.bits, rows.block, y, H, mask, w, z);
  const float* f[kStreams];
  rows_axpy_x4(use_avx2, y, H, mask, dequant4(use_avx2, rows, H, w, f), z);
}

// The gate and up dots of a step: on float X, or (quantized rows, int8x) on prepare's int8 X.
template <class WT>
inline void gate_up_dot4(bool use_avx2, const DenseRows<WT>& rows, const PopDecodePlan& p, bool, int64_t H,
                         uint64_t mask, const WT* const* w, float* out) {
  dot4(use_avx2, rows, p.xf.data(), H, mask, w, out);
}

template <class ST>
inline void gate_up_dot4(bool use_avx2, const QuantRows<ST>& rows, const PopDecodePlan& p, bool int8x, int64_t H,
                         uint64_t mask, const QuantRow<ST>* w, float* out) {
  if (!int8x) return dot4(use_avx2, rows, p.xf.data(), H, mask, w, out);
  const QuantX x{p.xq.data(), p.xs.data(), p.x_lane_s.data(), p.x_lane_zp.data(), H, rows.block};
  quant_dot_x4_i8(use_avx2, rows.bits, x, mask, w, out);
}

template <class Rows>
struct IsQuantRows : std::false_type {};
template <class ST>
struct IsQuantRows<QuantRows<ST>> : std::true_type {};

template <class ST>
inline void prefetch(const QuantRows<ST>& rows, int64_t ch, int64_t H) {
  prefetch_quant_row(rows.row(ch, H), H, rows.bits, rows.block);
}

// The four streams' rows of one step (stream 0's where a stream has run out) and the union
// of the X rows that need them (`need` [D]: a bit per row).
template <class Rows>
inline uint64_t step_rows(const Rows& rows, int64_t H, const int32_t* ch, const uint64_t* need,
                          typename Rows::Row* w) {
  uint64_t mask = 0;
  for (int s = 0; s < kStreams; ++s) {
    w[s] = rows.row(ch[s] >= 0 ? ch[s] : ch[0], H);
    if (ch[s] >= 0) mask |= need[ch[s]];
  }
  return mask;
}

// The slice [begin, end) of a channel list as kStreams interleaved streams: step t takes
// list[begin + s * stride + t] from each stream s that still has one. `visit(t, ch)` gets
// the step and its kStreams channels (-1 where a stream has run out; stream 0 never has).
// A stream whose next channel is not the adjacent row prefetches that row a step ahead.
// Quantized rows (a few hundred bytes each, their scales in a second array) go by faster than
// the hardware prefetcher ramps up: each stream prefetches its row kQuantLookahead steps ahead,
// gap or not (the first steps of a walk prefetch theirs before it starts).
template <class Rows>
struct Lookahead { static constexpr int64_t steps = 1; static constexpr bool always = false; };
template <class ST>
struct Lookahead<QuantRows<ST>> { static constexpr int64_t steps = 4; static constexpr bool always = true; };

template <class Rows, typename Visit>
inline void walk_streams(const int32_t* list, int64_t begin, int64_t end, const Rows& rows, int64_t H,
                         int64_t t_begin, int64_t t_end, Visit&& visit) {
  const int64_t stride = (end - begin + kStreams - 1) / kStreams;
  auto at = [&](int s, int64_t t) -> int32_t {
    const int64_t k = begin + s * stride + t;
    return (t < stride && k < end) ? list[k] : -1;
  };
  constexpr int64_t ahead = Lookahead<Rows>::steps;
  if constexpr (Lookahead<Rows>::always)
    for (int64_t t = t_begin; t < std::min(t_end, t_begin + ahead); ++t)
      for (int s = 0; s < kStreams; ++s)
        if (const int32_t ch = at(s, t); ch >= 0) prefetch(rows, ch, H);
  for (int64_t t = t_begin; t < t_end; ++t) {
    int32_t ch[kStreams];
    for (int s = 0; s < kStreams; ++s) {
      ch[s] = at(s, t);
      const int32_t next = at(s, t + ahead);
      if (next >= 0 && (Lookahead<Rows>::always || next != ch[s] + 1)) prefetch(rows, next, H);
    }
    visit(t, ch);
  }
}

inline int64_t stream_steps(int64_t begin, int64_t end) { return (end - begin + kStreams - 1) / kStreams; }

}  // namespace

// The channels some row uses (a non-zero row mask), in channel order. Branch-free: the
// channels are a random subset, so a branch per channel would mispredict half the time.
inline void list_used_channels(const std::vector<uint64_t>& row_masks, std::vector<int32_t>& list) {
  list.resize(row_masks.size());
  int64_t used = 0;
  for (size_t ch = 0; ch < row_masks.size(); ++ch) {
    list[used] = static_cast<int32_t>(ch);
    used += row_masks[ch] != 0;
  }
  list.resize(static_cast<size_t>(used));
}

template <class T, class Rows>
bool CpuPopDecode<T, Rows>::prepare(PopDecodePlan& p, int64_t row0, int64_t nrows) const {
  p.row0 = row0;
  p.nrows = nrows;
  p.xf.resize(static_cast<size_t>(nrows * H));
  widen(X + row0 * H, nrows * H, p.xf.data());
  if constexpr (IsQuantRows<Rows>::value) {
    if (accuracy_level >= 4) {
      const int64_t block = Wg.block;
      p.xq.resize(static_cast<size_t>(nrows * H));
      p.xs.resize(static_cast<size_t>(nrows * (H / block)));
      p.x_lane_s.resize(static_cast<size_t>(nrows * (H / 4)));
      p.x_lane_zp.resize(static_cast<size_t>(nrows * (H / 4)));
      for (int64_t i = 0; i < nrows; ++i)
        quantize_x_row(p.xf.data() + i * H, H, block, Wg.bits, use_avx2, p.xq.data() + i * H,
                       p.xs.data() + i * (H / block), p.x_lane_s.data() + i * (H / 4),
                       p.x_lane_zp.data() + i * (H / 4));
    }
  }
  p.gate_rows.assign(static_cast<size_t>(D), 0);
  p.seen.assign(static_cast<size_t>(D), 0);
  int64_t stamped = -1;  // the last sequence whose ids were checked for duplicates
  for (int64_t i = 0; i < nrows; ++i) {
    const int64_t b = (row0 + i) / seq;
    const int64_t* ids = P + b * RC;
    const bool check = b != stamped;
    for (int64_t j = 0; j < RC; ++j) {
      const int64_t ch = ids[j];
      if (check) {
        if (p.seen[ch] == b + 1) return false;  // a channel twice in one partition
        p.seen[ch] = static_cast<int32_t>(b + 1);
      }
      p.gate_rows[ch] |= uint64_t{1} << i;
    }
    stamped = b;
  }
  list_used_channels(p.gate_rows, p.gate_list);
  p.act.resize(static_cast<size_t>(nrows * D));
  p.kept.resize(static_cast<size_t>(nrows));
  return true;
}

template <class T, class Rows>
void CpuPopDecode<T, Rows>::gate(PopDecodePlan& p, int64_t begin, int64_t end) const {
  const bool int8x = accuracy_level >= 4;
  float dots[kPopRowsPerGroup * kStreams];
  walk_streams(p.gate_list.data(), begin, end, Wg, H, 0, stream_steps(begin, end), [&](int64_t, const int32_t* ch) {
                 typename Rows::Row w[kStreams];
                 const uint64_t mask = step_rows(Wg, H, ch, p.gate_rows.data(), w);
                 gate_up_dot4(use_avx2, Wg, p, int8x, H, mask, w, dots);
                 for (int s = 0; s < kStreams; ++s) {
                   if (ch[s] < 0) continue;
                   for (uint64_t m = p.gate_rows[ch[s]]; m; m &= m - 1) {
                     const int i = lowest_bit(m);
                     p.act[i * D + ch[s]] = activate(dots[i * kStreams + s], activation);
                   }
                 }
               });
}

template <class T, class Rows>
void CpuPopDecode<T, Rows>::select(PopDecodePlan& p, int64_t i) const {
  // Retained ids plus the top-K candidates by |activation|, ties to the lower position (as ONNX
  // TopK). Only the set matters (updown walks keep_list in channel order): the K-th largest |a|
  // t by nth_element on the candidates' |a| (contiguous floats, not an indirect comparator),
  // then every candidate above t and, in position order, those equal to t until there are K.
  // Output-aware (output_norm set): the key is |a| * ||Wd|| of the candidate's channel.
  const int64_t* ids = P + ((p.row0 + i) / seq) * RC;
  const float* a = p.act.data() + i * D;
  std::vector<int32_t>& kept = p.kept[i];
  const int64_t C = RC - R;
  kept.resize(static_cast<size_t>(R + std::max<int64_t>(0, std::min(K, C))));
  for (int64_t j = 0; j < R; ++j) kept[j] = static_cast<int32_t>(ids[j]);
  if (K <= 0) return;
  if (K >= C) {  // every candidate
    for (int64_t j = 0; j < C; ++j) kept[R + j] = static_cast<int32_t>(ids[R + j]);
    return;
  }
  thread_local std::vector<float> key, order;
  key.resize(static_cast<size_t>(C));
  if (output_norm) {
    for (int64_t j = 0; j < C; ++j) key[j] = std::fabs(a[ids[R + j]]) * Elem<T>::to_float(output_norm[ids[R + j]]);
  } else {
    for (int64_t j = 0; j < C; ++j) key[j] = std::fabs(a[ids[R + j]]);
  }
  // A NaN key ranks highest (as on the GPU): comparisons with NaN would break nth_element's
  // ordering and leave `kept` with fewer than K fresh ids, or write past it.
  for (float& k : key)
    if (std::isnan(k)) k = std::numeric_limits<float>::infinity();
  order.assign(key.begin(), key.end());
  std::nth_element(order.begin(), order.begin() + (K - 1), order.end(), std::greater<float>());
  const float t = order[K - 1];
  int64_t above = 0;
  for (int64_t j = 0; j < C; ++j) above += key[j] > t;
  int64_t ties = K - above, n = R;  // candidates equal to t to take, lowest positions first
  for (int64_t j = 0; j < C; ++j) {
    const float k = key[j];
    if (k > t || (k == t && ties-- > 0)) kept[n++] = static_cast<int32_t>(ids[R + j]);
  }
  assert(n == static_cast<int64_t>(kept.size()));
}

template <class T, class Rows>
void CpuPopDecode<T, Rows>::gather_kept(PopDecodePlan& p) const {
  p.keep_rows.assign(static_cast<size_t>(D), 0);
  for (int64_t i = 0; i < p.nrows; ++i)
    for (const int32_t ch : p.kept[i]) p.keep_rows[ch] |= uint64_t{1} << i;
  list_used_channels(p.keep_rows, p.keep_list);
}

template <class T, class Rows>
void CpuPopDecode<T, Rows>::updown(const PopDecodePlan& p, int64_t begin, int64_t end, float* out) const {
  // Blocks of steps: up rows (z = act * x.Wu) for a block, then the block's down rows (out += z Wd).
  const int64_t nrows = p.nrows;
  const bool int8x = accuracy_level >= 4;
  thread_local std::vector<float> z;  // [block steps, nrows, kStreams]
  z.resize(static_cast<size_t>(kUpDownBlock * nrows * kStreams));
  float dots[kPopRowsPerGroup * kStreams];
  const int64_t steps = stream_steps(begin, end);
  for (int64_t t0 = 0; t0 < steps; t0 += kUpDownBlock) {
    const int64_t t1 = std::min(steps, t0 + kUpDownBlock);
    walk_streams(p.keep_list.data(), begin, end, Wu, H, t0, t1, [&](int64_t t, const int32_t* ch) {
                   typename Rows::Row w[kStreams];
                   const uint64_t mask = step_rows(Wu, H, ch, p.keep_rows.data(), w);
                   gate_up_dot4(use_avx2, Wu, p, int8x, H, mask, w, dots);
                   float* zt = z.data() + (t - t0) * nrows * kStreams;
                   for (uint64_t m = mask; m; m &= m - 1) {
                     const int i = lowest_bit(m);
                     for (int s = 0; s < kStreams; ++s) {
                       const bool kept = ch[s] >= 0 && ((p.keep_rows[ch[s]] >> i) & 1);
                       zt[i * kStreams + s] = kept ? p.act[i * D + ch[s]] * dots[i * kStreams + s] : 0.0f;
                     }
                   }
                 });
    walk_streams(p.keep_list.data(), begin, end, Wd, H, t0, t1, [&](int64_t t, const int32_t* ch) {
                   typename Rows::Row w[kStreams];
                   const uint64_t mask = step_rows(Wd, H, ch, p.keep_rows.data(), w);
                   axpy4(use_avx2, Wd, out, H, mask, w, z.data() + (t - t0) * nrows * kStreams);
                 });
  }
}

template <class T, class Rows>
void CpuPopDecode<T, Rows>::finish(PopDecodePlan& p, int64_t tasks) const {
  const int64_t n = p.nrows * H;
  float* total = p.partial.data();
  for (int64_t c = 1; c < tasks; ++c) {
    const float* part = p.partial.data() + c * n;
    for (int64_t e = 0; e < n; ++e) total[e] += part[e];
  }
  narrow(total, n, Y + p.row0 * H);
}

// Dense rows of each float type; quantized rows with scales of the activations' type.
#define POPC_INSTANTIATE(T) template struct CpuPopDecode<T>;
POPC_FOR_EACH_FLOAT_TYPE(POPC_INSTANTIATE)
#undef POPC_INSTANTIATE
#define POPC_INSTANTIATE(T) template struct CpuPopDecode<T, QuantRows<T>>;
POPC_FOR_EACH_TYPE(POPC_INSTANTIATE)
#undef POPC_INSTANTIATE

}  // namespace popc
