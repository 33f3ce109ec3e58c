// popc op library: block-quantized weight rows on the CPU (internal header).
//
// The layout is QuantRows' (popc_kernels.h, popc/quantize.py): per row, packed integers q
// (int4: element 2i in the low nibble of byte i; int8: one byte each) and one scale s per
// `block` consecutive elements, w[h] = s[h / block] * (q[h] - zp), zp = 2^(bits-1).
//
// Four rows at a time against the rows of X in a mask, as the decode walk (pop_decode_cpu.cc)
// and the quantized gathers (quant_kernels_cpu.cc) use them:
//   quant_dot_x4:  out[i * 4 + s] = x_i . w_s          (gate / up rows; GatherMatMulTQ)
//   quant_axpy_x4: y_i += sum_s z[i * 4 + s] * w_s     (down rows; GatherMatMulQ)
// Two rows of X and more: weights are dequantized in registers exactly as the function bodies
// dequantize them, (q - zp) * s with one rounding (q * s - zp * s by one FMA; zp * s is exact,
// zp a power of two). One row (batch 1, the gathers): the scale and zero point leave the inner
// loop (per block, s * (x . q - zp * sum x) and y += (z s) q - zp z s), one FMA per weight
// vector; that reassociation costs a few float ulps against the bodies. Activations are float
// here; int8 activations (accuracy_level >= 4, the decode's gate and up dots) are in
// quant_rows_i8.h.
//
// AVX2: int4, 8 elements = 4 bytes broadcast to the 8 lanes, each lane shifted right by its
// nibble's offset (vpsrlvd) and masked: no shuffles, and the elements come out in their natural
// order (x and y need no reordering). int8: vpmovzxbd on 8 bytes. H is a multiple of the block
// (>= 16, the op checks), so there are no tails.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_simd.h"
#include "popc_kernels.h"

namespace popc::cpu {

constexpr int kQuantStreams = 4;  // rows per call (the decode walk's kStreams)
constexpr int64_t kQuantChunk = 64;  // portable path: elements dequantized at a time

// ---- portable -------------------------------------------------------------------------
// Elements [h0, h0 + n) of a row, dequantized into out.
template <int Bits, class ST>
inline void dequant_span(const QuantRow<ST>& r, int64_t block, int64_t h0, int64_t n, float* out) {
  constexpr int zp = 1 << (Bits - 1);
  const int64_t stop = h0 + n;
  for (int64_t h = h0; h < stop;) {
    const int64_t end = std::min(stop, (h / block + 1) * block);
    const float s = Elem<ST>::to_float(r.s[h / block]);
    for (; h < end; ++h) {
      int q;
      if constexpr (Bits == 4) q = (r.q[h >> 1] >> ((h & 1) << 2)) & 0xF;
      else q = r.q[h];
      out[h - h0] = static_cast<float>(q - zp) * s;
    }
  }
}

template <int Bits, class ST>
void quant_dot_x4_portable(const float* x, int64_t H, uint64_t mask, const QuantRow<ST>* w, int64_t block,
                           float* out) {
  for (uint64_t m = mask; m; m &= m - 1)
    for (int s = 0; s < kQuantStreams; ++s) out[__builtin_ctzll(m) * kQuantStreams + s] = 0.0f;
  float buf[kQuantStreams][kQuantChunk];
  for (int64_t h0 = 0; h0 < H; h0 += kQuantChunk) {
    const int64_t n = std::min(kQuantChunk, H - h0);
    for (int s = 0; s < kQuantStreams; ++s) dequant_span<Bits>(w[s], block, h0, n, buf[s]);
    for (uint64_t m = mask; m; m &= m - 1) {
      const int i = __builtin_ctzll(m);
      for (int s = 0; s < kQuantStreams; ++s) out[i * kQuantStreams + s] += dot(x + i * H + h0, buf[s], n);
    }
  }
}

template <int Bits, class ST>
void quant_axpy_x4_portable(float* y, int64_t H, uint64_t mask, const QuantRow<ST>* w, int64_t block,
                            const float* z) {
  float buf[kQuantStreams][kQuantChunk];
  for (int64_t h0 = 0; h0 < H; h0 += kQuantChunk) {
    const int64_t n = std::min(kQuantChunk, H - h0);
    for (int s = 0; s < kQuantStreams; ++s) dequant_span<Bits>(w[s], block, h0, n, buf[s]);
    for (uint64_t m = mask; m; m &= m - 1) {
      const int i = __builtin_ctzll(m);
      float* yi = y + i * H + h0;
      const float* zi = z + i * kQuantStreams;
      for (int64_t e = 0; e < n; ++e) yi[e] += zi[0] * buf[0][e] + zi[1] * buf[1][e] + zi[2] * buf[2][e] + zi[3] * buf[3][e];
    }
  }
}

#if POPC_X86
// ---- AVX2 + FMA (+ F16C for half scales) ---------------------------------------------------
template <class ST>
POPC_AVX2 inline __m256 scale8(const ST* s) {
  if constexpr (std::is_same_v<ST, float>) return _mm256_broadcast_ss(s);
  else return _mm256_set1_ps(_cvtsh_ss(s->bits));
}

// Elements [h, h + 8) of a row's integers as floats (q - zp) * s; zs = zp * s.
template <int Bits>
POPC_AVX2 inline __m256 qload8(const uint8_t* q, int64_t h, __m256 s, __m256 zs) {
  __m256i n;
  if constexpr (Bits == 4) {
    uint32_t v;
    std::memcpy(&v, q + (h >> 1), 4);
    n = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(v)), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
    n = _mm256_and_si256(n, _mm256_set1_epi32(0xF));
  } else {
    n = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + h)));
  }
  return _mm256_fmsub_ps(_mm256_cvtepi32_ps(n), s, zs);
}

// Elements [h, h + 8) of a row's integers q (0 .. 2^bits - 1) as floats, unscaled.
template <int Bits>
POPC_AVX2 inline __m256 qint8(const uint8_t* q, int64_t h) {
  __m256i n;
  if constexpr (Bits == 4) {
    uint32_t v;
    std::memcpy(&v, q + (h >> 1), 4);
    n = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(v)), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
    n = _mm256_and_si256(n, _mm256_set1_epi32(0xF));
  } else {
    n = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + h)));
  }
  return _mm256_cvtepi32_ps(n);
}

// One block's scale of each of the four rows, and zp times it.
template <int Bits, class ST>
struct BlockScales {
  __m256 s0, s1, s2, s3, z0, z1, z2, z3;
  POPC_AVX2 BlockScales(const QuantRow<ST>* w, int64_t b) {
    const __m256 zp = _mm256_set1_ps(static_cast<float>(1 << (Bits - 1)));
    s0 = scale8(w[0].s + b), s1 = scale8(w[1].s + b), s2 = scale8(w[2].s + b), s3 = scale8(w[3].s + b);
    z0 = _mm256_mul_ps(s0, zp), z1 = _mm256_mul_ps(s1, zp), z2 = _mm256_mul_ps(s2, zp), z3 = _mm256_mul_ps(s3, zp);
  }
};

// Rows of X two at a time (each dequantized weight vector feeds two FMAs), as the float kernel.
template <int Bits, class ST>
POPC_AVX2 void quant_dot_x4_avx2(const float* x, int64_t H, uint64_t mask, const QuantRow<ST>* w, int64_t block,
                                 float* out) {
  const uint8_t *q0 = w[0].q, *q1 = w[1].q, *q2 = w[2].q, *q3 = w[3].q;
  const int64_t blocks = H / block;
  while (mask) {
    const auto [i, j] = take_row_pair(mask);
    const float *xi = x + i * H, *xj = x + j * H;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t b = 0; b < blocks; ++b) {
      const BlockScales<Bits, ST> c(w, b);
      const int64_t end = (b + 1) * block;
      if (i == j) {
        // One row (batch 1): the scales leave the inner loop. Per block and row,
        // s * (sum x q - zp * sum x): one FMA per weight vector, the zero point and the scale
        // once per block (sum x shared by the four rows).
        __m256 d0 = _mm256_setzero_ps(), d1 = d0, d2 = d0, d3 = d0, xs = d0;
        for (int64_t h = b * block; h < end; h += 8) {
          const __m256 v = _mm256_loadu_ps(xi + h);
          xs = _mm256_add_ps(xs, v);
          d0 = _mm256_fmadd_ps(v, qint8<Bits>(q0, h), d0);
          d1 = _mm256_fmadd_ps(v, qint8<Bits>(q1, h), d1);
          d2 = _mm256_fmadd_ps(v, qint8<Bits>(q2, h), d2);
          d3 = _mm256_fmadd_ps(v, qint8<Bits>(q3, h), d3);
        }
        const __m256 zx = _mm256_mul_ps(xs, _mm256_set1_ps(static_cast<float>(1 << (Bits - 1))));
        a0 = _mm256_fmadd_ps(c.s0, _mm256_sub_ps(d0, zx), a0);
        a1 = _mm256_fmadd_ps(c.s1, _mm256_sub_ps(d1, zx), a1);
        a2 = _mm256_fmadd_ps(c.s2, _mm256_sub_ps(d2, zx), a2);
        a3 = _mm256_fmadd_ps(c.s3, _mm256_sub_ps(d3, zx), a3);
      } else {
        for (int64_t h = b * block; h < end; h += 8) {
          const __m256 v = _mm256_loadu_ps(xi + h), u = _mm256_loadu_ps(xj + h);
          __m256 k = qload8<Bits>(q0, h, c.s0, c.z0);
          a0 = _mm256_fmadd_ps(v, k, a0);
          b0 = _mm256_fmadd_ps(u, k, b0);
          k = qload8<Bits>(q1, h, c.s1, c.z1);
          a1 = _mm256_fmadd_ps(v, k, a1);
          b1 = _mm256_fmadd_ps(u, k, b1);
          k = qload8<Bits>(q2, h, c.s2, c.z2);
          a2 = _mm256_fmadd_ps(v, k, a2);
          b2 = _mm256_fmadd_ps(u, k, b2);
          k = qload8<Bits>(q3, h, c.s3, c.z3);
          a3 = _mm256_fmadd_ps(v, k, a3);
          b3 = _mm256_fmadd_ps(u, k, b3);
        }
      }
    }
    float* oi = out + i * kQuantStreams;
    oi[0] = hsum256(a0), oi[1] = hsum256(a1), oi[2] = hsum256(a2), oi[3] = hsum256(a3);
    if (j != i) {
      float* oj = out + j * kQuantStreams;
      oj[0] = hsum256(b0), oj[1] = hsum256(b1), oj[2] = hsum256(b2), oj[3] = hsum256(b3);
    }
  }
}

template <int Bits, class ST>
POPC_AVX2 void quant_axpy_x4_avx2(float* y, int64_t H, uint64_t mask, const QuantRow<ST>* w, int64_t block,
                                  const float* z) {
  const uint8_t *q0 = w[0].q, *q1 = w[1].q, *q2 = w[2].q, *q3 = w[3].q;
  const int64_t blocks = H / block;
  while (mask) {
    const auto [i, j] = take_row_pair(mask);
    float *yi = y + i * H, *yj = y + j * H;
    const float *zi = z + i * kQuantStreams, *zj = z + j * kQuantStreams;
    const __m256 s0 = _mm256_set1_ps(zi[0]), s1 = _mm256_set1_ps(zi[1]);
    const __m256 s2 = _mm256_set1_ps(zi[2]), s3 = _mm256_set1_ps(zi[3]);
    const __m256 t0 = _mm256_set1_ps(zj[0]), t1 = _mm256_set1_ps(zj[1]);
    const __m256 t2 = _mm256_set1_ps(zj[2]), t3 = _mm256_set1_ps(zj[3]);
    if (i == j) {
      // One row (batch 1): y += sum_s (z_s s_s) q_s - zp sum_s z_s s_s, the products once per block.
      const __m256 zp = _mm256_set1_ps(static_cast<float>(1 << (Bits - 1)));
      for (int64_t b = 0; b < blocks; ++b) {
        const __m256 c0 = _mm256_mul_ps(s0, scale8(w[0].s + b)), c1 = _mm256_mul_ps(s1, scale8(w[1].s + b));
        const __m256 c2 = _mm256_mul_ps(s2, scale8(w[2].s + b)), c3 = _mm256_mul_ps(s3, scale8(w[3].s + b));
        const __m256 shift = _mm256_mul_ps(zp, _mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)));
        const int64_t end = (b + 1) * block;
        for (int64_t h = b * block; h < end; h += 8) {
          __m256 acc = _mm256_sub_ps(_mm256_loadu_ps(yi + h), shift);
          acc = _mm256_fmadd_ps(c0, qint8<Bits>(q0, h), acc);
          acc = _mm256_fmadd_ps(c1, qint8<Bits>(q1, h), acc);
          acc = _mm256_fmadd_ps(c2, qint8<Bits>(q2, h), acc);
          acc = _mm256_fmadd_ps(c3, qint8<Bits>(q3, h), acc);
          _mm256_storeu_ps(yi + h, acc);
        }
      }
      continue;
    }
    for (int64_t b = 0; b < blocks; ++b) {
      const BlockScales<Bits, ST> c(w, b);
      const int64_t end = (b + 1) * block;
      for (int64_t h = b * block; h < end; h += 8) {
        const __m256 k0 = qload8<Bits>(q0, h, c.s0, c.z0), k1 = qload8<Bits>(q1, h, c.s1, c.z1);
        const __m256 k2 = qload8<Bits>(q2, h, c.s2, c.z2), k3 = qload8<Bits>(q3, h, c.s3, c.z3);
        __m256 acc = _mm256_loadu_ps(yi + h);
        acc = _mm256_fmadd_ps(s0, k0, acc);
        acc = _mm256_fmadd_ps(s1, k1, acc);
        acc = _mm256_fmadd_ps(s2, k2, acc);
        acc = _mm256_fmadd_ps(s3, k3, acc);
        _mm256_storeu_ps(yi + h, acc);
        if (j != i) {
          __m256 bcc = _mm256_loadu_ps(yj + h);
          bcc = _mm256_fmadd_ps(t0, k0, bcc);
          bcc = _mm256_fmadd_ps(t1, k1, bcc);
          bcc = _mm256_fmadd_ps(t2, k2, bcc);
          bcc = _mm256_fmadd_ps(t3, k3, bcc);
          _mm256_storeu_ps(yj + h, bcc);
        }
      }
    }
  }
}

// Rows of X four at a time (four and more rows in the mask; a remainder of one to three takes the
// pair loop): each weight vector converted once feeds four FMAs. Per block, row r and stream s,
// c = z_rs s_s (in an L1 table, FMA memory operands) and y_r += sum_s c q_s - zp sum_s c: no
// dequantized buffer, the scale folded into z.
template <int Bits, class ST>
POPC_AVX2 void quant_axpy_x4_quad_avx2(float* y, int64_t H, uint64_t mask, const QuantRow<ST>* w, int64_t block,
                                       const float* z) {
  const uint8_t *q0 = w[0].q, *q1 = w[1].q, *q2 = w[2].q, *q3 = w[3].q;
  const int64_t blocks = H / block;
  const float zp = static_cast<float>(1 << (Bits - 1));
  alignas(32) float c[4][kQuantStreams][8];
  while (__builtin_popcountll(mask) >= 4) {
    int r[4];
    for (int k = 0; k < 4; ++k) r[k] = __builtin_ctzll(mask), mask &= mask - 1;
    float *y0 = y + r[0] * H, *y1 = y + r[1] * H, *y2 = y + r[2] * H, *y3 = y + r[3] * H;
    for (int64_t b = 0; b < blocks; ++b) {
      float shift[4];
      for (int k = 0; k < 4; ++k) {
        shift[k] = 0.0f;
        for (int s = 0; s < kQuantStreams; ++s) {
          const float v = z[r[k] * kQuantStreams + s] * Elem<ST>::to_float(w[s].s[b]);
          shift[k] += v;
          _mm256_store_ps(c[k][s], _mm256_set1_ps(v));
        }
      }
      const __m256 h0 = _mm256_set1_ps(zp * shift[0]), h1 = _mm256_set1_ps(zp * shift[1]);
      const __m256 h2 = _mm256_set1_ps(zp * shift[2]), h3 = _mm256_set1_ps(zp * shift[3]);
      const int64_t end = (b + 1) * block;
      for (int64_t h = b * block; h < end; h += 8) {
        __m256 a0 = _mm256_sub_ps(_mm256_loadu_ps(y0 + h), h0), a1 = _mm256_sub_ps(_mm256_loadu_ps(y1 + h), h1);
        __m256 a2 = _mm256_sub_ps(_mm256_loadu_ps(y2 + h), h2), a3 = _mm256_sub_ps(_mm256_loadu_ps(y3 + h), h3);
#define POPC_QUAD_STREAM(s, qs)                                  \
  {                                                              \
    const __m256 k = qint8<Bits>(qs, h);                         \
    a0 = _mm256_fmadd_ps(_mm256_load_ps(c[0][s]), k, a0);        \
    a1 = _mm256_fmadd_ps(_mm256_load_ps(c[1][s]), k, a1);        \
    a2 = _mm256_fmadd_ps(_mm256_load_ps(c[2][s]), k, a2);        \
    a3 = _mm256_fmadd_ps(_mm256_load_ps(c[3][s]), k, a3);        \
  }
        POPC_QUAD_STREAM(0, q0) POPC_QUAD_STREAM(1, q1) POPC_QUAD_STREAM(2, q2) POPC_QUAD_STREAM(3, q3)
#undef POPC_QUAD_STREAM
        _mm256_storeu_ps(y0 + h, a0), _mm256_storeu_ps(y1 + h, a1);
        _mm256_storeu_ps(y2 + h, a2), _mm256_storeu_ps(y3 + h, a3);
      }
    }
  }
  if (mask) quant_axpy_x4_avx2<Bits>(y, H, mask, w, block, z);
}

template <int Bits, class ST>
POPC_AVX2 void dequant_row_avx2(const QuantRow<ST>& r, int64_t H, int64_t block, float* out) {
  const __m256 zp = _mm256_set1_ps(static_cast<float>(1 << (Bits - 1)));
  for (int64_t b = 0; b < H / block; ++b) {
    const __m256 s = scale8(r.s + b), zs = _mm256_mul_ps(s, zp);
    for (int64_t h = b * block, end = h + block; h < end; h += 8) _mm256_storeu_ps(out + h, qload8<Bits>(r.q, h, s, zs));
  }
}
#endif  // POPC_X86

// ---- dispatch: the CPU picks the path, the op's bits attribute the template ------------------
template <class ST>
inline void quant_dot_x4(bool use_avx2, int bits, int64_t block, const float* x, int64_t H, uint64_t mask,
                         const QuantRow<ST>* w, float* out) {
#if POPC_X86
  if (use_avx2) {
    if (bits == 4) quant_dot_x4_avx2<4>(x, H, mask, w, block, out);
    else quant_dot_x4_avx2<8>(x, H, mask, w, block, out);
    return;
  }
#endif
  if (bits == 4) quant_dot_x4_portable<4>(x, H, mask, w, block, out);
  else quant_dot_x4_portable<8>(x, H, mask, w, block, out);
}

template <class ST>
inline void quant_axpy_x4(bool use_avx2, int bits, int64_t block, float* y, int64_t H, uint64_t mask,
                          const QuantRow<ST>* w, const float* z) {
#if POPC_X86
  if (use_avx2) {
    if (__builtin_popcountll(mask) >= 4) {  // rows four at a time, the rest in pairs
      if (bits == 4) quant_axpy_x4_quad_avx2<4>(y, H, mask, w, block, z);
      else quant_axpy_x4_quad_avx2<8>(y, H, mask, w, block, z);
      return;
    }
    if (bits == 4) quant_axpy_x4_avx2<4>(y, H, mask, w, block, z);
    else quant_axpy_x4_avx2<8>(y, H, mask, w, block, z);
    return;
  }
#endif
  if (bits == 4) quant_axpy_x4_portable<4>(y, H, mask, w, block, z);
  else quant_axpy_x4_portable<8>(y, H, mask, w, block, z);
}

// One whole row, dequantized into out [H].
template <class ST>
inline void dequant_row(bool use_avx2, int bits, int64_t block, const QuantRow<ST>& r, int64_t H, float* out) {
#if POPC_X86
  if (use_avx2) {
    if (bits == 4) dequant_row_avx2<4>(r, H, block, out);
    else dequant_row_avx2<8>(r, H, block, out);
    return;
  }
#endif
  if (bits == 4) dequant_span<4>(r, block, 0, H, out);
  else dequant_span<8>(r, block, 0, H, out);
}

// A weight row and its scales, prefetched (the decode walk's gap prefetch).
template <class ST>
inline void prefetch_quant_row(const QuantRow<ST>& r, int64_t H, int bits, int64_t block) {
  prefetch_row(r.q, H * bits / 8);
  prefetch_row(r.s, (H / block) * static_cast<int64_t>(sizeof(ST)));
}

}  // namespace popc::cpu
